"""`coserve run --ray auto`: the demo spec on a local Ray on CPU leaves the run folder a local
run leaves; Ctrl-C cancels the reps in flight and leaves no process or scratch folder; and
`--resume` on Ray adds the missing reps to it."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import pytest
from test_server_util import descendants, running

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


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {".lock"}


def _running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended)."""
    return {p for p in pids if running(p)}


def _scratch() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("coserve-ray-*"))


def test_ray_run_cancelled_then_resumed_as_a_local_run(tmp_path):
    pytest.importorskip("ray")
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    scratch_before = _scratch()
    # side by side: Ray's start-up is mostly waiting
    ray_run = _start(on_ray, "--ray", "auto", "--no-report")
    local_run = _start(local, "--conditions", "gen-only", "--no-report")

    # Ctrl-C once the first rep is in: the others are cancelled, torn down and not written
    deadline = time.monotonic() + 240
    while not list(on_ray.glob("reps/*/rep-1/rep.json")):
        assert ray_run.poll() is None and time.monotonic() < deadline, "no rep finished"
        time.sleep(0.2)
    tree = descendants(ray_run.pid)  # Ray's processes, its workers and their servers
    assert tree
    ray_run.send_signal(signal.SIGINT)
    out, err = ray_run.communicate(timeout=180)
    assert ray_run.returncode == 130, out + err
    assert "interrupted: every server and daemon was stopped" in err
    deadline = time.monotonic() + 20
    while _running(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(tree), [Path(f"/proc/{p}/cmdline").read_bytes() for p in _running(tree)]
    assert _scratch() <= scratch_before
    kept = {p.parent.parent.name: p.read_text() for p in on_ray.glob("reps/*/rep-1/rep.json")}
    assert 1 <= len(kept) <= 2 and len(list(on_ray.glob("reps/*/rep-*"))) == len(kept)

    text = _wait(_start(on_ray, "--ray", "auto", "--resume"))
    n = 3 - len(kept)
    assert f"ray: {n} rep(s) for the cluster ({n} on CPUs, one at a time)" in text
    # CPU reps one after the other: side by side each would measure the other on the cores
    spans = sorted(
        (r["started"], r["finished"])
        for r in (json.loads(p.read_text()) for p in on_ray.glob("reps/*/rep-1/rep.json"))
        if r["condition"] not in kept
    )
    assert len(spans) == n and all(a[1] <= b[0] for a, b in pairwise(spans))
    for cond, record in kept.items():
        assert f"{cond} rep 1/1: finished earlier, skipped" in text
        assert (on_ray / "reps" / cond / "rep-1" / "rep.json").read_text() == record
    stats = aggregate(on_ray)
    assert [c.status for c in stats.conditions] == ["complete"] * 3
    assert stats.get("co-located").mean("embed_seq_s") > 0
    assert (on_ray / "report.md").exists() and "Missing or failed" not in (
        on_ray / "report.md"
    ).read_text()
    assert not list(on_ray.rglob("*.tmp"))

    # the same files as a local run, and the same record less where the rep ran
    _wait(local_run)
    rep = "reps/gen-only/rep-1"
    assert _files(on_ray / rep) == _files(local / rep)
    for name in ("spec.toml", "spec.json", "fingerprint.json"):
        assert (on_ray / name).exists() and (local / name).exists()
    assert (on_ray / "spec.json").read_text() == (local / "spec.json").read_text()
    rec = json.loads((on_ray / rep / "rep.json").read_text())
    loc = json.loads((local / rep / "rep.json").read_text())
    assert rec["status"] == "ok" and set(rec) == set(loc) | {"node"}
    assert rec["node"]["host"] == socket.gethostname() and rec["node"]["gpu_ids"] == []
    assert rec["node"]["node_id"] and rec["env"]["host"] == socket.gethostname()


def test_ray_missing_is_refused_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    from rich.console import Console

    text = io.StringIO()
    console = Console(file=text, width=200)
    code = execute(str(demo_spec_path()), str(tmp_path / "run"), ray="auto", console=console)
    assert code == 2
    assert "pip install 'coserve[ray]'" in text.getvalue()
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def gpu_ray():
    """A Ray in this process on a node declared with two GPUs of a model named T1 (Ray's own
    accounting; the machine has none). After the `--ray auto` test in file order: a `--ray
    auto` started meanwhile would join it."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=1,
        num_gpus=2,
        resources={"accelerator_type:T1": 1},
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def _execute(spec: Path, out: Path) -> tuple[int, str]:
    from rich.console import Console

    text = io.StringIO()
    code = execute(
        str(spec), str(out), ray="auto", report=False, console=Console(file=text, width=300)
    )
    return code, " ".join(text.getvalue().split())


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
name = "three-gpus"
servers = ["gen"]
gpus = ["0", "1", "2"]
[[conditions]]
name = "by-uuid"
servers = ["gen"]
gpus = ["GPU-0f0f0f0f-0000-0000-0000-000000000000"]
"""


def test_a_cluster_without_what_the_spec_needs_is_refused(tmp_path, gpu_ray):
    spec = tmp_path / "cuda.toml"
    spec.write_text(CUDA_SPEC)
    code, out = _execute(spec, tmp_path / "run")
    assert code == 2, out
    assert gpu_ray.is_initialized()  # a Ray the caller started is left running
    assert "the Ray cluster cannot run the spec" in out
    assert "three-gpus: needs 3 GPU(s) on one node; the most any has is 2" in out
    assert "by-uuid: gpus ['GPU-0f0f0f0f-0000-0000-0000-000000000000'] name GPUs by UUID" in out
    assert not (tmp_path / "run").exists()


TWO_GPU_SPEC = """
name = "two-gpus"
repetitions = 1
[servers.gen]
model = "tiny-dense"
[load]
warmup_s = 1
duration_s = 1
[[conditions]]
name = "tp-pair"
servers = ["gen"]
gpus = ["0", "1"]
"""


def test_a_task_gets_its_gpus_and_gpu_model_from_ray(tmp_path, gpu_ray):
    """The task asks for both GPUs, is pinned to the node's GPU model, runs on the GPU ids Ray
    gives it, and the node's own check (this machine has no GPU) fails the rep, which the
    driver records with its node."""
    spec = tmp_path / "two.toml"
    spec.write_text(TWO_GPU_SPEC)
    code, out = _execute(spec, tmp_path / "run")
    assert code == 1, out
    rec = json.loads((tmp_path / "run/reps/tp-pair/rep-1/rep.json").read_text())
    assert rec["status"] == "failed"
    assert rec["node"]["gpu_ids"] == ["0", "1"]
    assert rec["node"]["accelerator_type"] == "accelerator_type:T1"
    assert rec["error"].startswith(f"node {socket.gethostname()}: ")
    assert "gpus ['0', '1'] name GPUs this machine does not have" in rec["error"]


def test_ctrl_c_while_ray_starts_is_heard_even_from_a_background_shell(tmp_path):
    """`setsid cmd &` starts the run with SIGINT ignored; an interrupt while Ray is still
    starting (seconds) must stop it at once, write nothing and leave no Ray behind."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "coserve", "run", str(demo_spec_path()), "--out", str(out)]
        + ["--ray", "auto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: (os.setsid(), signal.signal(signal.SIGINT, signal.SIG_IGN)),
    )
    deadline = time.monotonic() + 60
    while not (tree := descendants(p.pid)):  # Ray's first processes: ray.init is under way
        assert p.poll() is None and time.monotonic() < deadline, "Ray never started"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stdout + stderr
    assert "interrupted: before the first rep; nothing was written" in stderr
    assert not out.exists()
    deadline = time.monotonic() + 20
    while _running(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(tree)


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("nonsense", "expected auto, HOST:PORT"),
        ("127.0.0.1:99999", "expected auto, HOST:PORT"),
        ("127.0.0.1:PORT", "nothing answers there"),
        ("ray://127.0.0.1:PORT", "nothing answers there"),
    ],
)
def test_a_ray_address_that_cannot_be_reached_is_refused_at_once(tmp_path, address, says):
    """ray.init retries an unreachable head for minutes and does not hear Ctrl-C meanwhile."""
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(tmp_path / "run", "--ray", address.replace("PORT", str(port)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert "refused: --ray" in err and says in err
    assert not (tmp_path / "run").exists()
