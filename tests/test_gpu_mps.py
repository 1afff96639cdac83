"""coserve's own MPS control daemon, driven through a stand-in `nvidia-cuda-mps-control`
(coserve.gpu.fake_mps) that speaks the same commands: start, get_server_list, tear-down on normal
exit, on an exception (a model server that crashed), on SIGTERM and Ctrl-C; foreign daemons
refused and left alone. The real daemon is exercised by tests/test_gpu_device.py on a GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coserve.gpu import mps
from coserve.gpu.fake_mps import install_fake_mps_control
from coserve.gpu.strategies import StrategyError, make_strategy
from coserve.launch import ServerFailed
from coserve.procs import pid_alive


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    install_fake_mps_control(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def ours(root: Path) -> list[mps.MpsProcess]:
    """MPS processes (fake ones included) started for the run folder `root`."""
    out = []
    for p in mps.find_mps_processes():
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if (
            f"CUDA_MPS_LOG_DIRECTORY={root}".encode() in env
            or f"CUDA_MPS_PIPE_DIRECTORY={root}".encode() in env
        ):
            out.append(p)
    return out


def wait_gone(root: Path, timeout_s: float = 10) -> list[mps.MpsProcess]:
    deadline = time.monotonic() + timeout_s
    while (left := ours(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_daemon_lifecycle_private_dirs_and_server_list(fake_bin, tmp_path):
    run = tmp_path / "run"
    with make_strategy("mps", ["0"], {"active_thread_percentage": {"embed": 50}}, run) as s:
        d = s.daemon
        assert d.running and os.getpgid(d.proc.pid) == d.proc.pid  # own process group/session
        # private dirs: under the run folder (a short one under /tmp where the socket path
        # would be too long)
        assert d.pipe_dir == run / "mps" / "pipe" or d.pipe_dir.name.startswith("coserve-mps-")
        assert d.log_dir == run / "mps" / "log"
        assert (d.pipe_dir / mps.MARKER).exists()
        servers = d.get_server_list()
        assert servers and servers == d.server_pids
        env = s.env_for("embed")
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(d.log_dir)
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
        kinds = sorted(p.kind for p in ours(run))
        assert kinds == ["control", "server"]
        desc = s.describe()["mps"]
        assert desc["server_pids"] == servers and any(
            "get_server_list" in e for e in desc["events"]
        )
        pids = d.pids()
    assert not wait_gone(run)
    assert not any(pid_alive(p) for p in pids)
    assert not (d.pipe_dir / mps.MARKER).exists()
    assert "quit" in (run / "mps" / "log" / "control.log").read_text()


def test_daemon_stopped_when_a_model_server_crashes(fake_bin, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ServerFailed):
        with make_strategy("mps", ["0"], {}, run) as s:
            assert s.daemon.running
            raise ServerFailed("gen server died (exit code 1); last lines of gen.log: ...")
    assert not wait_gone(run)


def test_reusing_a_run_folder_after_a_clean_stop(fake_bin, tmp_path):
    run = tmp_path / "run"
    for _ in range(2):
        with make_strategy("mps", ["0"], {}, run) as s:
            assert s.daemon.get_server_list()
    assert not wait_gone(run)


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from coserve.gpu.strategies import make_strategy
    with make_strategy("mps", ["0"], {}, Path(sys.argv[1])) as s:
        print("up", s.daemon.proc.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize(
    "sig, rcs", [(signal.SIGTERM, {143}), (signal.SIGINT, {1, -signal.SIGINT})]
)
def test_daemon_stopped_on_sigterm_and_ctrl_c(fake_bin, tmp_path, sig, rcs):
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    line = p.stdout.readline()
    assert line.startswith("up"), p.stderr.read()
    assert len(ours(run)) == 2
    p.send_signal(sig)
    assert p.wait(timeout=30) in rcs  # SIGTERM -> SystemExit(143); Ctrl-C -> KeyboardInterrupt
    assert not wait_gone(run)


def test_daemon_goes_when_coserve_is_killed_outright(fake_bin, tmp_path):
    """SIGKILL leaves no chance to tear down: the daemon was started with PR_SET_PDEATHSIG."""
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert p.stdout.readline().startswith("up"), p.stderr.read()
    assert len(ours(run)) == 2
    p.kill()
    p.wait(timeout=10)
    assert not wait_gone(run)


def start_foreign(tmp_path: Path, name: str, marker: bool = False) -> tuple[subprocess.Popen, Path]:
    pipe = tmp_path / name
    pipe.mkdir()
    if marker:
        (pipe / mps.MARKER).write_text("left behind\n")
    env = {
        **os.environ,
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / f"{name}-log"),
    }
    p = subprocess.Popen(
        ["nvidia-cuda-mps-control", "-f"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not (pipe / "control").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return p, pipe


def quit_foreign(p: subprocess.Popen, pipe: Path) -> None:
    subprocess.run(
        ["nvidia-cuda-mps-control"],
        input="quit\n",
        text=True,
        timeout=10,
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)},
    )
    p.wait(timeout=10)


def test_foreign_daemon_refused_and_left_alone(fake_bin, tmp_path):
    p, pipe = start_foreign(tmp_path, "someone-elses")
    try:
        s = make_strategy("mps", ["0"], {}, tmp_path / "run")
        with pytest.raises(
            StrategyError,
            match=r"(?s)did not start is running.*someone-elses.*not coserve.*timeslice",
        ):
            with s:
                pass
        assert p.poll() is None, "coserve must not touch a daemon it did not start"
        assert not ours(tmp_path / "run")
        # timeslice runs beside it, its servers pointed away from it
        with make_strategy("timeslice", ["0"], {}, tmp_path / "ts") as ts:
            assert any(
                "someone-elses" in n and "do not use it" in n for n in ts.describe()["notes"]
            )
        # explicitly allowed (e.g. a daemon on other GPUs)
        with make_strategy("mps", ["0"], {"ignore_foreign_daemons": True}, tmp_path / "run2") as s2:
            assert s2.daemon.running
        assert p.poll() is None
    finally:
        quit_foreign(p, pipe)


def test_daemon_left_by_an_earlier_coserve_run_is_named(fake_bin, tmp_path):
    p, pipe = start_foreign(tmp_path, "old-run", marker=True)
    try:
        with pytest.raises(
            StrategyError,
            match=r"(?s)earlier coserve run; stop it with: echo quit \| CUDA_MPS_PIPE_DIRECTORY=",
        ):
            with make_strategy("mps", ["0"], {}, tmp_path / "run"):
                pass
        assert p.poll() is None
    finally:
        quit_foreign(p, pipe)


def test_daemon_that_fails_to_start_reports_its_output(fake_bin, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL_START", "1")
    with pytest.raises(StrategyError, match=r"(?s)exited with code 1 at start.*failed to start"):
        with make_strategy("mps", ["0"], {}, tmp_path / "run"):
            pass
    assert not wait_gone(tmp_path / "run")


def test_daemon_that_ignores_quit_is_killed_with_its_server(fake_bin, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_IGNORE_QUIT", "1")
    d = mps.MpsDaemon(["0"], tmp_path / "run", stop_timeout_s=1).start()
    servers = list(d.server_pids)
    d.stop()
    assert any("SIGKILL" in e or "SIGTERM" in e for e in d.events)
    assert not wait_gone(tmp_path / "run")
    assert not any(pid_alive(p) for p in servers)


def test_missing_binary_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StrategyError, match="nvidia-cuda-mps-control.*not on PATH.*timeslice"):
        with make_strategy("mps", ["0"], {}, tmp_path / "run"):
            pass


def test_long_run_folder_gets_a_short_private_pipe_dir(fake_bin, tmp_path):
    run = tmp_path / ("x" * 60) / ("y" * 40)
    with make_strategy("mps", ["0"], {}, run) as s:
        pipe = s.daemon.pipe_dir
        assert len(str(pipe)) < 60 and pipe.name.startswith("coserve-mps-")
        assert s.env_for("gen")["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
        assert s.daemon.log_dir == run / "mps" / "log"
    assert not pipe.exists()


def test_a_daemon_that_cannot_start_leaves_no_private_pipe_dir(tmp_path, monkeypatch):
    """A long run path gets a pipe directory in the temp folder; a start that failed (no
    binary) left it there (139 of them in /tmp after a few test runs)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    daemon = mps.MpsDaemon(["0"], tmp_path / ("x" * 60) / ("y" * 40))
    assert daemon.pipe_dir.name.startswith(mps.TMP_PREFIX) and daemon.pipe_dir.exists()
    with pytest.raises(mps.MpsError, match="not on PATH"):
        daemon.start()
    assert not daemon.pipe_dir.exists()


def test_stale_private_pipe_dirs_are_swept_and_live_ones_kept(tmp_path):
    """A coserve killed outright (SIGKILL) leaves its private pipe directory: the next one
    removes it, unless its marker names a live process or it is new and unmarked."""

    def made(name, marker=None, age_s=0.0):
        d = tmp_path / f"{mps.TMP_PREFIX}{name}"
        d.mkdir()
        if marker is not None:
            (d / mps.MARKER).write_text(marker)
        t = time.time() - age_s
        os.utime(d, (t, t))
        return d

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = made("dead", f"started by coserve pid {dead.pid}\n")
    old_unmarked = made("old", age_s=2 * mps.UNMARKED_GRACE_S)
    live = made("live", f"started by coserve pid {os.getpid()}\n")
    young = made("young")
    other = tmp_path / "not-ours"
    other.mkdir()
    assert sorted(mps.sweep_stale_pipe_dirs(tmp_path)) == sorted([stale, old_unmarked])
    assert live.exists() and young.exists() and other.exists() and not stale.exists()
