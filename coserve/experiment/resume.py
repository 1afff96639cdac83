"""Whether a run folder may take more reps under the spec given now (`coserve run --resume`).

The folder's fingerprint.json says what the finished reps ran on and under which spec (its
hash); its spec.json holds that spec, which tells a spec that only adds conditions (taken)
from one that changes what the finished reps measured (refused). A file that cannot be read
refuses the resume naming it and the field, except a damaged or missing spec.json under the
very spec the folder was started with (same hash): spec.json is then written again from the
spec given (the damaged file kept beside it), since that is what the first run wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coserve.experiment import fingerprint as fpmod
from coserve.experiment.rundir import RunDir, read_object, set_aside, write_json
from coserve.spec import SpecError, parse_spec


class RunRefused(RuntimeError):
    """The run cannot start: the folder holds another run or is being written, the spec or GPU
    differs on resume, or the machine lacks what the spec needs."""


@dataclass
class ResumeCheck:
    """What a resume may go on with: `warnings` (environment differences, a grown spec),
    `notes` (what was repaired), and whether the folder takes the spec given (`grown`)."""

    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    grown: bool = False


def old_fingerprint(rd: RunDir) -> dict[str, Any]:
    """The run folder's fingerprint.json; RunRefused naming it when it cannot be read
    (a resume compares against it, so a damaged one cannot be passed over)."""
    path = rd.fingerprint_file
    try:
        return read_object(path)
    except (OSError, ValueError) as e:
        raise RunRefused(
            f"cannot read {path} ({e}); it records what the finished reps ran on, so "
            "the run cannot be resumed safely: restore the file or use another --out"
        ) from None


def _damaged_fingerprint(rd: RunDir, e: Exception) -> RunRefused:
    why = str(e) if isinstance(e, ValueError) else repr(e)
    return RunRefused(
        f"{rd.fingerprint_file} is damaged ({why}); it records what the finished reps ran on, "
        "so the run cannot be resumed safely: restore the file or use another --out"
    )


def old_spec(rd: RunDir) -> tuple[dict[str, Any] | None, str]:
    """(the folder's spec.json, "") where it holds a valid spec, else (None, why not)."""
    try:
        data = read_object(rd.spec_json)
        parse_spec(data, str(rd.spec_json))
    except FileNotFoundError:
        return None, "it is missing"
    except SpecError as e:
        return None, "; ".join(e.problems)
    except (OSError, ValueError) as e:
        return None, getattr(e, "strerror", None) or str(e)
    return data, ""


def check(
    rd: RunDir, old: dict, new: dict, spec_dict: dict[str, Any], may_grow: bool
) -> ResumeCheck:
    """Compare the folder (`old`: its fingerprint) with the run asked for now (`new`: the
    fingerprint collected here, `spec_dict`: the spec's `to_dict`); `may_grow`: a spec that
    only adds conditions is taken. Rewrites a damaged spec.json under an unchanged spec.
    Raises RunRefused naming the file (and field) that refuses it."""
    try:
        old_hash, new_hash = old["spec"]["hash"], new["spec"]["hash"]
    except (KeyError, TypeError) as e:
        raise _damaged_fingerprint(rd, e) from None
    spec_changed = old_hash != new_hash
    spec, unread = old_spec(rd)
    if spec is None and spec_changed:
        raise RunRefused(
            f"cannot resume {rd.path}: {rd.spec_json} cannot be read ({unread}); the spec "
            f"given hashes {str(new_hash)[:12]}, the folder's {str(old_hash)[:12]}, and "
            "without that file whether the spec given only adds conditions cannot be checked. "
            f"Restore it, resume with the folder's own spec ({rd.spec_file}), or use another "
            "--out."
        )
    added = fpmod.added_conditions(spec, spec_dict) if spec_changed and may_grow else None
    try:
        refuse, warn = fpmod.compare(old, new, added)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # any shape damage takes
        raise _damaged_fingerprint(rd, e) from None
    if refuse and spec_changed:
        changes = fpmod.spec_changes(spec, spec_dict)
        if changes:
            refuse[0] += " (" + "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "") + ")"
    if refuse:
        raise RunRefused(
            f"cannot resume {rd.path}: "
            + "; ".join(refuse)
            + ". Results measured under different settings would be mixed; "
            f"use another --out (the original spec is in {rd.spec_file})."
        )
    out = ResumeCheck(warnings=warn, grown=spec_changed)
    if spec is None:  # the same spec (its hash): spec.json is what the first run wrote
        kept = set_aside(rd.spec_json) if rd.spec_json.exists() else None
        out.notes.append(
            f"{rd.spec_json} could not be read ({unread}); written again from the spec given, "
            "whose hash is the folder's"
            + (f" (the damaged file is kept as {kept.name})" if kept else "")
        )
        write_json(rd.spec_json, spec_dict)
    return out
