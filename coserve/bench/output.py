"""Writing a load run to disk: FILE.json (the summary) and FILE.records.jsonl (one
`RequestRecord` a line), and reading the records back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coserve.bench.records import BenchResult, RequestRecord

__all__ = ["read_records", "write_result"]


def write_result(result: BenchResult, path) -> tuple[str, str]:
    """Write FILE.json (the summary) and FILE.records.jsonl (one line per request); both
    atomically (temporary file + rename). Returns the two paths. Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    rec_path = path.with_name(stem + ".records.jsonl")
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
