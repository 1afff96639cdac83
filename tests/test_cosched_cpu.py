"""The CPU twin of experiments/co-scheduling.toml: its own conditions (gen alone, embed
forwards of 512 tokens, the SLO guard at +5 % over gen alone, one colocated process) run for
real with tiny models on loopback; the guard's state lands in the rep's record and no embed
request fails."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from coserve.experiment.runner import Runner
from coserve.launch import free_port
from coserve.report.render import render
from coserve.spec import parse_spec

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "co-scheduling.toml"
TWIN = (
    "gen-only",
    "timeslice-grain512",
    "timeslice-guard5",
    "colocated-streams",
    "colocated-streams-guard5",
)
# The flags of the colocated command line that name the H200's models and sizes.
COLOCATED_CPU = {
    "--model": "tiny-dense",
    "--embed-model": "tiny-embed",
    "--device": "cpu",
    "--max-model-len": "128",
    "--embed-max-model-len": "128",
    "--max-num-seqs": "4",
}


def _colocated_on_cpu(cond: dict, embed_port: int) -> dict:
    args = list(cond["gen"]["extra_args"])
    for i, a in enumerate(args[:-1]):
        if a in COLOCATED_CPU:
            args[i + 1] = COLOCATED_CPU[a]
        elif a == "--embed-port":
            args[i + 1] = str(embed_port)
    return {
        **cond,
        "gen": {**cond["gen"], "extra_args": args},
        "embed": {**cond["embed"], "url": f"http://127.0.0.1:{embed_port}"},
    }


def cpu_twin() -> dict:
    """The H200 spec with tiny CPU servers and a short load; its conditions as they are
    (the colocated one's command line with the tiny models and a free port; the guard's
    warm-up long enough for its first probe)."""
    data = tomllib.loads(SPEC.read_text())
    data.update(name="co-scheduling-cpu", repetitions=1, telemetry={"enabled": False})
    data["servers"] = {
        "gen": {
            "model": "tiny-dense",
            "device": "cpu",
            "max_model_len": 128,
            "max_num_seqs": 4,
            "ready_timeout_s": 120,
        },
        "embed": {
            "model": "tiny-embed",
            "device": "cpu",
            "max_model_len": 128,
            "ready_timeout_s": 120,
        },
    }
    data["load"] = {
        "gen_concurrency": 2,
        "input_len": 8,
        "output_len": 16,
        "embed_rate": 10.0,
        "embed_concurrency": 16,
        "embed_batch": 4,
        "embed_input_len": 16,
        "arrival": "poisson",
        "warmup_s": 1,
        "duration_s": 2,
    }
    data["conditions"] = [
        _colocated_on_cpu(c, free_port()) if c["name"].startswith("colocated") else c
        for c in data["conditions"]
        if c["name"] in TWIN
    ]
    for c in data["conditions"]:
        if c["name"].endswith("guard5"):  # the guard measures gen alone in the first ~2.7 s
            c["load"] = {"warmup_s": 4}
    del data["sweep"]
    return data


def test_the_cpu_twin_runs_and_records_the_guard(tmp_path):
    spec = parse_spec(cpu_twin(), "co-scheduling-cpu")
    assert [c.name for c in spec.conditions] == list(TWIN)
    records = {r["condition"]: r for r in Runner(spec, tmp_path / "run").run()}
    for name, r in records.items():
        assert r["status"] == "ok", (name, r["error"])
    grain, guard = records["timeslice-grain512"], records["timeslice-guard5"]
    assert grain["servers"]["embed"]["max_num_batched_tokens"] == 512
    assert "slo_guard" not in grain
    g = guard["slo_guard"]
    assert g["polls_total"] > 0 and g["poll_errors_total"] == 0
    assert g["gen_alone_seconds"] > 0 and g["budget_seconds"] == pytest.approx(
        1.05 * g["gen_alone_seconds"]
    )
    assert g["throttled_seconds_total"] > 0  # embed waited through the first probe at least
    trace = [
        json.loads(line)
        for line in (tmp_path / "run/reps/timeslice-guard5/rep-1/slo_guard.jsonl").open()
    ]
    assert guard["slo_guard_trace"]["rows"] == len(trace) >= 3  # 1 s ticks over >= 6 s
    assert any(r.get("holding") == 1 for r in trace)  # the first probe, seen while it held
    render(tmp_path / "run")
    assert (tmp_path / "run/plots/guard.png").stat().st_size > 5000
    assert "(plots/guard.png)" in (tmp_path / "run/report.md").read_text()
    colocated = records["colocated-streams"]
    assert colocated["servers"]["gen"]["launcher"] == "command"
    # the one process's own guard, polling its own gen front, recorded like the embed server's
    own = records["colocated-streams-guard5"]["slo_guard"]
    assert own["polls_total"] > 0 and own["poll_errors_total"] == 0
    assert own["budget_seconds"] == pytest.approx(1.05 * own["gen_alone_seconds"])
    assert "slo_guard" not in colocated
    for r in (grain, guard, colocated, records["colocated-streams-guard5"]):
        assert r["bench"]["embed"]["completed"] > 0 and r["bench"]["embed"]["failed"] == 0
        assert r["bench"]["gen"]["completed"] > 0
