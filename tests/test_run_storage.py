"""A run folder that cannot be written (read-only, full disk during a rep or the report) stops
the run with one clear line: no traceback, no `*.tmp` left, the finished reps kept and the
run resumable."""

from __future__ import annotations

import errno
import os

import pytest
from test_experiment_runner import FakeBackend

from coserve.experiment import rundir as rundir_mod
from coserve.experiment import runner as runner_mod
from coserve.experiment.command import execute

SPEC = """
name = "disk"
repetitions = 2
[servers.gen]
model = "tiny-dense"
[load]
warmup_s = 1
duration_s = 2
[telemetry]
enabled = false
[[conditions]]
name = "gen-only"
servers = ["gen"]
"""


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "Backend", FakeBackend)
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def full_disk_at(monkeypatch, name: str, after: int = 0) -> None:
    """os.replace onto a file called `name` fails with ENOSPC (after `after` successes)."""
    real = os.replace
    seen = []

    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == name:
            seen.append(dst)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(rundir_mod.os, "replace", replace)


def temporaries(folder):
    return sorted(str(p) for p in folder.rglob("*.tmp"))


def one_line(err: str, start: str) -> str:
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith(start)]
    return line


@pytest.mark.parametrize("name", ["bench.json", "rep.json"])  # during the load; the rep's record
def test_a_full_disk_during_a_rep_stops_the_run_and_it_resumes(
    spec, tmp_path, monkeypatch, capsys, name
):
    out = tmp_path / "out"
    full_disk_at(monkeypatch, name, after=1)
    assert execute(str(spec), str(out), report=False) == 1
    line = one_line(capsys.readouterr().err, "stopped:")
    assert (
        "No space left on device" in line
        and "1 of 2 reps are finished" in line
        and "--resume" in line
    )
    assert temporaries(out) == []
    monkeypatch.undo()
    monkeypatch.setattr(runner_mod, "Backend", FakeBackend)
    assert execute(str(spec), str(out), resume=True, report=False) == 0
    assert "finished earlier, skipped" in capsys.readouterr().err
    assert len(list(out.glob("reps/*/rep-*/rep.json"))) == 2


class FullDuringTheLoad(FakeBackend):
    """As the bench's own writer on a full disk: a temporary file half written, then ENOSPC."""

    def run_load(self, load, out_path, on_progress, dead=None):
        if len(self.loads) == 1:
            (out_path.parent / "bench.records.jsonl.tmp").write_text('{"partial')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().run_load(load, out_path, on_progress, dead)


def test_temporaries_a_failed_write_left_are_removed(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_mod, "Backend", FullDuringTheLoad)
    out = tmp_path / "out"
    assert execute(str(spec), str(out), report=False) == 1
    assert "No space left on device" in one_line(capsys.readouterr().err, "stopped:")
    assert temporaries(out) == []


def test_a_full_disk_during_the_report_says_so_in_one_line(spec, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    full_disk_at(monkeypatch, "report.md")
    assert execute(str(spec), str(out)) == 1
    line = one_line(capsys.readouterr().err, "report not written:")
    assert "No space left on device" in line and f"coserve report {out}" in line
    assert temporaries(out) == []
    assert len(list(out.glob("reps/*/rep-*/rep.json"))) == 2  # the reps are kept


def test_a_read_only_file_system_refuses_at_once(spec, tmp_path, monkeypatch, capsys):
    real = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "out")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(rundir_mod.os, "open", read_only)
    assert execute(str(spec), str(tmp_path / "out")) == 2
    line = one_line(capsys.readouterr().err, "refused:")
    assert "Read-only file system" in line and str(tmp_path / "out") in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_refuses_at_once(spec, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert execute(str(spec), str(parent / "out")) == 2
    finally:
        parent.chmod(0o755)
    line = one_line(capsys.readouterr().err, "refused:")
    assert "Permission denied" in line


def test_an_out_that_is_a_regular_file_refuses_at_once(spec, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    assert execute(str(spec), str(afile)) == 2
    line = one_line(capsys.readouterr().err, "refused:")
    assert f"cannot use {afile} as the run folder" in line
    assert afile.read_text() == "not a folder\n"
