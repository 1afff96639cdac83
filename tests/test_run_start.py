"""A run started from a folder that holds a `coserve/` folder (a clone's parent, say) still
runs the installed coserve in its servers: the working folder does not shadow the package."""

from __future__ import annotations

import json
import sys

import pytest
from runhelp import CoserveRun, tiny_spec

from coserve.launch import ServerSpec, build_command


def test_servers_start_with_the_working_folder_off_sys_path():
    cmd = build_command(ServerSpec(role="gen", model="tiny-dense"), 0)
    assert cmd[:4] == [sys.executable, "-P", "-m", "coserve"]


@pytest.mark.slow
def test_a_coserve_folder_in_the_working_folder_does_not_shadow_the_package(tmp_path):
    fake = tmp_path / "coserve"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('the fake coserve/ in the working folder was imported')\n"
    )
    (fake / "__main__.py").write_text(
        "raise SystemExit('the fake coserve/ in the working folder ran')\n"
    )
    (tmp_path / "spec.toml").write_text(tiny_spec())
    run = CoserveRun(["spec.toml", "--out", "out", "--no-report"], cwd=tmp_path)
    assert run.wait(timeout_s=120) == 0, run.output
    record = json.loads((tmp_path / "out/reps/gen-only/rep-1/rep.json").read_text())
    assert record["status"] == "ok", record["error"]
    assert record["bench"]["gen"]["completed"] > 0
