"""Saying why something failed in one line: a failed rep's cause, a run folder that cannot be
written."""

from __future__ import annotations

import errno
import re
from pathlib import Path

# The line of a log tail that says why: a Python exception (`AssertionError: Torch not
# compiled with CUDA enabled`, `torch.OutOfMemoryError: ...`), an argparse or CLI error
# (`coserve serve: error: ...`), a fatal/error log line.
_CAUSE = re.compile(
    r"^\s*(?:[\w.]*(?:Error|Exception|Exit|Interrupt)\b|.*\b(?:error|fatal|FATAL|ERROR|"
    r"Error|killed|Killed|out of memory)\b)"
)
_TAIL_INTRO = re.compile(r";?\s*last lines of (\S+?):?$")


def why(error: str | None, width: int = 300) -> str:
    """One line for a failed rep's error: its first line (what failed) and, when the message
    carries a log tail, the tail's line that says why (the last exception or error line; else
    the last line, unless a signal killed the process).
    ``'gen server ... (exit code 1): AssertionError: Torch not compiled with CUDA enabled
    (log: .../gen.log)'``. Cut to `width` characters."""
    if not error:
        return ""
    lines = error.strip().splitlines()
    head = lines[0].strip()
    rest = [ln.rstrip() for ln in lines[1:] if ln.strip() and not ln.lstrip().startswith("#")]
    log = None
    m = _TAIL_INTRO.search(head)
    if m:
        log, head = m.group(1), head[: m.start()].rstrip(" ;:")
    if rest:
        causes = [ln for ln in rest if _CAUSE.match(ln)]
        # Without an error line, a process that exited said why last; one killed by a signal
        # did not (its last line is whatever it was doing).
        cause = (causes[-1] if causes else "" if "killed by" in head else rest[-1]).strip()
        if cause and cause not in head:
            head = f"{head}: {cause}"
    if log:
        head += f" (log: {log})"
    return head if len(head) <= width else head[: width - 3] + "..."


# errno values that mean "this folder cannot take what the run writes": stop the run (every
# later rep would fail the same way) instead of failing rep after rep.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


class StorageError(RuntimeError):
    """The run folder cannot be written (read-only, full, no permission). The message is one
    line: what, where, and how to go on."""


def storage_error(e: BaseException, run_dir: Path) -> StorageError | None:
    """A StorageError for `e` when it is a file-system error about the run folder, else None.
    A full or read-only file system counts wherever it happened (a write() names no file);
    a permission error only for a path inside `run_dir`."""
    if not isinstance(e, OSError) or e.errno is None:
        return None
    name = e.filename if isinstance(e.filename, str) else None
    inside = name is not None and Path(name).resolve().is_relative_to(Path(run_dir).resolve())
    if e.errno in _STORAGE_ERRNOS or (e.errno in _DENIED_ERRNOS and inside):
        where = name or str(run_dir)
        return StorageError(f"cannot write {where}: {e.strerror or e}")
    return None
