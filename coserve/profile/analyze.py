"""One rep's profile from its folder: each server's trace (profile/ROLE/trace.json.gz, with
profile/ROLE/steps.json) through trace.analyze, and the rep's telemetry (telemetry.jsonl)
as per-tick clocks, power and clock-event reasons."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


def clocks_of(path: Path) -> list[ClockSecond]:
    """The telemetry series (JSON lines, one row per device per tick) as ClockSeconds; []
    without the file (a CPU run records none)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        out.append(
            ClockSecond(
                t_rel_s=float(row.get("t_rel_s", 0.0)),
                device=str(row.get("device", "")),
                sm_clock_mhz=_num(row, "sm_clock_mhz"),
                mem_clock_mhz=_num(row, "mem_clock_mhz"),
                power_w=_num(row, "power_w"),
                power_capped=_flag(row, "power_capped"),
                thermal=_flag(row, "thermal"),
                sync_boost=_flag(row, "sync_boost"),
            )
        )
    return out


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
    out.clocks = clocks_of(rep_dir / "telemetry.jsonl")
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
