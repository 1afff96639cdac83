"""`coserve bench` against hostile input and a frozen server: absurd rates and shapes refused
(flags and specs), a bad --out refused before any load, flags that would do nothing refused,
a server that stops answering reported as a failure, and the event loop responsive at the
highest rate allowed."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from coserve.bench import stream_server
from coserve.bench.arrivals import MAX_RATE, arrival_offsets, count_arrivals
from coserve.bench.config import LoadConfig
from coserve.bench.loadgen import EndpointDead, run_load, run_sync
from coserve.spec import SpecError, loads_spec

NOWHERE = "http://127.0.0.1:1"  # never reached: every refusal here comes before any load


def _bench(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "coserve", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _refused(*args) -> str:
    """What `coserve bench ARGS` says as it refuses them (run in this process: the refusals
    all come before any load or event loop)."""
    import argparse
    import contextlib
    import io

    from coserve.bench import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        command.run(parser.parse_args(args))
    stderr = err.getvalue()
    assert e.value.code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--gen-rate", "1e12"], "--gen-rate"),
        (["--gen-rate", "10", "--burstiness", "1e-300"], "--burstiness"),
        (["--gen-rate", "10", "--burstiness", "1e300"], "--burstiness"),
    ],
)
def test_absurd_rates_and_shapes_are_refused(args, flag):
    assert f"coserve bench: {flag}:" in _refused("--gen-url", NOWHERE, *args)


# 'http://[::1' was a ValueError traceback; a port out of range failed only at connecting
# (exit 1); a query or fragment had /v1/models appended after it (a 404 from the server)
@pytest.mark.parametrize(
    "url, said",
    [
        ("http://[::1", "is not a URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:99999", "is not a URL (Port out of range"),
        ("http://127.0.0.1:8000?x=1", "it has a query, a fragment"),
        ("http://127.0.0.1:8000#top", "it has a query, a fragment"),
        ("http://127.0.0.1:8000\n", "it has a query, a fragment, a space"),
    ],
)
def test_a_url_no_server_answers_at_is_refused(url, said):
    assert said in _refused("--gen-url", url)


def test_absurd_rates_are_refused_in_a_spec_too():
    from tests.test_load_spec import SPEC

    for load, says in (("embed_rate = 1e12", "load.embed_rate"), ("burstiness = 1e-9", "load.b")):
        with pytest.raises(SpecError, match=says):
            loads_spec(SPEC.format(load=load))
    with pytest.raises(SpecError, match=r"sweep\.rate\[1\]"):
        loads_spec(SPEC.format(load="").replace("rate = [7.5, 120]", "rate = [7.5, 1e12]"))


def test_the_schedule_is_bounded_and_counted_a_block_at_a_time():
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(1e12)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(10.0, burstiness=1e-300)
    n = count_arrivals(MAX_RATE, "poisson", 1.0, 0, 1, 0.0, 30.0)  # 3 M, a block at a time
    assert abs(n - MAX_RATE * 30) <= 0.01 * MAX_RATE * 30
    every = list(itertools.takewhile(lambda x: x < 30.0, arrival_offsets(300.0, seed=2, stream=1)))
    assert count_arrivals(300.0, "poisson", 1.0, 2, 1, 10.0, 30.0) == sum(x >= 10 for x in every)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--arrival", "poisson"], "--arrival"),
        (["--burstiness", "2"], "--burstiness"),
        (["--gen-rate", "5", "--goodput", "ttft:5", "ttft:6"], "--goodput"),
        (["--embed-slo", "100"], "--embed-slo"),
        (["--embed-rate", "5"], "--embed-rate"),
    ],
)
def test_flags_that_would_do_nothing_are_refused(args, flag):
    assert f"coserve bench: {flag}:" in _refused("--gen-url", NOWHERE, *args)
    if flag != "--goodput":
        return
    stderr = _refused("--embed-url", NOWHERE, "--goodput", "ttft:5")
    assert "coserve bench: --goodput: does nothing here (give --gen-url)" in stderr


def test_a_bad_out_is_refused_before_any_load(tmp_path):
    (tmp_path / "afile").write_text("")
    for out in ("/proc/nope/x.json", "/", str(tmp_path), str(tmp_path / "afile" / "x.json")):
        assert "coserve bench: --out:" in _refused("--gen-url", NOWHERE, "--out", out), out


def test_a_write_that_fails_at_the_end_is_one_line_and_keeps_the_summary(tmp_path):
    sub = tmp_path / "sub"
    with stream_server.spawn(ttft_ms=5, itl_ms=2) as srv:
        p = _bench(
            "--gen-url", srv.url, "--gen-concurrency", "2", "--output-len", "4",
            "--warmup", "0.2", "--duration", "1", "--quiet", "--json",
            "--out", str(sub / "x.json"),
        )  # fmt: skip
        assert "coserve bench:" in p.stderr.readline()  # --out was checked: sub/ exists
        sub.rmdir()
        sub.write_text("")  # a file now stands where the folder was
        stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 1, stderr
    assert "coserve bench: --out: cannot write" in stderr and "Traceback" not in stderr
    assert json.loads(stdout)["gen"]["completed"] > 0


def _load_then_freeze(srv, when, **kw) -> EndpointDead:
    """Run a load against `srv`, SIGSTOP it at the first progress report for which `when`
    is true; the EndpointDead the run must end with."""
    frozen = []

    def on_progress(p):
        if not frozen and when(p):
            os.kill(srv.proc.pid, signal.SIGSTOP)
            frozen.append(p.elapsed_s)

    try:
        with pytest.raises(EndpointDead) as e:
            run_sync(run_load(LoadConfig(gen_url=srv.url, **kw), on_progress, None, 0.05))
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()
    assert frozen
    return e.value


def test_a_server_frozen_before_the_window_fails_the_run():
    e = _load_then_freeze(
        stream_server.spawn(ttft_ms=10, itl_ms=5),
        lambda p: p.phase == "warmup",
        gen_rate=20.0, output_len=4, warmup_s=0.5, duration_s=1.0,
    )  # fmt: skip
    assert "nothing was answered by the gen server" in str(e)
    assert e.result.aborted == str(e)
    g = e.result.summary()["gen"]
    assert g["completed"] == 0 and g["kept_up"] is False
    assert "nothing was answered" in g["warning"] and "still unanswered" in g["warning"]


def test_a_server_frozen_for_the_window_s_second_half_fails_the_run():
    # tokens came inside the window, then nothing: silent for its last 2.8 s (< stall_s)
    e = _load_then_freeze(
        stream_server.spawn(ttft_ms=10, itl_ms=5),
        lambda p: p.phase == "measure" and p.elapsed_s >= 0.5,
        gen_concurrency=4, output_len=1000, warmup_s=0.3, duration_s=3.0,
    )  # fmt: skip
    assert "answered nothing in the last" in str(e) and "of the window" in str(e)
    g = e.result.summary()["gen"]
    assert g["output_tokens_in_window"] > 0 and g["completed"] == 0
    assert g["kept_up"] is False and g["warning"] == str(e)


def test_a_server_frozen_mid_run_ends_it_after_the_stall_bound():
    t = time.monotonic()
    e = _load_then_freeze(
        stream_server.spawn(ttft_ms=10, itl_ms=5),
        lambda p: p.gen_completed > 0,
        gen_concurrency=4, output_len=50, warmup_s=0.3, duration_s=60, stall_s=0.5,
    )  # fmt: skip
    assert time.monotonic() - t < 10  # not the 60 s window
    assert "answered nothing for" in str(e) and "4 requests in flight" in str(e)
    assert e.result.gen.completed_total > 0  # it did answer before it froze
    assert e.result.summary()["gen"]["warning"] == str(e)


def test_the_highest_rate_leaves_signals_answered(tmp_path):
    with stream_server.spawn(ttft_ms=1, itl_ms=1) as srv:
        p = _bench(
            "--gen-url", srv.url, "--gen-rate", str(MAX_RATE), "--output-len", "2",
            "--warmup", "0.5", "--duration", "30", "--quiet", "--out", str(tmp_path / "x.json"),
        )  # fmt: skip
        assert "coserve bench:" in p.stderr.readline()
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        t = time.monotonic()
        try:
            _, stderr = p.communicate(timeout=15)
        finally:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - t < 10, "SIGTERM went unanswered"
    assert p.returncode == 130, stderr
    assert (tmp_path / "x.json").exists()


# a usage of Infinity went into the records as sent, and the records file was no JSON (a
# string or a boolean was kept too, and True counted as one token)
def test_a_usage_that_is_no_token_count_is_left_out_of_the_records(tmp_path):
    import asyncio
    import threading

    from aiohttp import web

    from coserve.bench.output import write_result
    from coserve.procs import free_port

    usages = itertools.cycle(
        [b'{"completion_tokens":1e400,"prompt_tokens":"x"}', b'{"completion_tokens":true}']
    )

    async def completions(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n')
        await resp.write(b'data: {"choices":[],"usage":' + next(usages) + b"}\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    port, loop, ready = free_port(), asyncio.new_event_loop(), threading.Event()

    async def serve():
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert ready.wait(10)
    try:
        cfg = LoadConfig(
            gen_url=f"http://127.0.0.1:{port}",
            gen_model="m",
            gen_concurrency=2,
            output_len=3,
            warmup_s=0.2,
            duration_s=0.5,
        )
        result = run_sync(run_load(cfg))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    ok = [r for r in result.records if r.status == "ok"]
    assert ok and all(r.output_tokens == 3 and r.usage_tokens is None for r in ok)
    assert all(r.prompt_tokens is None for r in ok)
    _, records = write_result(result, tmp_path / "b.json")
    with open(records) as f:
        for line in f:
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the records"))
