"""experiments/device_run.sh, the way the study reached the H200: one call runs part of a
spec with shortened windows and archives the run folder under $OUT; the next call, given
that folder back, adds only the missing reps."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def call(cwd: Path, out: Path, conditions: str) -> subprocess.CompletedProcess:
    out.mkdir()
    return subprocess.run(
        [
            "bash",
            str(ROOT / "experiments/device_run.sh"),
            str(ROOT / "experiments/demo.toml"),
            "t",
            conditions,
            "1",
            "2",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            "OUT": str(out),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )


def test_two_calls_make_one_run_folder(tmp_path):
    # A `coserve serve` that is not this call's (another run on the machine) is not reported.
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "coserve serve decoy"]
    )
    try:
        first = call(tmp_path, tmp_path / "out1", "gen-only")
    finally:
        decoy.kill()
        decoy.wait()
    assert first.returncode == 0, first.stdout + first.stderr
    with tarfile.open(tmp_path / "out1/t.tgz") as tar:
        names = tar.getnames()
    assert ".runs/t/reps/gen-only/rep-1/rep.json" in names and ".runs/t.toml" in names
    short = (tmp_path / ".runs/t.toml").read_text()
    assert "warmup_s = 1\n" in short and "duration_s = 2\n" in short
    assert "left behind (should be empty):\n  nothing" in first.stdout

    second = call(tmp_path, tmp_path / "out2", "gen-only,embed-only")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "gen-only rep 1/1: finished earlier, skipped" in second.stdout
    assert "embed-only rep 1: ok" in second.stdout
    with tarfile.open(tmp_path / "out2/t.tgz") as tar:
        names = tar.getnames()
    assert {
        ".runs/t/reps/gen-only/rep-1/rep.json",
        ".runs/t/reps/embed-only/rep-1/rep.json",
    } <= set(names)


def test_wrong_arguments_say_how(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments/device_run.sh"), "x.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr
