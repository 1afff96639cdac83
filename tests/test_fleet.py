"""`coserve plan --fleet`: on a run folder of known numbers, sized by hand, and on the committed
H200 run folders in results/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from coserve.cli import main
from coserve.experiment.rundir import write_json
from coserve.fleet import Demand, plan_fleet
from coserve.report.aggregate import aggregate
from coserve.spec import loads_spec

RESULTS = Path(__file__).resolve().parent.parent / "results"
SINGLE_GPU = RESULTS / "nvidia-h200-2026-11-25" / "single-gpu"
EQUAL_WORK = RESULTS / "nvidia-h200-2026-11-29" / "equal-work"

SPEC = """
name = "fleet"
repetitions = 3
baseline = "gen-only"
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "all-minilm-l6-v2"
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "embed-only"
servers = ["embed"]
[[conditions]]
name = "timeslice"
[[conditions]]
name = "mps"
strategy = "mps"
gpus = ["0", "1"]
load = { embed_rate = 15 }
"""

# Per rep: gen tok/s, embed seq/s, gen TPOT p99 ms, embed latency p99 ms (None: role not run).
REPS = {
    "gen-only": [(990, None, 20, None), (1000, None, 20, None), (1010, None, 20, None)],
    "embed-only": [(None, 190, None, 50), (None, 200, None, 50), (None, 210, None, 50)],
    "timeslice": [(800, 150, 38, 80), (800, 150, 39, 80), (800, 150, 40, 80)],
    "mps": [(1600, 120, 45, 70)] * 3,  # two GPUs: 800 tok/s and 60 seq/s each
}
# t(0.975, df=2) x std 10 / sqrt(3): the half-width of a 95 % CI over 3 reps 10 apart
HALF = 4.302652729911275 * 10 / math.sqrt(3)


def _rep(cond: str, rep: int, gen, embed, tpot, lat) -> dict:
    bench = {}
    if gen is not None:
        bench["gen"] = {"output_tokens_per_s": gen, "tpot_ms": {"p99": tpot}}
    if embed is not None:
        bench["embed"] = {"sequences_per_s": embed, "latency_ms": {"p99": lat}}
    return {"condition": cond, "rep": rep, "status": "ok", "bench": bench}


def _make(d: Path, spec: str) -> Path:
    write_json(d / "spec.json", loads_spec(spec).to_dict())
    write_json(
        d / "fingerprint.json",
        {"gpus": [{"name": "Test GPU", "memory_mib": 1024}], "driver": "1"},
    )
    for cond, reps in REPS.items():
        for i, values in enumerate(reps, 1):
            write_json(d / "reps" / cond / f"rep-{i}" / "rep.json", _rep(cond, i, *values))
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("fleet") / "run", SPEC)


def test_hand_sized_fleet(run_dir):
    f = plan_fleet(aggregate(run_dir), Demand(10_000, 1_000, gen_tpot_p99_ms=40))
    ded = f.dedicated
    assert (ded.gen_condition, ded.embed_condition) == ("gen-only", "embed-only")
    # 10,000 / 1,000 = 10 gen GPUs; 1,000 / 200 = 5 embed GPUs
    assert (ded.gen_gpus.mean, ded.embed_gpus.mean, ded.total.mean) == (10, 5, 15)
    # CI low ends: 10,000 / (1,000 - HALF) = 10.25 -> 11; 1,000 / (200 - HALF) = 5.7 -> 6
    assert ded.gen_per_gpu.low == pytest.approx(1000 - HALF)
    assert (ded.total.most, ded.total.fewest) == (17, 15)
    by = {r.condition: r for r in f.colocated}
    ts = by["timeslice"]
    # max(ceil(10,000 / 800), ceil(1,000 / 150)) = max(13, 7); its throughputs have no spread
    assert (ts.gpus.mean, ts.gpus.most, ts.gpus.fewest) == (13, 13, 13)
    assert (ts.saving.gpus, ts.saving.least, ts.saving.most) == (2, 2, 4)
    assert ts.saving.pct == pytest.approx(100 * 2 / 15)
    # TPOT p99 39 ms at the mean, its CI reaching 41.5: met, flagged
    assert [c.verdict for c in ts.slos] == ["CI crosses"] and ts.meets
    mps = by["mps"]
    # a pair of GPUs does 1,600 tok/s and 120 seq/s: max(ceil(6.25), ceil(8.3)) = 9 pairs;
    # TPOT 45 > 40
    assert (mps.condition_gpus, mps.gpus.mean, mps.saving.gpus) == (2, 18, -3)
    assert mps.embed_per_gpu.mean == pytest.approx(60) and mps.open_loop == ["embed"]
    assert not mps.meets and [c.verdict for c in mps.slos] == ["misses"]
    assert f.best == "timeslice" and [r.condition for r in f.colocated] == ["timeslice", "mps"]
    assert "Test GPU" in f.caveat and "one machine" in f.caveat


def test_a_cpu_run_says_its_gpu_counts_say_nothing_about_gpus(tmp_path):
    """`coserve plan --fleet` on the demo's run folder sized 158 "GPUs" from CPU figures with
    only the one-machine caveat, where advise and the report say the CPU figures mean nothing
    for GPUs."""
    d = _make(tmp_path / "run", SPEC.split('[[conditions]]\nname = "mps"')[0])
    write_json(d / "fingerprint.json", {"gpus": [], "driver": None})
    f = plan_fleet(aggregate(d), Demand(10_000, 1_000))
    assert f.caveat.startswith("These ran on a CPU: ") and "say nothing about GPUs" in f.caveat
    assert "one machine" in f.caveat
    gpu = plan_fleet(aggregate(_make(tmp_path / "gpu", SPEC)), Demand(10_000, 1_000))
    assert "CPU" not in gpu.caveat


def test_an_open_loop_role_alone_marks_the_dedicated_fleet_and_its_savings(tmp_path, capsys):
    """Embed alone at a fixed rate measured what was offered, not its capacity: the dedicated
    embed GPUs are an upper bound, and a saving against them is no sizing."""
    spec = SPEC.replace(
        'name = "embed-only"\nservers = ["embed"]',
        'name = "embed-only"\nservers = ["embed"]\nload = { embed_rate = 25 }',
    )
    d = _make(tmp_path / "run", spec)
    f = plan_fleet(aggregate(d), Demand(10_000, 1_000))
    assert f.dedicated.open_loop == ["embed"]
    assert main(["plan", "--fleet", str(d), "--gen-tok-s", "10000", "--embed-seq-s", "1000"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "≥200" in out and "compares two upper bounds" in out
    closed = plan_fleet(aggregate(_make(tmp_path / "closed", SPEC)), Demand(10_000, 1_000))
    assert closed.dedicated.open_loop == []


def test_slos_on_each_role_and_an_unmeasured_one(run_dir):
    f = plan_fleet(aggregate(run_dir), Demand(10_000, 1_000, embed_p99_ms=75, gen_ttft_p99_ms=100))
    by = {r.condition: r for r in f.colocated}
    # embed latency 80 ms > 75 (timeslice), 70 <= 75 (mps); TTFT was never measured
    assert [(c.name, c.verdict) for c in by["timeslice"].slos] == [
        ("gen TTFT p99", "not measured"),
        ("embed latency p99", "misses"),
    ]
    assert by["mps"].slos[1].verdict == "meets" and not by["mps"].meets
    assert f.best is None
    # dedicated: gen-only is checked on gen's SLOs, embed-only (50 ms) on embed's
    assert [(c.condition, c.verdict) for c in f.dedicated.slos] == [
        ("gen-only", "not measured"),
        ("embed-only", "meets"),
    ]


def test_gen_alone_when_the_baseline_runs_both(tmp_path):
    spec = SPEC.replace('baseline = "gen-only"', 'baseline = "timeslice"')
    f = plan_fleet(aggregate(_make(tmp_path / "run", spec)), Demand(10_000, 1_000))
    assert (f.dedicated.gen_condition, f.dedicated.total.mean) == ("gen-only", 15)


def test_advise_and_the_fleet_take_the_same_embed_alone(tmp_path, capsys):
    """The first embed-only condition of the spec never ran; the second finished. advise took
    the spec's first (and so had no embed alone), the fleet the first measured: both now ask
    RunStats.alone."""
    spec = SPEC.replace(
        '[[conditions]]\nname = "embed-only"',
        '[[conditions]]\nname = "embed-cold"\nservers = ["embed"]\n'
        '[[conditions]]\nname = "embed-only"',
    )
    d = _make(tmp_path / "run", spec)  # REPS has no embed-cold: not run
    run = aggregate(d)
    assert run.get("embed-cold").status == "not run"
    assert (run.alone("embed").name, run.alone("gen").name) == ("embed-only", "gen-only")
    assert plan_fleet(run, Demand(10_000, 1_000)).dedicated.embed_condition == "embed-only"
    # nothing co-located serves 1,000 seq/s, nor did embed alone (200 seq/s)
    assert main(["advise", str(d), "--gen-tpot-p99-ms", "100", "--embed-seq-s", "1000"]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "Embed alone (embed-only) served 200 seq/s" in said
    assert main(["plan", "--fleet", str(d), "--gen-tok-s", "10000", "--embed-seq-s", "1000"]) == 0
    assert "embed-only" in capsys.readouterr().out


def test_demand_of_one_role_only(run_dir):
    f = plan_fleet(aggregate(run_dir), Demand(0, 1_000))
    assert (f.dedicated.gen_gpus.mean, f.dedicated.total.mean) == (0, 5)
    assert f.dedicated.gen_condition is None
    assert {r.condition: r.gpus.mean for r in f.colocated} == {"timeslice": 7, "mps": 18}


def test_committed_h200_single_gpu():
    """Closed loops: gen 24,069 tok/s alone, embed 1,132 seq/s alone; time-sliced 15,131 + 437,
    MPS 6,058 + 959 (stats.json)."""
    stats = json.loads((SINGLE_GPU / "stats.json").read_text())
    mean = {
        c["condition"]: {k: v["mean"] for k, v in c["metrics"].items()} for c in stats["conditions"]
    }
    f = plan_fleet(aggregate(SINGLE_GPU), Demand(1_000_000, 20_000, gen_tpot_p99_ms=60))
    gen_n = math.ceil(1e6 / mean["gen-only"]["gen_tok_s"])
    embed_n = math.ceil(2e4 / mean["embed-only"]["embed_seq_s"])
    assert (f.dedicated.gen_gpus.mean, f.dedicated.embed_gpus.mean) == (gen_n, embed_n) == (42, 18)
    by = {r.condition: r for r in f.colocated}
    ts = mean["timeslice"]
    assert by["timeslice"].gpus.mean == max(
        math.ceil(1e6 / ts["gen_tok_s"]), math.ceil(2e4 / ts["embed_seq_s"])
    )
    assert by["timeslice"].gpus.mean == 67 and by["timeslice"].saving.gpus == -7
    assert mean["mps"]["tpot_p99"] > 60 and not by["mps"].meets
    assert f.best == "timeslice" and "NVIDIA H200" in f.measured_on


def test_committed_h200_equal_work_has_no_embed_alone():
    f = plan_fleet(aggregate(EQUAL_WORK), Demand(1_000_000, 20_000))
    assert f.dedicated is None and "embed alone" in f.no_dedicated
    by = {r.condition: r for r in f.colocated}
    # embed ran open loop at 490 seq/s offered: its per-GPU figure is a floor
    assert by["mps"].open_loop == ["embed"] and by["mps"].saving is None
    assert by["mps"].gpus.mean == max(
        math.ceil(1e6 / by["mps"].gen_per_gpu.mean), math.ceil(2e4 / by["mps"].embed_per_gpu.mean)
    )


def test_cli_table_and_json(run_dir, capsys):
    args = ["plan", "--fleet", str(run_dir), "--gen-tok-s", "10000", "--embed-seq-s", "1000"]
    assert main([*args, "--gen-tpot-p99-ms", "40"]) == 0
    out = capsys.readouterr().out
    assert "Extrapolated from one machine's measurement" in out
    assert "timeslice, 13, 2 fewer than 15 dedicated" in " ".join(out.split())
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dedicated"]["total"] == {"mean": 15, "most": 17, "fewest": 15}
    assert d["colocated"][0]["condition"] == "timeslice" and d["colocated"][0]["meets"]
    # nothing meets a TPOT of 10 ms: exit 1
    assert main([*args, "--gen-tpot-p99-ms", "10"]) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--spec", "x.toml"], "--spec does not go with --fleet"),
        (["--embed-seq-s", "-1"], "--embed-seq-s: must be a number >= 0"),
        (["--gen-ttft-p99-ms", "0"], "--gen-ttft-p99-ms: must be a positive number"),
        (["--gen-tok-s", "1e308"], "--gen-tok-s: must be at most 1e+12"),
        (["--embed-seq-s", "1e11"], "--embed-seq-s: must be at most 1e+10"),
    ],
)
def test_cli_refuses_bad_input(run_dir, capsys, extra, message):
    args = ["plan", "--fleet", str(run_dir), "--gen-tok-s", "10", "--embed-seq-s", "1", *extra]
    assert main(args) == 2
    cap = capsys.readouterr()
    assert message in cap.out + cap.err


def test_cli_fleet_flags_need_fleet(tmp_path, capsys):
    assert main(["plan", "--gen-tok-s", "10"]) == 2
    assert "--gen-tok-s needs --fleet" in capsys.readouterr().out
    assert main(["plan", "--fleet", str(tmp_path), "--gen-tok-s", "1"]) == 2
    assert "--fleet needs --embed-seq-s" in capsys.readouterr().out
    assert main(["plan", "--fleet", str(tmp_path), "--gen-tok-s", "1", "--embed-seq-s", "1"]) == 2
    assert "not a coserve run folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_rep_with_a_non_finite_throughput_is_named_unreadable_not_a_traceback(
    tmp_path, capsys, value
):
    d = _make(tmp_path / "run", SPEC)
    # every rep of timeslice (800 tok/s), and gen-only's rep 2 (1000 tok/s)
    for path in [
        *(d / "reps" / "timeslice").glob("rep-*/rep.json"),
        d / "reps/gen-only/rep-2/rep.json",
    ]:
        text = path.read_text()
        for tok_s in ("800", "1000"):
            text = text.replace(
                f'"output_tokens_per_s": {tok_s}', f'"output_tokens_per_s": {value}'
            )
        path.write_text(text)
    args = ["plan", "--fleet", str(d), "--gen-tok-s", "10000", "--embed-seq-s", "1000"]
    code = main([*args, "--json"])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err
    f = json.loads(cap.out)
    assert "timeslice/rep-1/rep.json: bench.gen.output_tokens_per_s is" in f["unreadable"]
    assert [r["condition"] for r in f["colocated"]] == ["mps"]  # timeslice: nothing left to size
    # gen-only's reps 1 and 3 remain (990 and 1010 tok/s)
    assert f["dedicated"]["gen_per_gpu"]["mean"] == pytest.approx(1000)
    assert main(args) == 0
    assert "Warning: could not read" in capsys.readouterr().out


def test_a_vanishing_throughput_sizes_no_fleet_instead_of_overflowing(tmp_path):
    d = _make(tmp_path / "run", SPEC)
    for path in (d / "reps" / "mps").glob("rep-*/rep.json"):
        text = path.read_text().replace(
            '"output_tokens_per_s": 1600', '"output_tokens_per_s": 1e-300'
        )
        path.write_text(text)
    f = plan_fleet(aggregate(d), Demand(1e12, 1_000))  # 1e12 / 5e-301 overflows a float
    assert [r.condition for r in f.colocated] == ["timeslice"]


TP2_EQUAL = (
    Path(__file__).resolve().parent.parent / "results" / "nvidia-h200-x2-2026-11-30" / "tp2-equal"
)


def test_a_two_gpu_study_sizes_the_dedicated_fleet_from_its_exclusive_condition():
    # no condition ran gen or embed alone; exclusive-tp1 put each on a GPU of its own
    f = plan_fleet(aggregate(TP2_EQUAL), Demand(100_000, 2_000))
    d = f.dedicated
    assert f.no_dedicated is None and d.gen_condition == d.embed_condition == "exclusive-tp1"
    assert d.gen_per_gpu.mean == pytest.approx(26_534, rel=0.001)  # its one gen GPU's figure
    assert d.embed_per_gpu.mean == pytest.approx(500, rel=0.01)
    assert (d.gen_gpus.mean, d.embed_gpus.mean, d.total.mean) == (4, 4, 8)
    assert d.open_loop == ["embed"]  # 490 seq/s offered: a floor, not the GPU's capacity
    # it is the dedicated fleet, not one of the co-located ones
    assert "exclusive-tp1" not in [c.condition for c in f.colocated]
    assert [c.condition for c in f.colocated][0] == "tp2-symm-mps"


TP2_CLOSED = TP2_EQUAL.parent / "tp2-closed"
TP2_CLOSED_B = TP2_EQUAL.parent / "tp2-closed-b"


def test_the_dedicated_fleet_takes_each_role_where_it_did_most_per_gpu():
    # tp2-closed ran gen alone at TP=2 (34,173 tok/s on two GPUs: 17,087 per GPU) and
    # exclusive-tp1 (gen 26,711 on its one GPU); the dedicated fleet took the TP=2 figure and
    # came out 1.56x the GPUs a dedicated deployment at TP=1 needs
    d = plan_fleet(aggregate(TP2_CLOSED), Demand(1_000_000, 0)).dedicated
    assert d.gen_condition == "exclusive-tp1"
    assert d.gen_per_gpu.mean == pytest.approx(26_711, rel=0.001)
    assert d.gen_gpus.mean == math.ceil(1e6 / d.gen_per_gpu.mean) == 38
    # tp2-closed-b: embed alone at TP=2 did 1,699 seq/s on two GPUs, exclusive-tp1's embed
    # GPU 1,143 on one
    run = aggregate(TP2_CLOSED_B)
    assert run.alone("embed").name == "tp2-embed-alone"  # what advise quotes as embed alone
    d = plan_fleet(run, Demand(0, 20_000)).dedicated
    assert d.embed_condition == "exclusive-tp1"
    assert d.embed_per_gpu.mean == pytest.approx(1_143, rel=0.001)
    assert d.embed_gpus.mean == 18


PROFILE_TP2 = TP2_EQUAL.parent / "profile-tp2"


def test_a_condition_on_two_gpus_is_sized_in_pairs():
    """A TP=2 condition runs as a unit of its two GPUs: the fleet is whole units of it."""
    by = {
        r.condition: r for r in plan_fleet(aggregate(TP2_CLOSED_B), Demand(10_000, 500)).colocated
    }
    guard = by["tp2-mps-sm50-guard-tp1"]
    # 224 seq/s per GPU: 448 a pair; 500 seq/s needs 2 pairs (it was sized at 3 GPUs)
    assert guard.condition_gpus == 2 and guard.gpus.mean == 4
    assert all(r.gpus.mean % 2 == 0 for r in by.values())
    # embed only: 500 seq/s on tp2-mps (772 per GPU) is still one pair, not one GPU
    one = plan_fleet(aggregate(TP2_CLOSED_B), Demand(0, 500))
    assert {r.condition: r for r in one.colocated}["tp2-mps"].gpus.mean == 2
    # a dedicated gen deployment at TP=2 comes in pairs too
    d = plan_fleet(aggregate(PROFILE_TP2), Demand(10_000, 0)).dedicated
    assert d.gen_condition == "tp2-gen-alone" and d.gen_unit_gpus == 2
    assert (d.gen_gpus.mean, d.embed_gpus.mean, d.total.mean) == (2, 0, 2)


def test_the_deployments_note_quotes_a_row_of_this_fleet_and_only_when_one_spans_gpus():
    """The note read "78 (39 x 2): 39 of 2 GPUs each" under every fleet, one GPU per
    deployment (a CPU demo run) included: a fixed example read as a figure of the run."""
    from coserve.fleet_command import lines

    one = " ".join(lines(plan_fleet(aggregate(SINGLE_GPU), Demand(100_000, 1_000))))
    assert "whole deployments" not in one and "x 2" not in one, one
    pairs = plan_fleet(aggregate(TP2_CLOSED_B), Demand(10_000, 500))
    text = " ".join(lines(pairs))
    first = next(r for r in pairs.colocated if r.condition_gpus > 1)
    n = first.gpus.mean
    assert f"whole deployments of a condition's GPUs ({n} ({n // 2} x 2): {n // 2} of 2 " in text


def test_the_figures_study_md_quotes_for_tp2_closed_b():
    f = plan_fleet(aggregate(TP2_CLOSED_B), Demand(1_000_000, 20_000))
    by = {r.condition: r.gpus.mean for r in f.colocated}
    assert f.dedicated.total.mean == 56
    assert (by["tp2-mps-sm50-lowprio"], by["tp2-mps-sm50-guard-tp1"]) == (78, 90)


def _table(fleet) -> str:
    from rich.console import Console

    from coserve.fleet_command import render

    console = Console(width=400, record=True)
    render(fleet, console)
    return console.export_text()


def test_the_table_says_more_and_fewer_gpus_in_words_and_options_as_the_spec_writes_them(
    run_dir,
):
    out = _table(plan_fleet(aggregate(TP2_CLOSED_B), Demand(1_000_000, 20_000)))
    # 78 against 56 dedicated: 22 more, not "-22 (-39 %)"
    assert "22 more" in out and "(+39 %)" in out and "-22" not in out
    assert "22 more than 56 dedicated; 21..25 more over the CIs." in out
    assert "active_thread_percentage={ embed = 50 }" in out and "{'embed'" not in out
    assert "SLOs" not in out  # no SLO given: no column for them
    header = next(line for line in out.splitlines() if "fleet" in line and "per GPU" in line)
    assert header.rstrip().endswith("dedicated ┃")
    # the hand-sized folder: timeslice 13 GPUs against 15 dedicated
    hand = _table(plan_fleet(aggregate(run_dir), Demand(10_000, 1_000)))
    assert (
        "2 fewer" in hand
        and "(-13 %)" in hand
        and "2 fewer than 15 dedicated (13.3 %); 2..4 fewer" in hand
    )


def test_a_miss_shows_the_digits_that_make_it_one():
    # tp2-mps-sm50-lowprio's TPOT p99 is 20.05 ms: "20.0 ms" against <= 20 hid why it misses
    out = _table(plan_fleet(aggregate(TP2_CLOSED_B), Demand(1e6, 2e4, gen_tpot_p99_ms=20)))
    assert "misses: gen TPOT p99 20.05 > 20 ms" in out
    from coserve.advise import apart_text

    assert (apart_text(19.96, 20), apart_text(20.0004, 20), apart_text(40.31, 20)) == (
        "19.96",
        "20.0004",
        "40.3",
    )


def test_help_says_fleet_needs_both_demands(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "needs both --gen-tok-s and --embed-seq-s" in " ".join(capsys.readouterr().out.split())


def test_the_dedicated_fleet_takes_the_condition_needing_fewest_gpus_for_the_demand(tmp_path):
    """Gen alone on one GPU (1,000 tok/s) against gen alone on a pair (2,200: 1,100 per GPU):
    900 tok/s fits one GPU, though the pair does more per GPU; 2,100 tok/s needs three single
    GPUs or one pair. The dedicated fleet took the pair for both (the most per GPU)."""
    spec = loads_spec(
        """
name = "units"
repetitions = 3
[servers.gen]
model = "tiny-dense"
[servers.embed]
model = "all-minilm-l6-v2"
[[conditions]]
name = "gen-one"
servers = ["gen"]
[[conditions]]
name = "gen-pair"
servers = ["gen"]
gpus = ["0", "1"]
[[conditions]]
name = "timeslice"
"""
    )
    d = tmp_path / "run"
    write_json(d / "spec.json", spec.to_dict())
    write_json(d / "fingerprint.json", {"gpus": [{"name": "Test GPU", "memory_mib": 1}]})
    reps = {"gen-one": (1000, None), "gen-pair": (2200, None), "timeslice": (800, 150)}
    for cond, (gen, embed) in reps.items():
        for i in (1, 2, 3):
            rep = _rep(cond, i, gen + i - 2, embed, 20, None if embed is None else 50)
            write_json(d / "reps" / cond / f"rep-{i}" / "rep.json", rep)
    small = plan_fleet(aggregate(d), Demand(900, 0)).dedicated
    assert (small.gen_condition, small.gen_gpus.mean) == ("gen-one", 1)
    large = plan_fleet(aggregate(d), Demand(2_100, 0)).dedicated
    assert (large.gen_condition, large.gen_gpus.mean) == ("gen-pair", 2)
    # 3,000 tok/s: three singles beat two pairs; 2,000: two singles or one pair, a tie that
    # goes to the better rate per GPU
    assert plan_fleet(aggregate(d), Demand(3_000, 0)).dedicated.gen_condition == "gen-one"
    tie = plan_fleet(aggregate(d), Demand(2_000, 0)).dedicated
    assert (tie.gen_condition, tie.gen_gpus.mean) == ("gen-pair", 2)


def test_the_chosen_dedicated_condition_is_sized_once(monkeypatch):
    """Each condition a role ran alone on is sized once: the choice carries the chosen one's
    GPUs, rate and count to the report (the chosen one was sized again to report it)."""
    from coserve import fleet

    run = aggregate(TP2_CLOSED)
    calls = []
    sized = fleet._role_gpus
    monkeypatch.setattr(
        fleet, "_role_gpus", lambda cs, role: calls.append((cs.name, role)) or sized(cs, role)
    )
    d = plan_fleet(run, Demand(1_000_000, 2_000)).dedicated
    candidates = [(cs.name, role) for role in ("gen", "embed") for cs in run.on_own_gpus(role)]
    assert sorted(calls) == sorted(candidates)
    assert (d.gen_condition, d.gen_unit_gpus, d.gen_gpus.mean) == ("exclusive-tp1", 1, 38)
