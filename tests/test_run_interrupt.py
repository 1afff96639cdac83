"""Ctrl-C in a terminal is SIGINT to the whole foreground process group. A real `coserve run`
started the way a script starts one in the background (its own session, SIGINT inherited as
ignored) must stop within a few seconds of SIGINT to its group: the finished rep kept, the rep
in flight dropped, no process left."""

from __future__ import annotations

import os
import signal
import time

import pytest
from runhelp import CoserveRun, processes_in, tiny_spec

CONDITIONS = """
[[conditions]]
name = "first"
servers = ["gen"]
[[conditions]]
name = "second"
servers = ["gen"]
load = { duration_s = 120 }
"""


@pytest.mark.slow
def test_sigint_to_the_group_stops_the_run_and_keeps_finished_reps(tmp_path):
    (tmp_path / "spec.toml").write_text(tiny_spec(CONDITIONS))
    run = CoserveRun(["spec.toml", "--out", "out", "--no-report"], cwd=tmp_path)
    run.wait_for("second rep 1/1: warm-up and measurement")
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)
    rc = run.wait(timeout_s=20)
    took = time.monotonic() - t0
    assert rc == 130, run.output
    assert took < 10, f"took {took:.1f} s to stop"
    assert "interrupted:" in run.output and "1 of 2 reps are finished" in run.output
    rep = tmp_path / "out/reps"
    assert '"status": "ok"' in (rep / "first/rep-1/rep.json").read_text()
    assert not (rep / "second/rep-1/rep.json").exists()  # not finished: --resume runs it
    deadline = time.monotonic() + 5
    while processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in(tmp_path) == []
