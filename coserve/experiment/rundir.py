"""The run folder: what a run keeps on disk, written so that a crash loses at most the rep
in progress.

```
DIR/spec.toml               the spec as given (first run)
DIR/spec.json               the spec as validated, defaults filled in (what the report reads)
DIR/fingerprint.json        environment at the first run: GPU, driver, versions, commit, spec hash
DIR/reps/COND/rep-K/        one rep: server logs, bench.json (+ records), telemetry series
DIR/reps/COND/rep-K/rep.json   written last (temporary file + rename): the rep is finished
                            when, and only when, this file exists
DIR/stats.json, report.md, report.html, plots/   written by the report
```
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    spec_file = property(lambda self: self.path / "spec.toml")
    spec_json = property(lambda self: self.path / "spec.json")
    fingerprint_file = property(lambda self: self.path / "fingerprint.json")
    reps_dir = property(lambda self: self.path / "reps")

    def exists(self) -> bool:
        return self.fingerprint_file.exists()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def rep_dir(self, condition: str, rep: int) -> Path:
        return self.reps_dir / condition / f"rep-{rep}"

    def rep_record(self, condition: str, rep: int) -> dict | None:
        """The finished rep's record, or None if the rep has not finished."""
        path = self.rep_dir(condition, rep) / "rep.json"
        try:
            return read_json(path)
        except (OSError, ValueError):
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

    def records(self) -> list[dict]:
        """Every finished rep's record (any status), in no particular order."""
        out = []
        if not self.reps_dir.exists():
            return out
        for path in sorted(self.reps_dir.glob("*/rep-*/rep.json")):
            try:
                out.append(read_json(path))
            except (OSError, ValueError):
                continue
        return out
