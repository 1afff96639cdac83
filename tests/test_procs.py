"""procs: the SIGTERM hand-over between a daemon's SigtermExit and a run's own handler."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from coserve.procs import SigtermExit, free_port, group_alive, tail


@pytest.fixture(autouse=True)
def _default_sigterm():
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, old)


def test_sigterm_exits_while_held_and_waits_for_the_tear_down():
    held = SigtermExit()
    assert held.install() is None and held.installed
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM
    with pytest.raises(SystemExit), held.deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # held off until the tear-down is done
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_handler_already_there_is_left_alone():
    def runs(signo, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, runs)
    held = SigtermExit()
    held.install()
    assert not held.installed and signal.getsignal(signal.SIGTERM) is runs
    with held.deferred():
        pass
    assert signal.getsignal(signal.SIGTERM) is runs


def test_a_handler_installed_later_outlives_the_tear_down():
    held = SigtermExit()
    held.install()

    def runs(signo, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, runs)
    with held.deferred():
        pass
    assert signal.getsignal(signal.SIGTERM) is runs


def test_a_group_of_zombies_is_not_alive():
    # an ended child nobody has reaped yet: its group's id still answers kill(0)
    zombie = subprocess.Popen(["true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{zombie.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the child did not end")
        os.killpg(zombie.pid, 0)
        assert not group_alive(zombie.pid)
    finally:
        zombie.wait()
    running = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert group_alive(running.pid)
    finally:
        running.kill()
        running.wait()


def test_helpers(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing.log") == "(no log)"
    assert 0 < free_port() < 65536
    assert group_alive(os.getpgid(0)) and not group_alive(2**22 + 12345)
