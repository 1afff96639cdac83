"""The study's section 4 specs (experiments/seed-tp2.toml, seed-tp2-equal-work.toml): the
conditions, strategies, options and loads they expand to, the environments and server command
lines those give, and a 2-GPU machine's pre-flight finding nothing against them."""

from __future__ import annotations

from pathlib import Path

import pytest

from coserve.cli import build_parser
from coserve.experiment.preflight import problems
from coserve.experiment.runner import Runner
from coserve.gpu.strategies import make_strategy
from coserve.launch import build_command
from coserve.server.serve_flags import misplaced
from coserve.spec import load_spec

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
CLOSED = load_spec(EXPERIMENTS / "seed-tp2.toml")
EQUAL = load_spec(EXPERIMENTS / "seed-tp2-equal-work.toml")
TWO_H200 = {
    "gpus": [
        {"index": i, "uuid": f"GPU-{i}", "memory_mib": 143771, "mig_devices": []} for i in (0, 1)
    ],
    "note": None,
}
CO_LOCATED = [
    "tp2-timeslice",
    "tp2-mps",
    "tp2-mps-sm50-lowprio",
    "tp2-mps-guard5",
    "tp2-mps-guard-tp1",
    "tp2-mps-sm50-guard-tp1",
    "tp2-ep-mps",
    "tp2-mps-sm50-guard-19",
]
EP = ["--enable-expert-parallel"]
NCCL = ["--tp-all-reduce", "nccl"]


def _shape(spec, name):
    c = spec.condition(name)
    return (c.strategy, c.servers, c.options, c.gen, c.embed)


def test_the_closed_loop_spec_holds_every_condition_of_the_issue():
    assert CLOSED.baseline == "exclusive-tp1" and CLOSED.sweep is None
    both, gen, embed = ["gen", "embed"], ["gen"], ["embed"]
    tp2 = {"tp": 2}
    guard = {"slo_guard": True, "gen_tpot_slo_pct": 5.0}
    guard_ms = {"slo_guard": True, "gen_tpot_slo_ms": 18.0}  # under exclusive-tp1's TPOT
    capped = {**tp2, "active_thread_percentage": {"embed": 50}, "client_priority": {"embed": 1}}
    assert {c.name: _shape(CLOSED, c.name) for c in CLOSED.conditions} == {
        "exclusive-tp1": ("exclusive", both, {}, {}, {}),
        "tp2-gen-alone": ("tp+timeslice", gen, tp2, {}, {}),
        "tp2-embed-alone": ("tp+timeslice", embed, tp2, {}, {}),
        "tp2-timeslice": ("tp+timeslice", both, tp2, {}, {}),
        "tp2-mps": ("tp+mps", both, tp2, {}, {}),
        "tp2-mps-sm50-lowprio": ("tp+mps", both, capped, {}, {}),
        "tp2-mps-guard5": ("tp+mps", both, tp2, {}, guard),
        "tp2-mps-guard-tp1": ("tp+mps", both, tp2, {}, guard_ms),
        "tp2-mps-sm50-guard-tp1": ("tp+mps", both, capped, {}, guard_ms),
        "tp2-ep-gen-alone": ("tp+timeslice", gen, tp2, {"extra_args": EP}, {}),
        "tp2-ep-mps": ("tp+mps", both, tp2, {"extra_args": EP}, {}),
        "tp2-nccl-gen-alone": ("tp+timeslice", gen, tp2, {"extra_args": NCCL}, {}),
        "tp2-nccl-mps": ("tp+mps", both, tp2, {"extra_args": NCCL}, {}),
        "tp2-mps-sm50-guard-19": (
            "tp+mps",
            both,
            capped,
            {},
            {**guard_ms, "gen_tpot_slo_ms": 19.0},
        ),
    }
    assert all(c.gpus == ["0", "1"] for c in CLOSED.conditions)
    for c in CLOSED.conditions:  # the study's closed loop everywhere
        ld = c.load_for(CLOSED)
        assert (ld.gen_concurrency, ld.embed_concurrency, ld.embed_rate) == (512, 64, None)
        assert (ld.embed_batch, ld.warmup_s, ld.duration_s) == (8, 30, 60)
    assert len(CLOSED.schedule()) == 42


def test_the_equal_work_spec_offers_490_and_the_full_rate_to_the_same_conditions():
    names = ["exclusive-tp1", *CO_LOCATED]
    assert [c.name for c in EQUAL.conditions] == names and EQUAL.baseline == "exclusive-tp1"
    for name in names:  # the same condition as in the closed-loop spec, only the load differs
        assert _shape(EQUAL, name) == _shape(CLOSED, name)
        assert EQUAL.condition(name).gpus == ["0", "1"]
    points = EQUAL.sweep_conditions()
    assert [p.name for p in points] == [f"{n}.embed-r141" for n in names]
    for c in [*EQUAL.conditions, *points]:
        ld = c.load_for(EQUAL)
        rate = 141 if c.sweep else 61.25
        assert (ld.embed_rate, ld.embed_concurrency, ld.arrival) == (rate, 256, "poisson")
        assert (ld.gen_concurrency, ld.gen_rate, ld.embed_batch) == (512, None, 8)
        assert EQUAL.reps_of(c) == 3
        assert _shape(EQUAL, c.name) == _shape(CLOSED, c.sweep.base if c.sweep else c.name)
    assert EQUAL.load.embed_rate * EQUAL.load.embed_batch == 490
    assert EQUAL.sweep.rate == [141] and 141 * 8 == 1128  # the first look's dedicated embed
    assert len(EQUAL.schedule()) == 54


@pytest.mark.parametrize("spec", [CLOSED, EQUAL], ids=lambda s: s.name)
def test_two_h200s_pass_the_pre_flight(spec, monkeypatch):
    monkeypatch.setattr("coserve.experiment.preflight.ram_available", lambda: 256 << 30)
    assert problems(spec, spec.all_conditions(), TWO_H200) == []


def _launch(spec, name, tmp_path):
    """{role: (environment the strategy gives, the server's argv)} of condition `name`."""
    cond = spec.condition(name)
    strategy = make_strategy(cond.strategy, cond.gpus, cond.options, tmp_path)
    runner = Runner(spec, tmp_path / "run")
    out = {}
    for role in cond.servers:
        urls = {"gen": "http://127.0.0.1:9"} if role == "embed" else None
        server, _ = runner.server_spec(cond, role, strategy, urls)
        out[role] = (strategy.env_for(role), build_command(server, 8000))
    return out


def test_conditions_launch_the_servers_they_describe(tmp_path):
    serve = build_parser()
    dedicated = _launch(CLOSED, "exclusive-tp1", tmp_path)
    assert dedicated["gen"][0]["CUDA_VISIBLE_DEVICES"] == "0"
    assert dedicated["embed"][0]["CUDA_VISIBLE_DEVICES"] == "1"
    assert all("--tensor-parallel-size" not in argv for _, argv in dedicated.values())
    for name in [
        "tp2-gen-alone",
        "tp2-embed-alone",
        "tp2-nccl-gen-alone",
        "tp2-nccl-mps",
        *CO_LOCATED,
    ]:
        for role, (env, argv) in _launch(CLOSED, name, tmp_path).items():
            assert argv[argv.index("--tensor-parallel-size") + 1] == "2", (name, role)
            assert env["NCCL_NVLS_ENABLE"] == "0"
            assert ("--enable-expert-parallel" in argv) == (role == "gen" and "-ep-" in name)
            assert ("--slo-guard-gen-url" in argv) == (role == "embed" and "guard" in name)
            # the default all-reduce (symm-mem on GPUs) but for the NCCL pair's gen
            ar = argv[argv.index("--tp-all-reduce") + 1] if "--tp-all-reduce" in argv else None
            assert ar == ("nccl" if role == "gen" and "-nccl-" in name else None)
            args = serve.parse_args(argv[4:])  # `serve ROLE ...` knows every flag given
            assert misplaced(args, args.flag_kinds) is None  # and each is one for ROLE
    capped = _launch(CLOSED, "tp2-mps-sm50-lowprio", tmp_path)
    assert capped["embed"][0]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert capped["embed"][0]["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert not {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_CLIENT_PRIORITY"} & set(
        capped["gen"][0]
    )
    guard = _launch(CLOSED, "tp2-mps-guard5", tmp_path)["embed"][1]
    assert guard[guard.index("--gen-tpot-slo-pct") + 1] == "5"
