"""coserve's own CUDA MPS control daemon.

coserve starts `nvidia-cuda-mps-control -f` (foreground, so coserve holds its pid) in a new
session, with private pipe and log directories under the run folder, starts the MPS server
with `start_server -uid <uid>` and checks it with `get_server_list`. `stop()` sends `quit`,
waits, then kills what is left of the daemon's process group and of the servers it listed.
coserve never talks to a daemon it did not start: `find_mps_processes()` lists the others,
and the strategy refuses to run beside them.

The binary is `nvidia-cuda-mps-control` on PATH, or `control_bin` / `$COSERVE_MPS_CONTROL`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coserve.procs import (
    BASE_ENV,
    group_alive,
    group_kwargs,
    live,
    pid_alive,
    signal_group,
    tail,
    track,
    untrack,
)

MARKER = ".coserve-mps"
_SOCKET_PATH_MAX = 100  # AF_UNIX paths must stay under 108 bytes; MPS appends its own names


TMP_PREFIX = "coserve-mps-"  # a private pipe directory in the temp folder (long run paths)
UNMARKED_GRACE_S = 600.0  # one without a marker yet may be another coserve's, about to start


def sweep_stale_pipe_dirs(tmp: Path | None = None) -> list[Path]:
    """Remove this user's private pipe directories (TMP_PREFIX in the temp folder) that no
    live daemon holds: left by a coserve killed outright (SIGKILL: its daemon died with it
    through PDEATHSIG, the directory stayed) or by one whose daemon never started. A
    directory whose marker names a live pid, that an MPS process uses, or that has no marker
    yet and is younger than UNMARKED_GRACE_S, is kept. Returns the ones removed."""
    root = Path(tmp or tempfile.gettempdir())
    used = {p.pipe_dir for p in find_mps_processes() if p.pipe_dir}
    gone = []
    for d in root.glob(f"{TMP_PREFIX}*"):
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
            marker = (d / MARKER).read_text() if (d / MARKER).exists() else ""
            fresh = time.time() - d.stat().st_mtime < UNMARKED_GRACE_S
        except OSError:
            continue
        owner = [int(w) for w in marker.split() if w.isdigit()]
        if str(d) in used or (owner and pid_alive(owner[0])) or (not marker and fresh):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


class MpsError(RuntimeError):
    """The MPS daemon cannot be started or used; the message says why and what to do."""


def nccl_safe_env() -> dict[str, str]:
    return dict(BASE_ENV)


@dataclass
class MpsProcess:
    pid: int
    kind: str  # "control" or "server"
    uid: int | None
    pipe_dir: str | None  # None when /proc/<pid>/environ is unreadable
    started_by_coserve: bool

    def describe(self) -> str:
        who = (
            "coserve (its marker is in the pipe dir)" if self.started_by_coserve else "not coserve"
        )
        pd = self.pipe_dir or "unknown (environment unreadable; default /tmp/nvidia-mps)"
        return f"MPS {self.kind} pid {self.pid} (uid {self.uid}, pipe dir {pd}, started by {who})"


def find_mps_processes(
    proc_root: str = "/proc", exclude: set[int] | None = None
) -> list[MpsProcess]:
    """Every nvidia-cuda-mps-control / -server process on this machine (by comm or argv[0])."""
    exclude = exclude or set()
    out = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return out
    for ent in entries:
        if not ent.isdigit() or int(ent) in exclude:
            continue
        base = os.path.join(proc_root, ent)
        try:
            with open(os.path.join(base, "comm")) as f:
                comm = f.read().strip()
            with open(os.path.join(base, "cmdline"), "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        name = os.path.basename(argv0)
        if not (comm.startswith("nvidia-cuda-mps") or name.startswith("nvidia-cuda-mps-")):
            continue
        try:
            with open(os.path.join(base, "stat")) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                    continue
        except (OSError, IndexError):
            continue
        # A process whose argv[0] names MPS but whose comm is a shell/python wrapper still counts.
        kind = "server" if "server" in (name or comm) else "control"
        pipe = None
        try:
            with open(os.path.join(base, "environ"), "rb") as f:
                for item in f.read().split(b"\0"):
                    if item.startswith(b"CUDA_MPS_PIPE_DIRECTORY="):
                        pipe = item.split(b"=", 1)[1].decode(errors="replace")
            if pipe is None:
                pipe = "/tmp/nvidia-mps"
        except OSError:
            pipe = None
        try:
            uid = os.stat(base).st_uid
        except OSError:
            uid = None
        ours = bool(pipe) and os.path.exists(os.path.join(pipe, MARKER))
        out.append(
            MpsProcess(pid=int(ent), kind=kind, uid=uid, pipe_dir=pipe, started_by_coserve=ours)
        )
    return out


class MpsDaemon:
    def __init__(
        self,
        devices: list[str],
        run_dir: Path,
        *,
        control_bin: str | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 15.0,
        cuda_visible_devices: str | None = None,
    ):
        self.devices = list(devices)
        self.run_dir = Path(run_dir)
        self.control_bin = (
            control_bin or os.environ.get("COSERVE_MPS_CONTROL") or "nvidia-cuda-mps-control"
        )
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.cuda_visible_devices = (
            cuda_visible_devices if cuda_visible_devices is not None else ",".join(self.devices)
        )
        self.log_dir = self.run_dir / "mps" / "log"
        want_pipe = self.run_dir / "mps" / "pipe"
        self._tmp_pipe = len(str(want_pipe.resolve())) > _SOCKET_PATH_MAX - 30
        if self._tmp_pipe:
            sweep_stale_pipe_dirs()
        self.pipe_dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX)) if self._tmp_pipe else want_pipe
        self.proc: subprocess.Popen | None = None
        self.server_pids: list[int] = []
        self.events: list[str] = []

    # -- environment -------------------------------------------------------------------
    def client_env(self) -> dict[str, str]:
        return {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(nccl_safe_env())
        env.update(self.client_env())
        if self.cuda_visible_devices:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- control channel ---------------------------------------------------------------
    def command(self, cmd: str, timeout_s: float = 10.0) -> str:
        """Send one command through the control client (`echo cmd | nvidia-cuda-mps-control`)."""
        try:
            res = subprocess.run(
                [self.control_bin],
                input=cmd + "\n",
                capture_output=True,
                text=True,
                env=self._env(),
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as e:
            raise MpsError(
                f"MPS control command {cmd!r} did not answer in {timeout_s:.0f} s"
            ) from e
        if res.returncode != 0:
            raise MpsError(
                f"MPS control command {cmd!r} failed (exit {res.returncode}): "
                f"{(res.stdout + res.stderr).strip() or 'no output'}"
            )
        return res.stdout

    def get_server_list(self) -> list[int]:
        out = self.command("get_server_list")
        return [int(tok) for tok in out.split() if tok.isdigit()]

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> MpsDaemon:
        """Start the daemon and its server. Raises MpsError saying why not; nothing of it is
        left then (a private pipe directory in the temp folder included)."""
        if self.running:
            return self
        try:
            return self._start()
        except BaseException:
            if self.proc is not None:
                self.stop()
            elif self._tmp_pipe:
                shutil.rmtree(self.pipe_dir, ignore_errors=True)
            raise

    def _start(self) -> MpsDaemon:
        exe = shutil.which(self.control_bin) if os.sep not in self.control_bin else self.control_bin
        if not exe or not os.access(exe, os.X_OK):
            raise MpsError(
                f"MPS needs {self.control_bin!r}, which is not on PATH (it ships with the NVIDIA "
                f"driver's compute utilities); install it or use strategy 'timeslice'"
            )
        self.control_bin = exe
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        users = [
            p for p in find_mps_processes() if p.pipe_dir and Path(p.pipe_dir) == self.pipe_dir
        ]
        if users:
            raise MpsError(
                f"MPS pipe directory {self.pipe_dir} is in use by "
                + "; ".join(u.describe() for u in users)
                + ": coserve will not share it"
            )
        for leftover in self.pipe_dir.iterdir():  # files of an earlier, finished daemon of ours
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        (self.pipe_dir / MARKER).write_text(f"started by coserve pid {os.getpid()}\n")
        out_log = self.log_dir / "control.stdout.log"
        logf = open(out_log, "ab")
        try:
            self.proc = subprocess.Popen(
                [exe, "-f"],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._env(),
                **group_kwargs(),
            )
        finally:
            logf.close()
        track(self)
        self.events.append(f"control daemon started, pid {self.proc.pid}, pipe dir {self.pipe_dir}")
        try:
            self._wait_control_ready(out_log)
            uid = os.getuid()
            self.command(f"start_server -uid {uid}")
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                pids = self.get_server_list()
                if pids:
                    self.server_pids = pids
                    break
                if time.monotonic() > deadline:
                    raise MpsError(
                        f"MPS server did not come up within {self.start_timeout_s:.0f} s "
                        f"(get_server_list empty); control daemon output:\n{tail(out_log, 30)}"
                    )
                time.sleep(0.2)
            self.events.append(f"MPS server up: get_server_list -> {self.server_pids}")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_control_ready(self, out_log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_err = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MpsError(
                    f"MPS control daemon exited with code {self.proc.returncode} at start; its "
                    "output "
                    f"({out_log}):\n{tail(out_log, 30)}"
                )
            try:
                self.command("get_server_list", timeout_s=5)
                return
            except MpsError as e:
                last_err = e
            time.sleep(0.2)
        raise MpsError(
            f"MPS control daemon did not answer within {self.start_timeout_s:.0f} s "
            f"({last_err}):\n{tail(out_log, 30)}"
        )

    def stop(self) -> None:
        """Quit the daemon; then make sure nothing it started is left. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    more = self.get_server_list()
                    self.server_pids = sorted(set(self.server_pids) | set(more))
                except MpsError:
                    pass
                try:
                    self.command("quit", timeout_s=min(10.0, self.stop_timeout_s))
                    self.events.append("sent quit")
                except MpsError as e:
                    self.events.append(f"quit failed: {e}")
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self.events.append("daemon still up after quit: SIGTERM to its group")
                    signal_group(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=min(5.0, self.stop_timeout_s))
                    except subprocess.TimeoutExpired:
                        self.events.append("SIGKILL to its group")
                        signal_group(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=5)
            # The MPS server is the daemon's child; make sure it went with it.
            deadline = time.monotonic() + 5
            while any(pid_alive(p) for p in self.server_pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            for p in self.server_pids:
                if pid_alive(p):
                    self.events.append(f"MPS server {p} outlived the daemon: SIGKILL")
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
            if group_alive(proc.pid):
                signal_group(proc.pid, signal.SIGKILL)
            self.events.append(f"daemon stopped (exit {proc.returncode})")
        finally:
            self.proc = None
            untrack(self)
            if self._tmp_pipe:
                shutil.rmtree(self.pipe_dir, ignore_errors=True)
            else:
                try:
                    (self.pipe_dir / MARKER).unlink()
                except OSError:
                    pass

    def pids(self) -> set[int]:
        out = set(self.server_pids)
        if self.proc is not None:
            out.add(self.proc.pid)
        return out

    def __enter__(self) -> MpsDaemon:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


def our_pids() -> set[int]:
    """The pids of every MPS daemon (and its servers) this process runs."""
    return set().union(*(d.pids() for d in live(MpsDaemon)))
