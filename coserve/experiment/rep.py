"""What a finished rep leaves behind, apart from running it: the reason it failed (a dead
server, a role that measured nothing), its telemetry over the measurement window, and its
per-request records gzipped."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coserve.stats import finite_number


def first_dead(servers: list) -> str | None:
    """The first server process found dead, as its ServerFailed message (with its log's tail)."""
    for server in servers:
        try:
            server.check()
        except Exception as e:
            return str(e)
    return None


# A server killed under load closes its socket before its process can be reaped (the kernel
# closes its files first and frees its memory after), so the load generator's "cannot reach"
# can come before the death is visible; on a loaded 2-core machine the gap passed 0.1 s.
DEATH_GRACE_S = 2.0
_DEATH_POLL_S = 0.05


def first_dead_within(servers: list, seconds: float) -> str | None:
    """`first_dead`, polled for up to `seconds` where a server is a process this run started
    (`proc`; an external server's death cannot be seen, so there is nothing to wait for):
    after a failed load, the server whose death caused it, if one dies that soon; else None."""
    if not any(getattr(s, "proc", None) is not None for s in servers):
        return first_dead(servers)
    deadline = time.monotonic() + seconds
    while True:
        died = first_dead(servers)
        if died is not None or time.monotonic() >= deadline:
            return died
        time.sleep(_DEATH_POLL_S)


def role_devices(record: dict) -> dict[str, list[str]]:
    """{role: the GPUs the strategy gave it} from a rep record's strategy_info; a role (or a
    record) of another shape, as a hand-edited or foreign rep.json holds, has none."""
    info = record.get("strategy_info")
    roles = info.get("roles") if isinstance(info, dict) else None
    if not isinstance(roles, dict):
        return {}
    out = {}
    for role, r in roles.items():
        devices = r.get("devices") if isinstance(r, dict) else None
        if isinstance(devices, list):
            out[role] = [str(d) for d in devices]
    return out


@dataclass(frozen=True)
class Trace:
    """A per-second trace file read (telemetry.jsonl, slo_guard.jsonl): its samples, each a
    JSON object with a numeric `t` (Unix seconds), and how many of its non-blank lines were
    none (a line cut by a crash, junk) and were skipped."""

    rows: list[dict]
    skipped: int


def read_trace(path: Path) -> Trace:
    """The samples of a trace file and the count of lines skipped. Raises OSError."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read for good
        raise OSError(f"{path}: not a regular file")
    rows, skipped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and finite_number(row.get("t")):
            rows.append(row)
        elif line.strip():
            skipped += 1
    return Trace(rows, skipped)


def read_telemetry(path: Path) -> list[dict]:
    """The samples of a telemetry.jsonl (read_trace's rows, the lines that are none
    skipped). Raises OSError."""
    return read_trace(path).rows


@dataclass(frozen=True)
class LoadTimes:
    """When a rep's load ran, in Unix seconds: its start (warm-up begins), and its
    measurement window."""

    started: float
    window_start: float
    window_end: float


def load_times(summary: dict) -> LoadTimes | None:
    """The LoadTimes of a bench summary (bench.json), or None where it lacks them."""
    try:
        t0 = dt.datetime.fromisoformat(summary["started_at"]).timestamp()
        ws = t0 + float(summary["warmup_s"])
        return LoadTimes(t0, ws, ws + float(summary["duration_s"]))
    except (KeyError, TypeError, ValueError):
        return None


def power_at_start(per_device: dict[str, dict[str, float | None]]) -> dict[str, object]:
    """The sampler's `at_start` (device -> {power_limit_w, power_w}) with the mean over devices
    of each figure beside it, as the window's power is a mean over devices: {power_limit_w,
    power_w, devices}; a figure no device gave is None."""
    import statistics

    def mean(key: str) -> float | None:
        vals = [d[key] for d in per_device.values() if finite_number(d.get(key))]
        return statistics.fmean(vals) if vals else None

    return {
        "power_limit_w": mean("power_limit_w"),
        "power_w": mean("power_w"),
        "devices": per_device,
    }


def window_telemetry(rows: list[dict], summary: dict) -> dict[str, dict[str, float]]:
    """{metric: {mean, p50, n}} over the samples taken inside the load's measurement window
    (the sampler's own summary also covers warm-up and start-up); with samples of several
    devices also `metric/<device>` over that device's samples alone (on two GPUs the
    device-wide mean hides which GPU did what)."""
    times = load_times(summary)
    if times is None:
        return {}
    return telemetry_means(rows, times.window_start, times.window_end)


def telemetry_means(rows: list[dict], start: float, end: float) -> dict[str, dict[str, float]]:
    """window_telemetry's figures over the samples with `t` (Unix seconds) in [start, end]."""
    inside = [r for r in rows if start <= r.get("t", -1) <= end]
    out = _means(inside, "")
    devices = sorted({str(r["device"]) for r in inside if "device" in r})
    if len(devices) > 1:
        for d in devices:
            out.update(_means([r for r in inside if str(r.get("device")) == d], f"/{d}"))
    return out


def _means(rows: list[dict], suffix: str) -> dict[str, dict[str, float]]:
    import statistics

    out = {}
    for key in sorted({k for r in rows for k in r} - {"t", "t_rel_s", "device"}):
        vals = [r[key] for r in rows if finite_number(r.get(key))]
        if vals:
            out[key + suffix] = {
                "mean": statistics.fmean(vals),
                "p50": statistics.median(vals),
                "n": len(vals),
            }
    return out


def load_problem(summary: dict, roles: list[str]) -> str | None:
    """A reason to call the rep failed although the load ran: a role with nothing completed."""
    for role in roles:
        part = summary.get(role)
        if not part:
            return f"the load generator measured nothing for {role}"
        if not part.get("completed"):
            errs = part.get("errors") or []
            first = ""
            if errs:
                e = errs[0]
                first = (
                    f" (first error: {e.get('status')} {e.get('message')})"
                    if isinstance(e, dict)
                    else f" ({e})"
                )
            return (
                f"no {role} request completed inside the window; "
                f"{part.get('failed', 0)} failed{first}"
            )
    return None


def compress_records(rep_dir: Path) -> None:
    """Per-request records are large; keep them gzipped (the report reads either)."""
    for path in rep_dir.glob("*.records.jsonl"):
        tmp = Path(str(path) + ".gz.tmp")
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, str(path) + ".gz")
        path.unlink()
