"""`coserve profile` (and `coserve run --conditions`) with arguments a careless user gives:
each is refused before a run folder is made, exit 2, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "experiments" / "demo.toml")


@pytest.mark.parametrize("value", [",", " , ", ""])
def test_a_condition_list_naming_none_is_refused(tmp_path, capsys, value):
    """It ran nothing and exited 0 with an empty report."""
    from coserve.cli import main

    out = tmp_path / "run"
    assert main(["profile", DEMO, "--condition", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--condition: no condition named" in err and "gen-only, embed-only" in err
    assert not out.exists()


def test_an_unknown_condition_is_refused_naming_the_flag_profile_has(tmp_path, capsys):
    """The refusal said `--conditions` (coserve run's flag), which profile does not have."""
    from coserve.cli import main

    out = tmp_path / "run"
    assert main(["profile", DEMO, "--condition", "gen-only,nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--condition: nope not in the spec" in err and "--conditions" not in err
    assert not out.exists()


def test_run_with_a_condition_list_naming_none_is_refused(tmp_path, capsys):
    from coserve.cli import main
    from coserve.experiment.runner import Runner, RunRefused
    from coserve.spec import load_spec

    with pytest.raises(RunRefused, match="no condition named"):
        Runner(load_spec(DEMO), tmp_path / "r", only=[])
    out = tmp_path / "run"
    for value in (",", ""):
        assert main(["run", DEMO, "--conditions", value, "--out", str(out)]) == 2
        assert "no condition named" in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--execute"],
        ["--kernel-name", "rms"],
        ["--launch-skip", "3"],
        ["--launch-count", "2"],
        ["--section", "MemoryWorkloadAnalysis"],
        ["--cache-control", "all"],
    ],
)
def test_ncu_flags_without_ncu_are_refused(tmp_path, capsys, flags):
    """They were ignored: `--execute` alone ran a torch-profiler run instead of ncu."""
    from coserve.cli import main

    out = tmp_path / "run"
    assert main(["profile", DEMO, "--condition", "gen-only", *flags, "--out", str(out)]) == 2
    assert f"{flags[0]} needs --ncu" in capsys.readouterr().err
    assert not out.exists()


def test_a_kernel_name_that_is_not_a_regex_is_refused(tmp_path, capsys):
    """ncu would have been started around the whole run only to reject it."""
    from coserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", DEMO, "--condition", "gen-only", "--ncu", "--kernel-name", "(rms"])
    assert e.value.code == 2
    assert "--kernel-name: not a regular expression" in capsys.readouterr().err
    # an empty one was dropped: every kernel profiled, unasked
    with pytest.raises(SystemExit) as e:
        main(["profile", DEMO, "--condition", "gen-only", "--ncu", "--kernel-name", ""])
    assert e.value.code == 2 and "--kernel-name: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "--foo", "a b", "$(touch /tmp/pwned)", "Memory;ls", "é"])
def test_a_section_that_is_not_an_ncu_identifier_is_refused(tmp_path, capsys, name):
    """It was passed on to ncu (with --execute, after the run's servers were up); `--foo` was
    read by ncu as an option of its own."""
    from coserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", DEMO, "--condition", "gen-only", "--ncu", f"--section={name}"])
    assert e.value.code == 2
    assert "--section: not an ncu section identifier" in capsys.readouterr().err
    argv = ["profile", DEMO, "--condition", "gen-only", "--ncu", "--out", str(tmp_path / "o")]
    assert (
        main([*argv, "--section", "MemoryWorkloadAnalysis_Tables", "--section", "Occupancy"]) == 0
    )
    assert "--section MemoryWorkloadAnalysis_Tables --section Occupancy " in capsys.readouterr().out


def test_resume_on_reps_run_without_the_profiler_is_refused(tmp_path, capsys):
    """`coserve run`'s finished reps counted as done: nothing was profiled, an empty table
    and exit 0."""
    from coserve.cli import main
    from coserve.experiment.rundir import write_json

    out = tmp_path / "run"
    rep = out / "reps" / "gen-only" / "rep-1"
    rep.mkdir(parents=True)
    write_json(rep / "rep.json", {"condition": "gen-only", "rep": 1, "status": "ok"})
    argv = ["profile", DEMO, "--condition", "gen-only,embed-only", "--out", str(out)]
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "gen-only rep 1 finished without the profiler" in err and "another --out" in err
    assert not (rep / "profile").exists() and not (out / "reps" / "embed-only").exists()


def test_ncu_execute_into_a_file_is_refused(tmp_path, capsys, monkeypatch):
    """It was a NotADirectoryError traceback from mkdir, exit 1."""
    from coserve.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ncu").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "ncu").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    out = tmp_path / "a-file"
    out.write_text("")
    argv = ["profile", DEMO, "--condition", "gen-only", "--ncu", "--execute", "--out", str(out)]
    assert main(argv) == 2
    assert f"cannot use {out} for the ncu report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,said",
    [
        ("--launch-skip", "-1", "must be an integer in [0, 2**63) (ncu's counter), got -1"),
        ("--launch-skip", str(1 << 63), "must be an integer in [0, 2**63)"),  # 64-bit counter
        ("--launch-count", "0", "must be an integer in [1, 2**63) (ncu's counter), got 0"),
        ("--launch-count", "99999999999999999999999", "must be an integer in [1, 2**63)"),
        ("--launch-count", "1.5", "must be an integer in [1, 2**63) (ncu's counter), got 1.5"),
    ],
)
def test_ncu_launch_counts_out_of_range_are_refused(capsys, flag, value, said):
    from coserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", DEMO, "--condition", "gen-only", "--ncu", flag, value])
    assert e.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err
