"""What the plots read from each finished rep beyond its rep.json: per-request values from
the bench's records file and per-second traces (telemetry, the SLO guard's)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from coserve import stats
from coserve.experiment.rep import read_telemetry
from coserve.report.aggregate import ConditionStats, RunStats


def _records_file(rep_dir: Path) -> Path | None:
    for name in ("bench.records.jsonl.gz", "bench.records.jsonl"):
        p = rep_dir / name
        if p.exists():
            return p
    return None


def _lines(path: Path) -> Iterator[str]:
    """The lines of a records file, gzipped or not; a file cut short or not gzip ends early
    (what was read before stays)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", errors="replace") as f:
            yield from f
    except (OSError, EOFError):
        return


def request_values(run: RunStats, cs: ConditionStats, key: str, endpoint: str) -> list[float]:
    """Per-request values (`tpot_ms`, `ttft_ms`, `latency_ms`) of requests that ended inside
    the window, pooled over the condition's finished reps; lines that are no record (cut,
    junk) are skipped."""
    out: list[float] = []
    for r in cs.ok:
        bench = r.get("bench") or {}
        try:
            ws = float(bench.get("warmup_s", 0))
            we = ws + float(bench.get("duration_s", 0))
        except (TypeError, ValueError):
            continue
        path = _records_file(run.run_dir.rep_dir(cs.name, r["rep"]))
        if path is None:
            continue
        for line in _lines(path):
            if f'"{key}"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            v = rec.get(key) if isinstance(rec, dict) else None
            if (
                stats.finite_number(v)
                and rec.get("endpoint") == endpoint
                and rec.get("status") == "ok"
                and stats.finite_number(end := rec.get("end_s"))
                and ws <= end < we
            ):
                out.append(float(v))
    return out


def telemetry_series(
    run: RunStats, cs: ConditionStats, name: str = "telemetry.jsonl"
) -> tuple[list[dict], dict] | None:
    """Rows of the first finished rep whose telemetry holds any (or whose other per-second
    trace with Unix-time `t` does, such as the SLO guard's `slo_guard.jsonl`), each with
    `t_load_s`, seconds since the load started, and that rep's bench summary; None when no
    rep has rows."""
    for r in cs.ok:
        path = run.run_dir.rep_dir(cs.name, r["rep"]) / name
        try:
            rows = read_telemetry(path)
        except OSError:  # none recorded (a CPU run), or unreadable
            continue
        bench = r.get("bench") if isinstance(r.get("bench"), dict) else {}
        try:
            t0 = dt.datetime.fromisoformat(bench["started_at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            t0 = rows[0]["t"] if rows else 0.0
        for row in rows:
            row["t_load_s"] = row["t"] - t0
        if rows:
            return rows, bench
    return None
