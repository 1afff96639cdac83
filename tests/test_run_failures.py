"""A failed rep says why: its summary (console and report.md) carries the server log's line
that names the cause, not the log's first line; a server that dies during the load is noticed
within about a second and fails the rep with its reason."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from runhelp import tiny_spec

from coserve import launch
from coserve.experiment.command import execute
from coserve.experiment.failure import why
from coserve.experiment.runner import Runner
from coserve.spec import loads_spec

CRASH = """
name = "crash"
repetitions = 1
[servers.gen]
launcher = "command"
extra_args = [
  "{python}", "-c",
  "print('loading'); import sys; sys.stdout.flush(); raise RuntimeError('the reason it failed')",
]
ready_timeout_s = 30
[load]
warmup_s = 0
duration_s = 1
[telemetry]
enabled = false
[[conditions]]
name = "gen-only"
servers = ["gen"]
"""


def test_why_quotes_the_cause_from_the_log_tail():
    error = (
        "gen server (builtin, pid 7) exited before /health answered, after 0.5 s (exit code 1); "
        "last lines of /r/gen.log:\n# coserve launch 2026 role=gen\n# cmd: python -m coserve\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "    raise AssertionError('Torch not compiled with CUDA enabled')\n"
        "AssertionError: Torch not compiled with CUDA enabled\nINFO exiting"
    )
    assert why(error) == (
        "gen server (builtin, pid 7) exited before /health answered, after 0.5 s "
        "(exit code 1): AssertionError: Torch not compiled with CUDA enabled (log: /r/gen.log)"
    )
    assert (
        why("no gen request completed inside the window")
        == "no gen request completed inside the window"
    )
    assert why(None) == ""
    refused = (
        "gen server (builtin, pid 8) exited before /health answered, after 1.0 s (exit code 2); "
        "last lines of /r/gen.log:\n# cmd: x\ncoserve serve: qwen3-30b-a3b needs at least 29.0 GiB"
    )
    assert why(refused).endswith(
        "(exit code 2): coserve serve: qwen3-30b-a3b needs at least 29.0 GiB (log: /r/gen.log)"
    )


def test_a_failed_reps_summary_names_the_cause(tmp_path, capsys):
    spec = tmp_path / "crash.toml"
    spec.write_text(CRASH.replace("{python}", sys.executable))
    assert execute(str(spec), str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "gen-only rep 1:" in ln and "RuntimeError" in ln)
    assert "RuntimeError: the reason it failed" in line
    report = (tmp_path / "out/report.md").read_text()
    row = next(ln for ln in report.splitlines() if "rep 1 failed" in ln)
    assert "RuntimeError: the reason it failed" in row and "# coserve launch" not in row


@pytest.mark.slow
def test_a_server_that_dies_mid_rep_fails_it_within_a_second(tmp_path):
    spec = loads_spec(tiny_spec(duration_s=60))
    killed_at: list[float] = []

    class KillDuringLoad:
        """Progress stand-in: once the load runs, kill the gen server's whole group."""

        def phase(self, name):
            if name == "warm-up and measurement":
                threading.Timer(1.0, self.kill).start()

        def kill(self):
            (server,) = launch.live_servers()
            killed_at.append(time.monotonic())
            os.killpg(server.pgid, signal.SIGKILL)

        def __getattr__(self, name):
            return lambda *a, **k: None

    runner = Runner(spec, tmp_path / "out", progress=KillDuringLoad())
    (record,) = runner.run()
    assert killed_at and record["status"] == "failed"
    assert "gen server" in record["error"] and "died (killed by SIGKILL)" in record["error"]
    # killed 1 s into the load: stopped after about another second, not after the 60 s window
    assert record["phases_s"]["load"] < 5
    assert why(record["error"]).startswith(
        f"gen server (builtin, pid {record['servers']['gen']['pid']}) "
        f"died (killed by SIGKILL) (log: "
    )


def test_a_load_error_waits_briefly_for_the_server_that_caused_it():
    """The suite on a loaded machine (2026-12-01): a gen server killed mid-load closed its
    socket before its process could be reaped, so the rep's error read "cannot reach the gen
    server" instead of naming the server's death. A failed load now waits up to
    DEATH_GRACE_S for a server to be found dead, and names it."""
    from coserve.experiment.rep import DEATH_GRACE_S, first_dead_within

    class Dying:
        proc = object()  # a process the run started: only its death is worth waiting for

        def __init__(self, after_s):
            self.at = time.monotonic() + after_s

        def check(self):
            if time.monotonic() >= self.at:
                raise RuntimeError("gen server (builtin, pid 1) died (killed by SIGKILL)")

    assert first_dead_within([Dying(0.3)], DEATH_GRACE_S).endswith("(killed by SIGKILL)")
    t = time.monotonic()
    assert first_dead_within([Dying(60)], 0.2) is None
    assert 0.2 <= time.monotonic() - t < 1.0
    external = Dying(60)
    external.proc = None  # a server the run did not start: answered at once
    t = time.monotonic()
    assert first_dead_within([external], DEATH_GRACE_S) is None
    assert time.monotonic() - t < 0.1
