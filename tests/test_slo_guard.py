"""The SLO guard's controller (pure, scripted readings), its parsing of gen's /metrics, and
the engine core's step clock and pacing."""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager

import pytest

from coserve.engine.types import StepWork
from coserve.server.engine_core import Pacing, StepClock
from coserve.server.slo_guard import Allowance, GenSample, GuardConfig, SloGuard
from coserve.server.slo_guard_io import BadGenPage, guard_metrics, parse_gen_metrics

MS = 1e-3


def drive(guard: SloGuard, readings, start: float = 0.0, dt: float = 0.05) -> list[Allowance]:
    out = []
    for i, r in enumerate(readings):
        out.append(guard.update(r, start + i * dt))
    return out


def test_over_budget_cuts_tokens_then_pauses_with_cooldown():
    g = SloGuard(GuardConfig(budget_s=25 * MS, max_tokens=1024, min_tokens=256))
    over = GenSample(30 * MS, 20)
    a = drive(g, [over] * 11)  # 0.5 s at 50 ms: one cut per 0.5 s cooldown
    assert a[0] == Allowance(512, 0.0)
    assert all(x == a[0] for x in a[1:10])
    assert a[10] == Allowance(256, 0.0)  # second cut after the cooldown
    a = drive(g, [over] * 11, start=1.0)
    assert a[0].tokens_per_forward == 256 and a[0].pause_s == pytest.approx(0.002)
    assert a[10].pause_s == pytest.approx(0.004)  # pause doubles once tokens are at the floor
    assert g.state.cuts == 4


def test_pause_is_capped():
    g = SloGuard(
        GuardConfig(budget_s=25 * MS, max_tokens=64, min_tokens=64, max_pause_s=0.01, cooldown_s=0)
    )
    a = drive(g, [GenSample(1.0, 10)] * 10)
    assert a[-1].pause_s == pytest.approx(0.01)


def test_under_budget_shortens_pause_first_then_grows_tokens():
    g = SloGuard(
        GuardConfig(
            budget_s=25 * MS,
            max_tokens=1024,
            min_tokens=64,
            cooldown_s=0,
            grow_tokens=100,
            grow_interval_s=0,
            pause_grow=2.0,
        )
    )
    drive(g, [GenSample(40 * MS, 20)] * 6)  # 1024 -> 64 in 4 cuts, then pauses 2, 4 ms
    assert (g.tokens, g.pause_s) == (64, pytest.approx(0.004))
    under = GenSample(20 * MS, 20)
    a = drive(g, [under] * 4, start=1.0)
    assert [x.pause_s for x in a] == [pytest.approx(0.002), 0.0, 0.0, 0.0]
    assert [x.tokens_per_forward for x in a] == [64, 64, 164, 264]
    drive(g, [under] * 20, start=2.0)
    assert g.tokens == 1024  # never past the server's own limit


def test_under_budget_grows_by_default_once_a_window_and_cuts_stop_at_the_floor():
    g = SloGuard(GuardConfig(budget_s=25 * MS, max_tokens=2048, cooldown_s=0))
    drive(g, [GenSample(30 * MS, 20)] * 3)
    assert (g.tokens, g.pause_s) == (512, pytest.approx(0.002))  # 2048 -> 1024 -> 512, then a pause
    # under budget at every 50 ms poll, but one growth per 0.5 s window: the pause goes at
    # 1.0 s, then 64 tokens more at 1.5 s and at 2.0 s
    a = drive(g, [GenSample(24.9 * MS, 20)] * 21, start=1.0)
    assert [x.pause_s for x in a] == [0.0] * 21
    assert [x.tokens_per_forward for x in a] == [512] * 10 + [576] * 10 + [640]


def test_inside_the_margin_holds_and_idle_gen_grows():
    g = SloGuard(
        GuardConfig(budget_s=25 * MS, max_tokens=1024, min_tokens=64, cooldown_s=0, margin=0.9)
    )
    drive(g, [GenSample(30 * MS, 20)])
    held = drive(g, [GenSample(24 * MS, 20)] * 5, start=1.0)  # 0.9 x 25 <= 24 <= 25: no change
    assert {x.tokens_per_forward for x in held} == {512}
    drive(g, [GenSample(0.0, 0)] * 40, start=2.0)  # gen idle: nothing to protect
    assert g.tokens == 1024


def test_failed_poll_keeps_the_allowance_and_is_counted():
    g = SloGuard(GuardConfig(budget_s=25 * MS, max_tokens=1024, min_tokens=64))
    first = g.update(GenSample(30 * MS, 20), 0.0)
    assert g.update(None, 1.0) == first
    assert (g.state.polls, g.state.poll_errors) == (2, 1)


def test_percentage_budget_holds_embed_while_it_measures_gen_alone():
    cfg = GuardConfig(over_alone_pct=5, max_tokens=1024, settle_s=0.5, calibrate_s=1.0)
    g = SloGuard(cfg)
    assert g.update(GenSample(0.0, 0), 0.0) == Allowance(1024)  # gen idle: embed runs freely
    assert g.state.phase == "waiting" and g.state.budget_s is None
    # gen busy from t = 1: held while the window settles, then measured for 1 s
    readings = [GenSample(0.040, 20)] * 10 + [GenSample(0.020, 20)] * 21
    a = drive(g, readings, start=1.0)
    assert all(x.hold for x in a[:30]) and not a[30].hold
    assert g.state.baseline_s == pytest.approx(0.020)  # the settling readings are not used
    assert g.state.budget_s == pytest.approx(0.021)
    assert g.state.phase == "guarding"
    assert g.update(GenSample(0.0215, 20), 3.0).tokens_per_forward == 512


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "gen_tpot_slo"),
        ({"budget_s": 0.02, "over_alone_pct": 5}, "gen_tpot_slo"),
        ({"budget_s": -1.0}, "gen_tpot_slo_ms"),
        ({"over_alone_pct": -5}, "gen_tpot_slo_pct"),
        ({"over_alone_pct": 0}, r"gen_tpot_slo_pct: must be in \(0, 1000\], got 0"),
        ({"budget_s": 0.0}, "gen_tpot_slo_ms"),
        ({"budget_s": 0.02, "max_tokens": 8, "min_tokens": 32}, "max_tokens"),
        ({"budget_s": 0.02, "cut": 1.5}, "cut"),
        ({"budget_s": 0.02, "stat": "p50"}, "stat"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        GuardConfig(**kwargs)


def test_parse_gen_metrics():
    page = (
        "# HELP coserve:engine_step_seconds_p99 x\n# TYPE coserve:engine_step_seconds_p99 gauge\n"
        'coserve:engine_step_seconds_mean{model_name="m"} 0.0201\n'
        'coserve:engine_step_seconds_p99{model_name="m"} 0.0215\n'
        'coserve:engine_steps_window{model_name="m"} 23\n'
        'coserve:engine_steps_total{model_name="m"} 900\n'
    )
    assert parse_gen_metrics(page) == GenSample(0.0201, 23)
    assert parse_gen_metrics(page, "p99") == GenSample(0.0215, 23)
    assert parse_gen_metrics("coserve:engine_steps_total 3\n") is None


@pytest.mark.parametrize(
    "step, count, named",
    [
        ("0.02", "inf", "engine_steps_window"),  # int(float('inf')) raised OverflowError
        ("nan", "20", "engine_step_seconds_mean"),
        ("-1.05", "20", "engine_step_seconds_mean"),
        ("0.02", "-3", "engine_steps_window"),
        ("0.02", "2.5", "engine_steps_window"),
        ("x", "20", "engine_step_seconds_mean"),
        ("1e400", "20", "engine_step_seconds_mean"),
    ],
)
def test_a_figure_that_is_no_reading_is_refused_by_name(step, count, named):
    page = f"coserve:engine_step_seconds_mean {step}\ncoserve:engine_steps_window {count}\n"
    with pytest.raises(BadGenPage, match=named):
        parse_gen_metrics(page)


def test_guard_metrics_carry_the_state():
    g = SloGuard(GuardConfig(budget_s=25 * MS, max_tokens=1024))
    g.update(GenSample(30 * MS, 20), 0.0)
    rows = {name: v for name, _, _, v in guard_metrics(g.state, 1.5)}
    assert rows["coserve:slo_guard_budget_seconds"] == pytest.approx(0.025)
    assert rows["coserve:slo_guard_tokens_per_forward"] == 512
    assert rows["coserve:slo_guard_gen_step_seconds"] == pytest.approx(0.030)
    assert rows["coserve:slo_guard_throttled_seconds_total"] == 1.5


def test_step_clock_keeps_only_its_window():
    c = StepClock(window_s=0.5)
    for i in range(100):
        c.add(i * 0.01, 0.001 if i < 60 else 0.009)
    st = c.stats(now=0.995)
    assert st["step_window_steps"] == 50  # ends 0.50 .. 0.99
    assert st["step_time_p99_s"] == pytest.approx(0.009)
    assert st["step_time_mean_s"] == pytest.approx((10 * 0.001 + 40 * 0.009) / 50)
    assert c.stats(now=5.0) == {
        "step_time_mean_s": 0.0,
        "step_time_p99_s": 0.0,
        "step_window_steps": 0,
        "guard_throttled_s": 0.0,
    }


def test_step_clock_means_the_work_of_the_steps_that_report_one():
    c = StepClock(window_s=1.0, work=True)
    c.add(0.1, 0.01, StepWork(2, 16, 40))
    c.add(0.2, 0.01)  # a step the engine said nothing about: left out of the means
    c.add(0.3, 0.01, StepWork(3, 0, 45))
    st = c.stats(now=0.5)
    assert st["step_window_steps"] == 3
    assert (st["step_batch_mean"], st["step_prefill_tokens_mean"]) == (2.5, 8.0)
    assert st["step_kv_tokens_mean"] == 42.5
    idle = c.stats(now=5.0)
    assert (idle["step_batch_mean"], idle["step_kv_tokens_mean"]) == (0.0, 0.0)
    assert StepWork.mean([]) == StepWork(0, 0, 0)


def test_pacing_sets_the_engine_batch_and_waits():
    class Engine:
        max_num_batched_tokens = 8192

    e, p = Engine(), Pacing()
    assert p.wait_s(10.0) == 0.0
    p.allow(e, 256, 0.02, False)
    p.last_step_end = 10.0
    assert e.max_num_batched_tokens == 256
    assert p.wait_s(10.005) == pytest.approx(0.015)
    assert p.wait_s(10.03) == 0.0
    p.allow(e, 256, 0.0, False)  # a shorter pause counts for the step already waiting
    assert p.wait_s(10.005) == 0.0
    p.allow(e, 256, 0.0, True)
    assert p.wait_s(11.0) > 0


def test_pacing_turns_an_embed_engines_overlap_off_while_it_pauses_or_holds():
    """A pause is meant to leave the GPU idle: an engine that queued its next pass before the
    pause would run it during the pause."""

    class Engine:
        max_num_batched_tokens = 8192
        overlap = True

    e, p = Engine(), Pacing()
    p.allow(e, 512, 0.0, False)
    assert e.overlap
    p.allow(e, 512, 0.01, False)
    assert not e.overlap
    p.allow(e, 512, 0.0, True)
    assert not e.overlap
    p.allow(e, 8192, 0.0, False)
    assert e.overlap


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["gen", "--slo-guard-gen-url", "http://127.0.0.1:1", "--gen-tpot-slo-ms", "20"],
            "--gen-tpot-slo-ms is for serve embed and serve colocated; serve gen would ignore it",
        ),
        (
            ["embed", "--slo-guard-gen-url", "notaurl", "--gen-tpot-slo-ms", "5"],
            "--slo-guard-gen-url: 'notaurl' is not an http(s) URL with a host",
        ),
        (
            ["embed", "--slo-guard-gen-url", "http://127.0.0.1:1"],
            "--slo-guard-gen-url needs a budget: --gen-tpot-slo-ms or --gen-tpot-slo-pct",
        ),
        (
            ["embed", "--gen-tpot-slo-pct", "5"],
            "--gen-tpot-slo-ms/--gen-tpot-slo-pct need --slo-guard-gen-url",
        ),
        (
            [
                "embed",
                "--slo-guard-gen-url",
                "http://127.0.0.1:1",
                "--gen-tpot-slo-ms",
                "20",
                "--slo-guard-probe-interval-s",
                "5",
            ],
            "--slo-guard-probe-interval-s is for --gen-tpot-slo-pct; --gen-tpot-slo-ms is a "
            "fixed budget",
        ),
        (
            [
                "embed",
                "--slo-guard-gen-url",
                "http://127.0.0.1:1",
                "--gen-tpot-slo-pct",
                "5",
                "--slo-guard-probe-s",
                "0.2",
            ],
            "--slo-guard-probe-s: must be at least gen's step window (0.5 s), got 0.2",
        ),
        (
            ["gen", "--slo-guard-probe-interval-s", "5"],
            "--slo-guard-probe-interval-s is for serve embed and serve colocated; serve gen "
            "would ignore it",
        ),
    ],
)
def test_serve_refuses_a_misplaced_guard_before_loading(argv, message, capsys):
    from coserve.cli import main

    assert main(["serve", argv[0], "--model", "tiny-dense", *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_two_budgets(capsys):
    from coserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "serve",
                "embed",
                "--model",
                "tiny-embed",
                "--slo-guard-gen-url",
                "http://127.0.0.1:1",
                "--gen-tpot-slo-ms",
                "20",
                "--gen-tpot-slo-pct",
                "5",
            ]
        )
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_an_unreachable_gen_server_is_logged_once_and_counted(caplog):
    import asyncio

    from coserve.server.slo_guard_io import run_guard

    guard = SloGuard(GuardConfig(budget_s=20 * MS))

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        await run_guard(guard, "http://127.0.0.1:1", lambda a: None, 0.02, stop)

    with caplog.at_level("WARNING", logger="coserve"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(said) == 1 and "http://127.0.0.1:1/metrics" in said[0]
    assert guard.state.poll_errors == guard.state.polls >= 3


@pytest.mark.parametrize(
    "extra, probe_interval_s, probe_s, settle_s",
    [
        ([], 5.0, 0.5, 0.3),  # GuardConfig's defaults
        (
            ["--slo-guard-probe-interval-s", "0", "--slo-guard-probe-s", "1.5"]
            + ["--slo-guard-settle-s", "0.4"],
            0.0,
            1.5,
            0.4,
        ),
    ],
)
def test_probe_flags_reach_the_guard_config(extra, probe_interval_s, probe_s, settle_s):
    from coserve.cli import build_parser
    from coserve.server.serve_flags import guard_config

    argv = ["serve", "embed", "--model", "tiny-embed", "--slo-guard-gen-url", "http://h:1"]
    args = build_parser().parse_args([*argv, "--gen-tpot-slo-pct", "5", *extra])
    cfg = guard_config(args, 512)
    assert (cfg.probe_interval_s, cfg.probe_s, cfg.settle_s) == (
        probe_interval_s,
        probe_s,
        settle_s,
    )
    assert cfg.over_alone_pct == 5 and cfg.budget_s is None


BAD_PAGES = [
    "coserve:engine_step_seconds_mean 0.02\ncoserve:engine_steps_window inf\n",
    "coserve:engine_step_seconds_mean nan\ncoserve:engine_steps_window 20\n",
    "coserve:engine_step_seconds_mean -1.05\ncoserve:engine_steps_window 20\n",
]


@contextmanager
def fake_gen_metrics(pages: list[str]):
    """A gen stand-in on loopback whose /metrics serves `pages` in turn, forever; yields
    its URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served = itertools.cycle(pages)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = next(served).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_pages_of_inf_nan_and_negative_times_are_failed_reads_and_the_guard_goes_on(caplog):
    import asyncio

    from coserve.server.slo_guard_io import run_guard

    guard = SloGuard(GuardConfig(over_alone_pct=5, calibrate_s=0.5, settle_s=0.0))

    async def main(url):
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.6, stop.set)
        await run_guard(guard, url, lambda a: None, 0.02, stop)

    with caplog.at_level("WARNING", logger="coserve"), fake_gen_metrics(BAD_PAGES) as url:
        asyncio.run(main(url))
    st = guard.state
    assert st.polls >= 6 and st.poll_errors == st.polls  # the loop outlived every page
    assert st.baseline_s is None and st.budget_s is None and st.probes == 0
    said = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(said) == 3  # once per kind, not once per poll
    for name in ("engine_steps_window is inf", "mean is nan", "mean is -1.05"):
        assert sum(name in m for m in said) == 1, (name, said)
