"""One rep's profile from its folder: each server's trace (profile/ROLE/trace.json.gz, with
profile/ROLE/steps.json) through trace.analyze, and the rep's telemetry (telemetry.jsonl)
as per-tick clocks, power and clock-event reasons."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from coserve.experiment.rep import load_times, read_telemetry
from coserve.profile.cross import interleave
from coserve.profile.records import ClockSecond, RepProfile
from coserve.profile.trace import analyze, load_events

log = logging.getLogger("coserve.profile")


def _flag(row: dict, key: str) -> bool | None:
    v = row.get(key)
    return None if v is None else bool(v)


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, int | float) else None


def clocks_of(rep_dir: Path) -> list[ClockSecond]:
    """The rep's telemetry ticks (telemetry.jsonl, one row per device per tick) taken while
    its load ran, warm-up and window (bench.json's times), as ClockSeconds with `t_rel_s`
    counted from the load's start; every tick where bench.json gives no times. [] without
    telemetry (a CPU run records none). The sampler runs from server start-up to tear-down,
    which for a profiled rep includes writing the traces: idle ticks that would pull the
    means towards idle clocks and power."""
    try:
        rows = read_telemetry(rep_dir / "telemetry.jsonl")
    except OSError:
        return []
    try:
        times = load_times(json.loads((rep_dir / "bench.json").read_text()))
    except (OSError, ValueError):
        times = None
    if times is not None:
        rows = [r for r in rows if times.started <= r["t"] <= times.window_end]
    origin = times.started if times is not None else (rows[0]["t"] if rows else 0.0)
    return [
        ClockSecond(
            t_rel_s=round(r["t"] - origin, 3),
            device=str(r.get("device", "")),
            sm_clock_mhz=_num(r, "sm_clock_mhz"),
            mem_clock_mhz=_num(r, "mem_clock_mhz"),
            power_w=_num(r, "power_w"),
            power_capped=_flag(r, "power_capped"),
            thermal=_flag(r, "thermal"),
            sync_boost=_flag(r, "sync_boost"),
        )
        for r in rows
    ]


def analyze_rep(rep_dir: Path, roles: list[str]) -> RepProfile:
    """The RepProfile of the rep in `rep_dir` (reps/CONDITION/rep-N) for the servers in
    `roles` whose traces were written; a trace that cannot be read becomes a note."""
    rep_dir = Path(rep_dir)
    out = RepProfile(condition=rep_dir.parent.name)
    events_of: dict[str, list[dict]] = {}
    for role in roles:
        pdir = rep_dir / "profile" / role
        try:
            events = load_events(pdir / "trace.json.gz")
            meta = json.loads((pdir / "steps.json").read_text())
            prof = analyze(role, events, meta.get("steps"))
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: profile not analysed: %s", role, e)
            out.notes.append(f"{role}: trace not analysed ({e})")
            continue
        prof.trace = str((pdir / "trace.json.gz").relative_to(rep_dir.parent.parent.parent))
        out.roles[role] = prof
        events_of[role] = events
    if "gen" in events_of and "embed" in events_of:
        out.interleave = interleave(events_of["gen"], events_of["embed"])
    out.clocks = clocks_of(rep_dir)
    return out


def read_summary(path: Path) -> RepProfile:
    """A rep's profile/summary.json. Raises ValueError saying why it cannot be read (no such
    file, not JSON, another shape or wrong types: the field named)."""
    try:
        return RepProfile.from_dict(json.loads(Path(path).read_text()))
    except KeyError as e:
        raise ValueError(f"no {e} in it") from e
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(str(e)) from e
