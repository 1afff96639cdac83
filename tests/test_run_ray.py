"""`coserve run --ray auto`: the demo spec on a local Ray on CPU leaves the run folder a local
run leaves, and `--resume` on Ray adds the missing reps to it."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coserve.demo import demo_spec_path
from coserve.experiment.command import execute
from coserve.report.aggregate import aggregate

pytestmark = pytest.mark.slow


def _start(out: Path, *args: str) -> subprocess.Popen:
    # RAY_ADDRESS would send `auto` to another cluster: the test wants a local one of its own
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "coserve", "run", str(demo_spec_path()), "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


def _wait(proc: subprocess.Popen) -> str:
    """stdout and stderr of a run that must succeed."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    return out + err


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} - {".lock"}


def test_ray_run_then_resume_as_a_local_run(tmp_path):
    pytest.importorskip("ray")
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    # side by side: Ray's start-up is mostly waiting
    ray_run = _start(on_ray, "--ray", "auto", "--conditions", "gen-only", "--no-report")
    local_run = _start(local, "--conditions", "gen-only", "--no-report")
    assert "ray: 1 rep(s) sent to the cluster" in _wait(ray_run)
    _wait(local_run)

    # the same files, and the same record less where the rep ran
    assert _files(on_ray) == _files(local)
    first = (on_ray / "reps/gen-only/rep-1/rep.json").read_text()
    rec, loc = json.loads(first), json.loads((local / "reps/gen-only/rep-1/rep.json").read_text())
    assert rec["status"] == "ok" and set(rec) == set(loc) | {"node"}
    assert rec["node"]["host"] == socket.gethostname() and rec["node"]["gpu_ids"] == []
    assert rec["node"]["node_id"] and rec["env"]["host"] == socket.gethostname()
    assert (on_ray / "spec.json").read_text() == (local / "spec.json").read_text()
    assert set(json.loads((on_ray / "fingerprint.json").read_text())) == set(
        json.loads((local / "fingerprint.json").read_text())
    )

    text = _wait(_start(on_ray, "--ray", "auto", "--resume"))
    assert "gen-only rep 1/1: finished earlier, skipped" in text
    assert "ray: 2 rep(s) sent to the cluster" in text
    assert (on_ray / "reps/gen-only/rep-1/rep.json").read_text() == first
    stats = aggregate(on_ray)
    assert [c.status for c in stats.conditions] == ["complete"] * 3
    assert stats.get("co-located").mean("embed_seq_s") > 0
    assert (on_ray / "report.md").exists() and "Missing or failed" not in (
        on_ray / "report.md"
    ).read_text()
    assert not list(on_ray.rglob("*.tmp"))


def test_ray_missing_is_refused_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    from rich.console import Console

    text = io.StringIO()
    console = Console(file=text, width=200)
    code = execute(str(demo_spec_path()), str(tmp_path / "run"), ray="auto", console=console)
    assert code == 2
    assert "pip install 'coserve[ray]'" in text.getvalue()
    assert not (tmp_path / "run").exists()


CUDA_SPEC = """
name = "cuda"
repetitions = 1
[servers.gen]
model = "tiny-dense"
device = "cuda"
[load]
warmup_s = 1
duration_s = 1
[[conditions]]
name = "one-gpu"
servers = ["gen"]
[[conditions]]
name = "by-uuid"
servers = ["gen"]
gpus = ["GPU-0f0f0f0f-0000-0000-0000-000000000000"]
"""


def test_a_cluster_without_what_the_spec_needs_is_refused(tmp_path):
    ray = pytest.importorskip("ray")
    from rich.console import Console

    spec = tmp_path / "cuda.toml"
    spec.write_text(CUDA_SPEC)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        text = io.StringIO()
        console = Console(file=text, width=300)
        code = execute(str(spec), str(tmp_path / "run"), ray="auto", console=console)
        # a Ray the caller started is left running
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    out = " ".join(text.getvalue().split())
    assert code == 2, out
    assert "the Ray cluster cannot run the spec" in out
    assert "one-gpu: needs 1 GPU(s) on one node; the most any has is 0" in out
    assert "by-uuid: gpus ['GPU-0f0f0f0f-0000-0000-0000-000000000000'] name GPUs by UUID" in out
    assert not (tmp_path / "run").exists()
