"""A CPU run's report speaks of the CPU, not of GPUs, and opens with a one-line verdict that
says why co-located gen can come out faster than gen alone there."""

from __future__ import annotations

import pytest
from test_experiment_runner import FakeBackend

from coserve.advise import advise
from coserve.advise import render as render_advice
from coserve.experiment import fingerprint
from coserve.experiment.runner import Runner
from coserve.report.aggregate import aggregate
from coserve.report.render import render
from coserve.spec import loads_spec

SPEC = """
name = "cpu"
repetitions = 1
[servers.gen]
model = "tiny-moe"
gpu_memory_utilization = 0.3
[servers.embed]
model = "all-minilm-l6-v2"
[load]
warmup_s = 1
duration_s = 2
[telemetry]
enabled = false
[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "embed-only"
servers = ["embed"]
[[conditions]]
name = "co-located"
strategy = "timeslice"
"""


class CoLocatedGenFaster(FakeBackend):
    def run_load(self, load, out_path, on_progress, dead=None):
        summary = super().run_load(load, out_path, on_progress, dead)
        if summary["gen"] and summary["embed"]:
            summary["gen"]["output_tokens_per_s"] *= 1.5
            summary["embed"]["sequences_per_s"] *= 1.5
        return summary


def test_a_cpu_run_is_labelled_cpu_and_has_a_verdict(tmp_path, monkeypatch):
    no_gpu = {"gpus": [], "driver": None, "cuda_driver": None, "note": "no GPU"}
    monkeypatch.setattr(
        fingerprint, "gpu_state", lambda: no_gpu
    )  # a CPU machine, even on a GPU one
    backend = CoLocatedGenFaster()
    backend.gpu_state = lambda: no_gpu
    Runner(loads_spec(SPEC), tmp_path / "run", backend=backend).run()
    md = render(tmp_path / "run", with_plots=False).markdown.read_text()
    (verdict,) = [ln for ln in md.splitlines() if ln.startswith("**Verdict:**")]
    assert verdict.startswith(
        "**Verdict:** throughput against each server alone: co-located: gen **+"
    )
    assert "measure how the OS schedules them, not how GPUs are shared" in verdict
    # the condition is named once, not "co-located (co-located)"
    assert "Gen came out faster sharing the cores (co-located) than alone" in verdict
    assert "Embed came out faster sharing the cores (co-located) than alone" in verdict
    assert verdict.count("(co-located)") == 2 and "co-located (co-located)" not in verdict
    assert "| co-located | CPU, shared | 1/1 |" in md and "| gen-only | CPU | 1/1 |" in md
    assert "| Condition | Strategy | Device |" in md
    assert "timeslice" not in md and "util " not in md and "| GPUs |" not in md
    # advise on the same folder says so too, rather than recommend a GPU strategy bare
    text = render_advice(advise(aggregate(tmp_path / "run"), 1e6))
    assert "These ran on a CPU" in text and "say nothing about sharing a GPU" in text
    embed_alone = aggregate(tmp_path / "run").get("embed-only").mean("embed_seq_s")
    far = render_advice(advise(aggregate(tmp_path / "run"), 1e6, 10 * embed_alone))
    assert f"Embed alone (embed-only) served {embed_alone:,.0f} seq/s" in far
    assert "is beyond anything it measured" in far
    assert "beyond anything" not in text  # no floor asked: nothing to say


def test_against_a_baseline_that_runs_both_servers_the_verdict_names_it(tmp_path):
    spec = loads_spec(
        SPEC.replace("repetitions = 1", 'repetitions = 1\nbaseline = "dedicated"')
        + '[[conditions]]\nname = "dedicated"\nstrategy = "timeslice"\n'
    )
    Runner(spec, tmp_path / "run", backend=CoLocatedGenFaster()).run()
    md = render(tmp_path / "run", with_plots=False).markdown.read_text()
    (verdict,) = [ln for ln in md.splitlines() if ln.startswith("**Verdict:**")]
    assert verdict.startswith(
        "**Verdict:** throughput, gen against dedicated; embed against embed-only: co-located: "
        "gen **"
    ), verdict
    assert "; dedicated (the gen baseline, not co-located): embed **" in verdict, verdict
    assert "dedicated: gen" not in verdict, verdict
    assert "each server alone" not in verdict
    assert (
        "Co-located gen at least the dedicated GPUs' (the study's criterion), with 95 % "
        "confidence: "
        "co-located: open (one rep: no CI)" in verdict
    ), verdict


class CoLocatedScaled(FakeBackend):
    """Gen of the condition named `co-located` at `factor` x the fake's figure (the dedicated
    GPUs' gen keeps it)."""

    factor = 1.0
    embed_factor = 1.0

    def run_load(self, load, out_path, on_progress, dead=None):
        summary = super().run_load(load, out_path, on_progress, dead)
        if "/co-located/" in str(out_path):
            if summary["gen"]:
                summary["gen"]["output_tokens_per_s"] *= self.factor
            if summary["embed"]:
                summary["embed"]["sequences_per_s"] *= self.embed_factor
        return summary


@pytest.mark.parametrize("factor, answer", [(2.0, "yes"), (0.5, "no")])
def test_the_study_criterion_is_answered_from_the_ci(tmp_path, factor, answer):
    spec = loads_spec(
        SPEC.replace("repetitions = 1", 'repetitions = 2\nbaseline = "dedicated"')
        + '[[conditions]]\nname = "dedicated"\nstrategy = "timeslice"\n'
    )
    backend = CoLocatedScaled()
    backend.factor = factor
    Runner(spec, tmp_path / "run", backend=backend).run()
    md = render(tmp_path / "run", with_plots=False).markdown.read_text()
    (verdict,) = [ln for ln in md.splitlines() if ln.startswith("**Verdict:**")]
    assert f"with 95 % confidence: co-located: {answer}. " in verdict, verdict


def test_the_study_criterion_says_when_the_embed_work_was_not_the_baselines(tmp_path):
    """The 18 ms guard on two H200s (2026-11-30) served 431 of the 499 seq/s the dedicated
    embed GPU did, and the verdict said only "yes"."""
    spec = loads_spec(
        SPEC.replace("repetitions = 1", 'repetitions = 2\nbaseline = "dedicated"')
        + '[[conditions]]\nname = "dedicated"\nstrategy = "timeslice"\n'
    )
    backend = CoLocatedScaled()
    backend.factor, backend.embed_factor = 2.0, 0.5
    Runner(spec, tmp_path / "run", backend=backend).run()
    md = render(tmp_path / "run", with_plots=False).markdown.read_text()
    (verdict,) = [ln for ln in md.splitlines() if ln.startswith("**Verdict:**")]
    assert (
        "with 95 % confidence: co-located: yes, at 50 % of dedicated's embed seq/s "
        "(not equal work). " in verdict
    ), verdict


def test_a_baseline_with_no_finished_rep_says_why_there_is_no_verdict(tmp_path):
    spec = loads_spec(
        SPEC.replace("repetitions = 1", 'repetitions = 1\nbaseline = "dedicated"').replace(
            '[[conditions]]\nname = "embed-only"\nservers = ["embed"]\n', ""
        )
        + '[[conditions]]\nname = "dedicated"\nstrategy = "timeslice"\n'
    )
    Runner(spec, tmp_path / "run", backend=FakeBackend(fail_at=("dedicated", 1))).run()
    md = render(tmp_path / "run", with_plots=False).markdown.read_text()
    (verdict,) = [ln for ln in md.splitlines() if ln.startswith("**Verdict:**")]
    assert verdict == (
        "**Verdict:** none: the conditions that ran both servers have no baseline to compare "
        "with (dedicated finished no rep)."
    ), verdict
