"""Co-scheduling levers in specs: embed granularity and the SLO guard are validated naming the
field, reach the server's command line, and the runner hands the embed server gen's URL."""

from __future__ import annotations

import dataclasses

import pytest
from test_experiment_runner import FakeBackend

from coserve.experiment.runner import Runner
from coserve.launch import ServerSpec, build_command
from coserve.spec import SpecError, loads_spec

SPEC = """
name = "cosched"
repetitions = 1
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "tiny-embed"
max_model_len = 256
[load]
warmup_s = 1
duration_s = 2
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "grain"
embed = { max_num_batched_tokens = 512, max_num_seqs = 16 }
[[conditions]]
name = "guard"
embed = { slo_guard = true, gen_tpot_slo_pct = 5 }
[[conditions]]
name = "colo"
embed = { launcher = "external", url = "http://127.0.0.1:18101" }
[conditions.gen]
launcher = "command"
extra_args = ["{python}", "-m", "coserve", "serve", "colocated", "--port", "{port}"]
"""


def problems(old: str, new: str) -> list[str]:
    assert old in SPEC
    with pytest.raises(SpecError) as e:
        loads_spec(SPEC.replace(old, new))
    return e.value.problems


def test_levers_parse():
    spec = loads_spec(SPEC)
    grain = spec.condition("grain").server(spec, "embed")
    assert (grain.max_num_batched_tokens, grain.max_num_seqs) == (512, 16)
    guard = spec.condition("guard").server(spec, "embed")
    assert guard.slo_guard and guard.gen_tpot_slo_pct == 5 and guard.gen_tpot_slo_ms is None


def test_new_fields_at_their_defaults_keep_an_old_specs_digest():
    old = SPEC.split('[[conditions]]\nname = "grain"')[0]
    assert "max_num_batched_tokens" not in str(loads_spec(old).to_dict())


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "max_num_batched_tokens = 512,",
            "max_num_batched_tokens = -1,",
            "conditions[1].embed.max_num_batched_tokens: -1 must be at least 1",
        ),
        (
            "max_num_batched_tokens = 512,",
            "max_num_batched_tokens = 0,",
            "conditions[1].embed.max_num_batched_tokens: 0 must be at least 1",
        ),
        (
            "max_num_batched_tokens = 512,",
            "max_num_batched_tokens = 128,",
            "conditions[1].embed.max_num_batched_tokens: 128 is less than max_model_len (256); "
            "the embed engine takes a whole input per forward",
        ),
        (
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_pct = -5",
            "conditions[2].embed.gen_tpot_slo_pct: -5.0 must be greater than 0.0",
        ),
        (
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_pct = 0",
            "conditions[2].embed.gen_tpot_slo_pct: 0.0 must be greater than 0.0",
        ),
        (
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_ms = 0",
            "conditions[2].embed.gen_tpot_slo_ms: 0.0 must be at least 0.1",
        ),
        (  # below any gen step's time: embed would be held at its floor throughout
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_ms = 1e-9",
            "conditions[2].embed.gen_tpot_slo_ms: 1e-09 must be at least 0.1",
        ),
        (  # the server's own bound: the dry run passed it, the rep's embed server refused it
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_ms = 3.6e7",
            "conditions[2].embed.gen_tpot_slo_ms: 36000000.0 must be at most 3600000.0",
        ),
        (
            "slo_guard = true, gen_tpot_slo_pct = 5",
            "slo_guard = true",
            "conditions[2].embed.slo_guard: needs exactly one of gen_tpot_slo_ms and "
            "gen_tpot_slo_pct",
        ),
        (
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_pct = 5, gen_tpot_slo_ms = 20",
            "conditions[2].embed.slo_guard: needs exactly one of gen_tpot_slo_ms and "
            "gen_tpot_slo_pct",
        ),
        (
            "slo_guard = true, gen_tpot_slo_pct = 5",
            "gen_tpot_slo_pct = 5",
            "conditions[2].embed.gen_tpot_slo_pct: only with slo_guard = true",
        ),
        (
            "slo_guard = true, ",
            "slo_guard = 1, ",
            "conditions[2].embed.slo_guard: 1 is not true/false",
        ),
        (  # in TOML's spelling; it said Python's "True"
            "gen_tpot_slo_pct = 5",
            "gen_tpot_slo_ms = true",
            "conditions[2].embed.gen_tpot_slo_ms: true is not a number",
        ),
        (
            'name = "guard"\n',
            'name = "guard"\nservers = ["embed"]\n',
            "conditions[2].embed.slo_guard: the condition runs no gen server to guard",
        ),
        (
            'name = "guard"\nembed',
            'name = "guard"\ngen = { slo_guard = true }\nembed',
            "conditions[2].gen.slo_guard: the SLO guard runs in the embed server; set it under "
            "embed",
        ),
        (
            'name = "guard"\n',
            'name = "guard"\ngen = { launcher = "vllm" }\n',
            "conditions[2].embed.slo_guard: the guard reads the builtin gen server's step times; "
            "gen's launcher is 'vllm'",
        ),
        (
            'url = "http://127.0.0.1:18101" }',
            'url = "http://127.0.0.1:18101", slo_guard = true, gen_tpot_slo_pct = 5 }',
            "conditions[3].embed.gen_tpot_slo_pct: an external embed server's guard takes its "
            "budget from that server's own command line",
        ),
        (
            'name = "guard"\nembed = {',
            'name = "guard"\nembed = { launcher = "vllm", model = "m",',
            "conditions[2].embed.slo_guard: coserve starts the guard in a builtin embed server, "
            "or records the guard of an external one (launcher is 'vllm')",
        ),
    ],
)
def test_bad_values_name_the_field(old, new, expected):
    assert expected in problems(old, new)


def test_a_refused_guard_budget_is_the_only_problem():
    assert problems("gen_tpot_slo_pct = 5", "gen_tpot_slo_pct = -5") == [
        "conditions[2].embed.gen_tpot_slo_pct: -5.0 must be greater than 0.0"
    ]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            'model = "tiny-dense"',
            "model = 42",
            "servers.gen.model: 42 is not a string",
        ),
        (
            'model = "tiny-dense"',
            'model = "tiny-dense"\nlauncher = "nope"',
            "servers.gen.launcher: 'nope' is not one of builtin, vllm, external, command",
        ),
    ],
)
def test_a_bad_gen_server_is_the_only_problem_of_the_guarded_condition(old, new, expected):
    # the guard's own checks need gen's config; without it they would add a derived error
    assert problems(old, new) == [expected]


def test_a_guard_set_on_the_server_table_is_named_there():
    text = SPEC.replace("max_model_len = 256\n", "max_model_len = 256\nslo_guard = true\n")
    with pytest.raises(SpecError) as e:
        loads_spec(text)
    assert (
        "servers.embed.slo_guard (in conditions[1]): needs exactly one of gen_tpot_slo_ms and "
        "gen_tpot_slo_pct"
    ) in e.value.problems


def test_command_lines():
    import sys

    colo = build_command(
        ServerSpec(role="gen", launcher="command", extra_args=["{python}", "-m", "x", "{port}"]), 7
    )
    assert colo == [sys.executable, "-m", "x", "7"]
    cmd = build_command(
        ServerSpec(
            role="embed",
            model="tiny-embed",
            max_num_batched_tokens=512,
            max_num_seqs=16,
            slo_guard_gen_url="http://127.0.0.1:9000",
            gen_tpot_slo_ms=23.5,
        ),
        1,
    )
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "512"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16"
    assert cmd[cmd.index("--slo-guard-gen-url") + 1] == "http://127.0.0.1:9000"
    assert cmd[cmd.index("--gen-tpot-slo-ms") + 1] == "23.5" and "--gen-tpot-slo-pct" not in cmd
    # exact: `:g` sent 3,599,999 ms as 3.6e+06, past the server's bound
    exact = ServerSpec(role="embed", model="tiny-embed", slo_guard_gen_url="http://x")
    for budget, sent in ((3_599_999.0, "3599999"), (18.0, "18"), (0.1, "0.1")):
        cmd = build_command(dataclasses.replace(exact, gen_tpot_slo_ms=budget), 1)
        assert cmd[cmd.index("--gen-tpot-slo-ms") + 1] == sent
    vllm = build_command(
        ServerSpec(role="embed", launcher="vllm", model="x", max_num_batched_tokens=2048), 1
    )
    assert vllm[vllm.index("--max-num-batched-tokens") + 1] == "2048"
    with pytest.raises(ValueError, match="builtin embed server only"):
        build_command(
            ServerSpec(
                role="gen", model="tiny-dense", slo_guard_gen_url="http://x", gen_tpot_slo_ms=1.0
            ),
            1,
        )


def test_an_external_embed_server_with_its_own_guard_is_recorded(tmp_path):
    # `coserve serve colocated --slo-guard-gen-url ...` starts the guard itself: the spec says
    # slo_guard = true on its external embed endpoint, and the run traces it without
    # handing a launcher a gen URL
    text = SPEC.replace(
        'url = "http://127.0.0.1:18101" }', 'url = "http://127.0.0.1:18101", slo_guard = true }'
    )
    started = []

    class Backend(FakeBackend):
        def start_server(self, spec, env, log_path, ready_timeout_s):
            started.append(spec)
            return super().start_server(spec, env, log_path, ready_timeout_s)

    b = Backend()
    records = Runner(
        loads_spec(text), tmp_path / "run", spec_text=text, backend=b, only=["colo"]
    ).run()
    assert records[0]["status"] == "ok", records[0].get("error")
    assert records[0]["slo_guard_trace"]["file"] == "slo_guard.jsonl"
    assert any(e[0] == "guard_trace" for e in b.events)
    (embed,) = [s for s in started if s.role == "embed"]
    assert embed.slo_guard_gen_url is None  # its own command line has it


def test_the_runner_gives_the_embed_server_gens_url_and_records_the_guard(tmp_path):
    class Backend(FakeBackend):
        specs: list = []

        def start_server(self, spec, env, log_path, ready_timeout_s):
            self.specs.append(spec)
            return super().start_server(spec, env, log_path, ready_timeout_s)

        def guard_state(self, embed_url):
            self.events.append(("guard", embed_url))
            return {"budget_seconds": 0.021, "cuts_total": 3.0, "throttled_seconds_total": 12.25}

        def run_load(self, load, out_path, on_progress, dead=None):
            summary = super().run_load(load, out_path, on_progress, dead)
            if summary["embed"]:  # every embed load falls behind its offered rate
                summary["embed"].update(kept_up=False, warning="embed did not keep up")
            return summary

    b = Backend()
    records = Runner(loads_spec(SPEC), tmp_path / "run", spec_text=SPEC, backend=b).run()
    started = {r["condition"]: r for r in records}
    assert all(r["status"] == "ok" for r in records)
    specs = [e for e in b.specs if e.role == "embed"]
    grain, guard, _ = specs
    assert grain.slo_guard_gen_url is None  # no guard: the launch default
    assert grain.max_num_batched_tokens == 512 and grain.max_num_seqs == 16
    assert guard.slo_guard_gen_url == "http://127.0.0.1:9000" and guard.gen_tpot_slo_pct == 5
    assert started["guard"]["slo_guard"]["cuts_total"] == 3.0
    assert started["guard"]["slo_guard_trace"] == {"file": "slo_guard.jsonl", "rows": 3}
    assert ("guard_trace", "http://127.0.0.1:9001", 1.0, "slo_guard.jsonl") in b.events
    assert "slo_guard" not in started["grain"] and "slo_guard_trace" not in started["grain"]
    assert started["guard"]["servers"]["embed"]["slo_guard"] is True
    assert started["grain"]["servers"]["embed"]["max_num_batched_tokens"] == 512
    assert ("guard", "http://127.0.0.1:9001") in b.events
    from coserve.report.aggregate import aggregate

    stats = aggregate(tmp_path / "run")
    # a guarded embed that fell behind is said to be held by the guard, not a slow server
    (held,) = stats.get("guard").load_warnings()
    assert held.text == (
        "embed did not keep up — the SLO guard held embed back for 12.2 s of the load, by "
        "design: its throttling, not the server, set the rate"
    )
    (plain,) = stats.get("grain").load_warnings()
    assert plain.text == "embed did not keep up"
    assert stats.get("guard").mean("slo_guard_budget_seconds") == 0.021
    assert stats.get("guard").mean("slo_guard_cuts_total") == 3.0
    assert "slo_guard_cuts_total" not in stats.get("grain").summary
    from coserve.report.tradeoff import tradeoff

    labels = {c.label: [p.condition for p in c.points] for c in tradeoff(stats).curves}
    assert labels["timeslice (embed.gen_tpot_slo_pct=5, embed.slo_guard=true)"] == ["guard"]
    assert labels["timeslice (embed.max_num_batched_tokens=512, embed.max_num_seqs=16)"] == [
        "grain"
    ]
    assert labels["timeslice (colo)"] == ["colo"]  # a command line is named by its condition


def test_mps_limits_spec_gives_the_embed_server_its_env(tmp_path):
    from pathlib import Path

    from coserve.gpu.strategies import make_strategy
    from coserve.spec import load_spec

    spec = load_spec(
        Path(__file__).resolve().parent.parent / "experiments" / "mps-embed-limits.toml"
    )
    envs = {}
    for c in spec.conditions:
        if c.strategy == "mps":
            s = make_strategy(c.strategy, list(c.gpus), dict(c.options), tmp_path / c.name)
            envs[c.name] = (s.env_for("gen"), s.env_for("embed"))
    assert set(envs) == {"mps", "mps-embed-sm50", "mps-embed-sm25", "mps-embed-low-priority"}
    assert envs["mps-embed-sm25"][1]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert envs["mps-embed-sm50"][1]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert envs["mps-embed-low-priority"][1]["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    for gen, _ in envs.values():  # the limits are the embed server's alone
        assert (
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in gen
            and gen.get("CUDA_MPS_CLIENT_PRIORITY", "0") == "0"
        )
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in envs["mps"][1]


def _guard_rows(t0: float, **override) -> list[dict]:
    rows = [
        {
            "t": t0 + i,
            "gen_step_seconds": 0.020 + 0.001 * (i % 3),
            "budget_seconds": 0.021,
            "tokens_per_forward": 512.0,
            "pause_seconds": 0.01,
            "holding": 1.0 if i == 2 else 0.0,
        }
        for i in range(8)
    ]
    for i, (k, v) in enumerate(override.items()):
        rows[i][k] = v
    return rows


@pytest.mark.parametrize(
    "damage",
    [
        {"gen_step_seconds": "abc"},
        {"budget_seconds": None},
        {"pause_seconds": [1, 2]},
        {"tokens_per_forward": {"x": 1}},
        {"gen_step_seconds": 10**400},
        {"budget_seconds": float("inf")},
    ],
)
def test_the_guard_plot_skips_values_that_are_no_figures(tmp_path, damage):
    import datetime as dt
    import json

    from coserve.report.render import render

    Runner(loads_spec(SPEC), tmp_path / "run", spec_text=SPEC, backend=FakeBackend()).run()
    rep = tmp_path / "run/reps/guard/rep-1"
    started = json.loads((rep / "rep.json").read_text())["started"]
    rows = _guard_rows(dt.datetime.fromisoformat(started).timestamp(), **damage)
    lines = [json.dumps(r) for r in rows] + ['{"t": 1, "error": "cannot read"}', "junk"]
    (rep / "slo_guard.jsonl").write_text("\n".join(lines) + "\n")
    md = render(tmp_path / "run").markdown.read_text()
    assert "## SLO guard" in md and (tmp_path / "run/plots/guard.png").stat().st_size > 5000
    # the junk line is skipped, and said to be (it was skipped silently)
    assert "were skipped: 1 line(s) of `reps/guard/rep-1/slo_guard.jsonl`." in md


def test_a_guard_trace_without_figures_draws_no_plot(tmp_path):
    from coserve.report.render import render

    Runner(loads_spec(SPEC), tmp_path / "run", spec_text=SPEC, backend=FakeBackend()).run()
    (tmp_path / "run/reps/guard/rep-1/slo_guard.jsonl").write_text(
        '{"t": 1, "error": "cannot read"}\n{"t": 2, "gen_step_seconds": "n/a"}\n'
    )
    md = render(tmp_path / "run").markdown.read_text()
    assert "SLO guard" not in md and not (tmp_path / "run/plots/guard.png").exists()


def test_a_guard_trace_of_junk_alone_is_named_though_nothing_is_drawn(tmp_path):
    from coserve.report.render import render

    Runner(loads_spec(SPEC), tmp_path / "run", spec_text=SPEC, backend=FakeBackend()).run()
    (tmp_path / "run/reps/guard/rep-1/slo_guard.jsonl").write_bytes(b'{"t": 1, "gen\n\n[1]\n\xff\n')
    md = render(tmp_path / "run").markdown.read_text()
    assert not (tmp_path / "run/plots/guard.png").exists()
    assert (
        "## SLO guard" in md
        and "were skipped: 3 line(s) of `reps/guard/rep-1/slo_guard.jsonl`." in md
    )
