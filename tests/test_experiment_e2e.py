"""The runner for real on CPU: `coserve run` as a subprocess starting real `coserve serve`
processes with tiny presets. Ctrl-C keeps the finished reps and leaves no server behind;
`--resume` finishes the rest and writes the report; a changed spec is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TAG = f"e2e-{uuid.uuid4().hex[:8]}"  # in every server's command line, to find leftovers
SPEC = f"""
name = "e2e"
repetitions = 2
baseline = "a"
[servers.gen]
model = "tiny-dense"
random_weights = true
device = "cpu"
max_model_len = 128
max_num_seqs = 8
extra_args = ["--served-model-name", "{TAG}"]
ready_timeout_s = 60
[load]
gen_concurrency = 4
input_len = 8
output_len = 16
warmup_s = 0.5
duration_s = 1.5
[telemetry]
interval_s = 0.5
[[conditions]]
name = "a"
servers = ["gen"]
[[conditions]]
name = "b"
servers = ["gen"]
gen = {{ max_num_seqs = 4 }}
"""


def servers_left() -> list[int]:
    """pids of processes whose command line carries this test's tag."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if TAG.encode() in cmd:
            pids.append(int(p.name))
    return pids


def coserve(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "coserve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_interrupt_resume_and_refusal(tmp_path):
    spec = tmp_path / "e2e.toml"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    proc = coserve("run", str(spec), "--out", str(out))
    try:
        # rep a/1 finishes; then Ctrl-C while b/1's server is up and loaded
        wait_for(lambda: (out / "reps/a/rep-1/rep.json").exists(), 90, "rep a/1")
        log = out / "reps/b/rep-1/gen.log"
        wait_for(lambda: log.exists() and "ready at" in log.read_text(), 60, "b/1's server")
        assert servers_left(), "the server of b/1 should be running"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "--resume" in output
    assert not servers_left(), f"servers left after Ctrl-C: {servers_left()}"
    rec = json.loads((out / "reps/a/rep-1/rep.json").read_text())
    assert rec["status"] == "ok" and rec["bench"]["gen"]["completed"] > 0
    assert not (out / "reps/b/rep-1/rep.json").exists()

    # the same command again without --resume is refused; with a changed spec too
    refused = coserve("run", str(spec), "--out", str(out))
    text, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "add --resume" in text
    changed = tmp_path / "changed.toml"
    changed.write_text(SPEC.replace("duration_s = 1.5", "duration_s = 2.5"))
    refused = coserve("run", str(changed), "--out", str(out), "--resume")
    text, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "the spec differs" in text, text
    assert "load.duration_s: 1.5 -> 2.5" in text

    # --resume runs what is missing (b/1, a/2, b/2) and renders the report
    t0 = time.monotonic()
    done = coserve("run", str(spec), "--out", str(out), "--resume")
    text, _ = done.communicate(timeout=180)
    assert done.returncode == 0, text
    assert "a rep 1/2: finished earlier, skipped" in text
    assert json.loads((out / "reps/a/rep-1/rep.json").read_text()) == rec  # untouched
    for cond in ("a", "b"):
        for rep in (1, 2):
            r = json.loads((out / f"reps/{cond}/rep-{rep}/rep.json").read_text())
            assert r["status"] == "ok", r
            assert r["servers"]["gen"]["device"] == "cpu"
            assert r["bench"]["gen"]["output_tokens_per_s"] > 0
    assert not servers_left()
    md = (out / "report.md").read_text()
    assert "| a | CPU | 2/2 |" in md and "| b | CPU | 2/2 |" in md  # a CPU run: no GPU terms
    assert "baseline" in md and "(TPOT, ms)" in md
    assert time.monotonic() - t0 < 150
