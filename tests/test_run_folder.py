"""What `coserve run` may do with its --out folder: a dry run refuses a folder the run would
refuse, with the same words and exit code, and `--resume` where there is no run to finish is
refused instead of starting one."""

from __future__ import annotations

import os

import pytest
from test_experiment_runner import FakeBackend

from coserve.cli import main
from coserve.experiment import runner as runner_mod

SPEC = """
name = "folder"
repetitions = 1
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
    return str(path)


def refused(capsys) -> str:
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("refused:")]
    return line


def run(spec, out, *extra) -> int:
    return main(["run", spec, "--out", str(out), "--no-report", *extra])


def test_a_dry_run_into_a_folder_holding_a_run_is_refused_as_the_run_is(spec, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(spec, out) == 0
    capsys.readouterr()
    # the dry run said 0 here, the run then refused
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and f"{out} already holds a run" in dry and "--resume" in dry
    assert run(spec, out, "--dry-run", "--resume") == 0  # what the refusal asks for passes


def test_a_dry_run_into_a_folder_of_other_files_is_refused_as_the_run_is(spec, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and "not a coserve run folder" in dry
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_a_dry_run_into_a_file_is_refused_as_the_run_is(spec, tmp_path, capsys):
    # the dry run was a NotADirectoryError traceback
    out = tmp_path / "out"
    out.write_text("x")
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and f"cannot use {out} as the run folder: Not a directory" in dry
    assert out.read_text() == "x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_dry_run_into_a_folder_that_cannot_be_made_is_refused_as_the_run_is(spec, capsys):
    # the dry run said 0 for /proc/nope (no folder can be made there, even by root), the run 2
    out = "/proc/nope/run"
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and f"cannot use {out} as the run folder" in dry
    assert "--out" in dry and not os.path.exists("/proc/nope")


def test_a_dry_run_leaves_no_folder_behind(spec, tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    assert run(spec, out, "--dry-run") == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "spec.toml"]


def test_a_dry_run_keeps_an_empty_folder_and_a_lock_left_there(spec, tmp_path):
    empty, stale = tmp_path / "empty", tmp_path / "stale"
    empty.mkdir()
    stale.mkdir()
    (stale / ".lock").write_text("4242\n")  # a finished run's lock: the folder counts as empty
    assert run(spec, empty, "--dry-run") == 0 and run(spec, stale, "--dry-run") == 0
    assert list(empty.iterdir()) == [] and (stale / ".lock").read_text() == "4242\n"


def test_a_dry_run_where_the_lock_is_a_folder_is_refused_as_the_run_is(spec, tmp_path, capsys):
    # the dry run said 0, taking the folder for another run's lock; the run then refused
    out = tmp_path / "out"
    (out / ".lock").mkdir(parents=True)
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and "Is a directory" in dry and "--out" in dry
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_resume_where_there_is_no_run_is_refused(spec, tmp_path, capsys, made, dry):
    # it started a fresh run, silently
    out = tmp_path / "out"
    if made:
        out.mkdir()
    assert run(spec, out, "--resume", *dry) == 2
    assert f"nothing to resume in {out}" in refused(capsys)
    assert (list(out.iterdir()) == []) if made else not out.exists()


def test_resume_needs_out(spec, capsys):
    assert main(["run", spec, "--dry-run", "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err


def test_an_out_through_a_missing_folder_and_back_is_the_folder_it_names(spec, tmp_path, capsys):
    # the dry run said 0 for a/missing/.. (no such place yet); the run then made a/missing,
    # wrote a lock into a, and refused a as not empty, leaving both behind
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("x")
    out = tmp_path / "a" / "missing" / ".."
    assert run(spec, out, "--dry-run") == 2
    dry = refused(capsys)
    assert run(spec, out) == 2
    assert refused(capsys) == dry and f"{tmp_path / 'a'} exists and is not a coserve run" in dry
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["precious.txt"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["report", ""], "DIR"),
        (["advise", "", "--gen-tpot-p99-ms", "20"], "RUN_DIR"),
        (["plan", "--fleet", "", "--gen-tok-s", "1", "--embed-seq-s", "0"], "--fleet"),
    ],
)
def test_an_empty_run_folder_to_read_is_refused_naming_it(argv, flag, capsys):
    # '' was read as the current folder
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run SPEC", "demo", "profile SPEC", "bench"])
def test_an_empty_out_is_refused_naming_the_flag(spec, command, capsys):
    # '' was read as the current folder by run and profile, and as no --out by bench
    argv = [a.replace("SPEC", spec) for a in command.split()]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", ""])
    assert e.value.code == 2 and "argument --out: must not be empty" in capsys.readouterr().err
