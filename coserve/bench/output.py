"""Writing a load run to disk: FILE.json (the summary) and FILE.records.jsonl (one
`RequestRecord` a line), and reading the records back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from coserve.bench.records import BenchResult, RequestRecord

__all__ = ["check_out", "read_records", "records_path", "write_result"]


def records_path(path) -> Path:
    """FILE.records.jsonl beside FILE.json. Raises ValueError for a path without a name."""
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + ".records.jsonl")


def check_out(path) -> None:
    """Make sure the result can be written to `path` before any load is sent: its folder is
    created if missing, must take a new file, and neither target is a folder. Raises
    ValueError saying what is wrong (the caller names its flag)."""
    path = Path(path)
    for target in (path, records_path(path) if path.name else path):
        if target.is_dir():
            raise ValueError(f"{str(target)!r} is a folder; give a file name such as x.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".coserve-check-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{str(path.parent)!r} is not a folder (a file is in the way)") from None
    except OSError as e:
        raise ValueError(f"cannot write in {str(path.parent)!r}: {e.strerror or e}") from None


def write_result(result: BenchResult, path) -> tuple[str, str]:
    """Write FILE.json (the summary) and FILE.records.jsonl (one line per request); both
    atomically (temporary file + rename). Returns the two paths. Raises OSError, or
    ValueError for a path without a file name."""
    path = Path(path)
    rec_path = records_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    summary["records_file"] = rec_path.name
    _atomic(rec_path, "".join(r.to_json() + "\n" for r in result.records))
    _atomic(path, json.dumps(summary, indent=2) + "\n")
    return str(path), str(rec_path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_records(path) -> list[RequestRecord]:
    """The records of a FILE.records.jsonl. Raises OSError, or ValueError naming the line
    that is not a record."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(RequestRecord.from_json(line))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
    return out
