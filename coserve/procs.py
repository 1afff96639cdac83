"""The processes coserve starts: their groups, their death signal, their environment, and the
one registry that stops whatever is still up when the interpreter exits.

    proc = subprocess.Popen(cmd, env={**os.environ, **BASE_ENV}, **group_kwargs())
    track(owner)            # owner.stop() runs at exit if nobody called it before
    ...
    signal_group(proc.pid, signal.SIGTERM); wait_group_gone(proc.pid, 5.0)
    untrack(owner)

Every child is the leader of its own process group (`start_new_session=True`), so a stop
reaches its workers too, and it gets SIGTERM from Linux if coserve dies without tearing down
(PR_SET_PDEATHSIG; only for children started from the main thread, since Linux ties it to
the starting thread). Owners that are still tracked at exit are stopped newest first (servers
before the MPS daemon they are clients of).

SIGTERM: a run installs its own handler (experiment/signals.py, KeyboardInterrupt). Outside a
run, `SigtermExit` makes SIGTERM a SystemExit while a daemon is up, so a `kill` of coserve
still tears the daemon down; it takes SIGTERM only while nobody else holds it, and on its way
out leaves a handler installed after it in place.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Protocol

from coserve.engine.nccl_env import NO_MULTICAST_ENV

# Every environment coserve hands out, and every process it starts, carries these: NVLink
# multicast (NVLS) is off, as the lent machines require (declared once, in the engine layer,
# whose tensor-parallel ranks set it too).
BASE_ENV: dict[str, str] = dict(NO_MULTICAST_ENV)


class Stoppable(Protocol):
    def stop(self) -> object: ...


_live: dict[int, Stoppable] = {}
_live_lock = threading.Lock()

try:  # resolved once here, so the forked child only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path | None, n: int = 40) -> str:
    """The last `n` lines of a log (read from its last 64 KiB), or '(no log)' / '(empty log)'."""
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) if lines else "(empty log)"


def pid_alive(pid: int) -> bool:
    """Is the process there and not a zombie? (one of another user's counts as alive)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def group_alive(pgid: int) -> bool:
    """Is any process of the group still running? Zombies are not: they have ended, and an
    orphan's waits for init to reap it (seconds, on some machines' init)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc: the group's processes cannot be told from zombies
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def signal_group(pgid: int | None, sig: int) -> None:
    """Send `sig` to the group; a group that is gone (or not ours) is left alone."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the group to empty; True when it has."""
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not group_alive(pgid)


def parent_death_signal() -> None:
    """preexec_fn: SIGTERM to the child if coserve dies without tearing down (even by SIGKILL)."""
    if _prctl is not None:
        _prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def pdeathsig_preexec():
    """`parent_death_signal` from the main thread, None elsewhere (Linux ties the signal to
    the starting thread, which may end long before coserve does)."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    return parent_death_signal


def group_kwargs() -> dict:
    """Popen arguments for a child that leads its own group and dies with coserve."""
    return {"start_new_session": True, "preexec_fn": pdeathsig_preexec()}


def track(owner: Stoppable) -> None:
    """Stop `owner` at interpreter exit unless `untrack` was called first."""
    with _live_lock:
        _live[id(owner)] = owner


def untrack(owner: Stoppable) -> None:
    with _live_lock:
        _live.pop(id(owner), None)


def live(kind: type | None = None) -> list:
    """The tracked owners (of class `kind`), oldest first."""
    with _live_lock:
        owners = list(_live.values())
    return [o for o in owners if kind is None or isinstance(o, kind)]


@atexit.register
def stop_all() -> None:
    """Stop every tracked owner, newest first (the backstop when no tear-down ran)."""
    for owner in reversed(live()):
        try:
            owner.stop()
        except Exception:
            pass


def _exit_on_sigterm(_signo, _frame):
    raise SystemExit(128 + signal.SIGTERM)


class SigtermExit:
    """SIGTERM as SystemExit while something must be torn down, where nobody else owns SIGTERM.

    `install()` takes SIGTERM only in the main thread and only while its handler is the
    default; it returns a note saying why not otherwise. `deferred()` wraps the tear-down: a
    SIGTERM during it waits until it is done, then the old handler is back and SystemExit is
    raised."""

    def __init__(self):
        self._old = None
        self.installed = False

    def install(self) -> str | None:
        if threading.current_thread() is not threading.main_thread():
            return (
                "not in the main thread: SIGTERM is not intercepted; "
                "the caller must stop the daemon"
            )
        cur = signal.getsignal(signal.SIGTERM)
        if cur in (signal.SIG_DFL, None):
            self._old = cur if cur is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self.installed = True
        return None

    def deferred(self) -> _Deferred:
        return _Deferred(self)


class _Deferred:
    def __init__(self, owner: SigtermExit):
        self.owner = owner
        self.got: list[int] = []

    def __enter__(self) -> _Deferred:
        self._current = None
        if self.owner.installed:
            self._current = signal.signal(signal.SIGTERM, lambda s, f: self.got.append(s))
        return self

    def __exit__(self, *exc) -> bool:
        if self.owner.installed:
            # Ours gives way to the handler before it; one installed after ours (a run that
            # started meanwhile) stays, whichever order the two were installed in.
            ours = self._current is _exit_on_sigterm
            signal.signal(signal.SIGTERM, self.owner._old if ours else self._current)
            self.owner.installed = False
        if self.got:
            raise SystemExit(128 + signal.SIGTERM)
        return False
