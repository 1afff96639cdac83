"""The run folder: what a run keeps on disk, written so that a crash loses at most the rep
in progress.

```
DIR/spec.toml               the spec as given (first run)
DIR/spec.json               the spec as validated, defaults filled in (what the report reads)
DIR/fingerprint.json        environment at the first run: GPU, driver, versions, commit, spec hash
DIR/reps/COND/rep-K/        one rep: server logs, bench.json (+ records), telemetry series
DIR/reps/COND/rep-K/rep.json   written last (temporary file + rename): the rep is finished
                            when, and only when, this file exists
DIR/reps/COND/rep-K.damaged-N/   a rep whose rep.json was there but could not be read, or
                            named another condition or rep (a folder copied by hand), set
                            aside by --resume before it ran the rep again (kept; not reported)
DIR/spec.json.damaged-N     a spec.json that could not be read, set aside by --resume when it
                            wrote the file again from the same spec (fingerprint's hash)
DIR/stats.json, report.md, report.html, plots/   written by the report
DIR/.lock                   held (flock) by the `coserve run` writing the folder; holds its PID
```
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a Ctrl-C: leave the old file and no temporary one
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def set_aside(path: Path) -> Path:
    """Rename a damaged file or folder to `NAME.damaged-N` (N the first number free), so
    what replaces it does not overwrite it; returns the new path. Raises OSError."""
    n = 1
    while (kept := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    os.rename(path, kept)
    return kept


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


# What a rep.json must hold for the report to place it: key -> type.
REP_KEYS: dict[str, type] = {"condition": str, "rep": int, "status": str}
# The parts of a rep.json that, when present, are JSON objects (a failed rep may lack them).
REP_OBJECTS = ("servers", "strategy_info", "load", "bench", "telemetry", "env")


def read_rep(path: Path) -> dict:
    """A rep.json: read_object with REP_KEYS, each of REP_OBJECTS present an object, and
    `error` present a string.
    Raises OSError, ValueError (naming the key)."""
    rec = read_object(path, REP_KEYS)
    for key in REP_OBJECTS:
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            raise ValueError(f"{key!r} is a {type(rec[key]).__name__}, not an object")
    if rec.get("error") is not None and not isinstance(rec["error"], str):
        raise ValueError(f"'error' is a {type(rec['error']).__name__}, not a string")
    return rec


def read_rep_in_place(path: Path) -> dict:
    """read_rep of DIR/reps/COND/rep-K/rep.json, whose record must name COND and K: one that
    names another place (a rep folder copied or moved by hand) would count twice, or towards
    another condition; its folder decides. Raises OSError, ValueError (naming both places)."""
    rec = read_rep(path)
    where = (path.parent.parent.name, path.parent.name.removeprefix("rep-"))
    if (rec["condition"], str(rec["rep"])) != where:
        raise ValueError(
            f"it says condition {rec['condition']!r} rep {rec['rep']}, but lies in the folder "
            f"of condition {where[0]!r} rep {where[1]}"
        )
    return rec


def read_object(path: Path, required: dict[str, type] | None = None) -> dict:
    """The JSON object in `path`, with each `required` key of its type. Raises OSError,
    ValueError (not JSON, not an object, a required key missing or of another type)."""
    try:
        obj = read_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid JSON (not UTF-8 text)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (holds a {type(obj).__name__})")
    for key, typ in (required or {}).items():
        if not isinstance(obj.get(key), typ):
            raise ValueError(f"no {typ.__name__} {key!r}")
    return obj


@dataclass(frozen=True)
class Unreadable:
    """A file of the run folder that could not be read or is not the shape expected."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class RepRecords:
    """Every finished rep's record (any status), and the rep.json files that could not be read."""

    records: list[dict] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the run folder's lock; `pid` is its PID (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"{path} is being written by another coserve run ({who}); wait for it "
            f"to finish or stop it, or choose another --out"
        )


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._lock_depth = 0

    spec_file = property(lambda self: self.path / "spec.toml")
    spec_json = property(lambda self: self.path / "spec.json")
    fingerprint_file = property(lambda self: self.path / "fingerprint.json")
    reps_dir = property(lambda self: self.path / "reps")

    def exists(self) -> bool:
        return self.fingerprint_file.exists()

    def readable(self) -> bool:
        """A run folder to report on: its fingerprint.json or, that lost, its spec.json."""
        return self.exists() or self.spec_json.exists()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(p.name != LOCK_NAME for p in self.path.iterdir())

    def check_writable(self) -> None:
        """Make what `locked` makes (the missing folders, the lock file), then remove what was
        made, so a dry run meets the error the run would meet (no such place, as under /proc; a
        read-only file system; no permission) and leaves the disk as it was. Raises OSError."""
        missing = list(
            itertools.takewhile(lambda p: not p.exists(), (self.path, *self.path.parents))
        )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = self.path / LOCK_NAME
            try:
                os.close(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:  # another run's, or a finished one's: not ours to remove,
                # but `locked` opens it to write, which a directory by that name refuses
                os.close(os.open(lock, os.O_RDWR))
                return
            os.unlink(lock)
        finally:
            for made in missing:  # deepest first
                with contextlib.suppress(OSError):
                    made.rmdir()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (created with the folder if need be); re-entrant within one
        RunDir. Raises FolderBusy at once when another process holds it (a flock: released
        by the kernel when its holder dies, so a crashed run never leaves the folder locked)."""
        if self._lock_depth == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise FolderBusy(self.path, int(text) if text.isdigit() else None) from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def rep_dir(self, condition: str, rep: int) -> Path:
        return self.reps_dir / condition / f"rep-{rep}"

    def rep_record(self, condition: str, rep: int) -> dict | None:
        """The finished rep's record, or None if the rep has not finished."""
        path = self.rep_dir(condition, rep) / "rep.json"
        try:
            return read_rep_in_place(path)
        except (OSError, ValueError):
            return None

    def damaged_rep(self, condition: str, rep: int) -> Unreadable | None:
        """The rep's rep.json where it is there but cannot be read, and why; else None (the
        rep finished, or never did: no rep.json)."""
        path = self.rep_dir(condition, rep) / "rep.json"
        if not os.path.lexists(path):
            return None
        try:
            read_rep_in_place(path)
        except (OSError, ValueError) as e:
            return Unreadable(path, getattr(e, "strerror", None) or str(e))
        return None

    def fresh_rep_dir(self, condition: str, rep: int) -> Path:
        """An empty folder for a rep about to run (what an unfinished try left is removed)."""
        d = self.rep_dir(condition, rep)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def finish_rep(self, condition: str, rep: int, record: dict) -> None:
        write_json(self.rep_dir(condition, rep) / "rep.json", record)

    def drop_temporaries(self, condition: str, rep: int) -> None:
        """Remove the `*.tmp` files a rep's interrupted writes left (best effort)."""
        for path in self.rep_dir(condition, rep).rglob("*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()

    def records(self) -> list[dict]:
        """Every finished rep's record (any status) that can be read, in no particular order."""
        return self.scan_records().records

    def scan_records(self) -> RepRecords:
        """Every rep.json: the records, and those unreadable or not a rep record's shape."""
        out = RepRecords()
        if not self.reps_dir.exists():
            return out
        for path in sorted(self.reps_dir.glob("*/rep-*/rep.json")):
            if not path.parent.name[4:].isdigit():  # a damaged rep set aside (rep-K.damaged-N)
                continue
            try:
                out.records.append(read_rep_in_place(path))
            except (OSError, ValueError) as e:
                out.unreadable.append(Unreadable(path, getattr(e, "strerror", None) or str(e)))
        return out
