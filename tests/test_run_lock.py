"""One run folder, one writer: a second `coserve run` into a folder another run is writing is
refused at once, naming the first one's PID, and the first goes on untouched."""

from __future__ import annotations

import json
import os
import time

import pytest
from runhelp import CoserveRun, tiny_spec

from coserve.experiment.rundir import FolderBusy, RunDir


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    first = RunDir(tmp_path / "run")
    with first.locked():
        with first.locked():  # re-entrant within one RunDir
            pass
        with (
            pytest.raises(FolderBusy, match=rf"pid {os.getpid()}\b"),
            RunDir(tmp_path / "run").locked(),
        ):
            pass
    with RunDir(tmp_path / "run").locked():  # released when its holder lets go
        pass
    assert RunDir(tmp_path / "run").is_empty()  # the lock file alone is not a run


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path):
    (tmp_path / "spec.toml").write_text(tiny_spec(duration_s=3))
    first = CoserveRun(["spec.toml", "--out", "out", "--no-report"], cwd=tmp_path)
    first.wait_for("warm-up and measurement")
    t0 = time.monotonic()
    second = CoserveRun(["spec.toml", "--out", "out", "--no-report", "--resume"], cwd=tmp_path)
    assert second.wait(timeout_s=30) == 2, second.output
    assert time.monotonic() - t0 < 15  # at once: no server started
    assert (
        f"pid {first.proc.pid}" in second.output
        and "being written by another coserve run" in second.output
    )
    assert first.wait(timeout_s=60) == 0, first.output
    record = json.loads((tmp_path / "out/reps/gen-only/rep-1/rep.json").read_text())
    assert record["status"] == "ok" and record["bench"]["gen"]["completed"] > 0
