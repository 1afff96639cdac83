"""The environment a run was measured in, and whether a resume may add to it.

A resume is refused when the spec or the GPUs differ (the results would not be comparable);
other differences (driver, package versions, commit, host) are reported as warnings and kept
with each rep."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import coserve
from coserve.spec import Spec

PACKAGES = ("torch", "vllm", "triton", "aiohttp", "numpy", "nvidia-ml-py")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


CHANGED_SHOWN = 20  # changed paths a fingerprint keeps; the count says how many there were


def changed_paths(porcelain: str) -> list[str]:
    """The paths `git status --porcelain` lists ("XY path", or "XY old -> new" for a rename:
    the new one)."""
    return [line[3:].split(" -> ")[-1] for line in porcelain.splitlines() if len(line) > 3]


def git_state() -> dict[str, Any]:
    """Commit of the coserve checkout that runs, whether it has uncommitted changes and in
    which files (a copy of a tree whose git metadata lags, as on a lent machine that was
    already warm, names an older commit: the files say what differed from it)."""
    root = Path(coserve.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout  # not stripped: a line starts with its status columns, " M path"
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": [], "changed_count": 0}
    changed = changed_paths(status) if commit else []
    return {
        "commit": commit or None,
        "dirty": bool(status.strip()) if commit else None,
        "changed": changed[:CHANGED_SHOWN],
        "changed_count": len(changed),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_state() -> dict[str, Any]:
    """GPUs as NVML sees them; {"gpus": [], "note": "no GPU: ..."} without one."""
    from coserve.gpu import nvml as nv

    try:
        with nv.nvml_session() as lib:
            gpus = nv.all_gpus(lib, with_mig_profiles=False)
            driver, cuda = nv.driver_versions(lib)
    except nv.NvmlUnavailable as e:
        return {"gpus": [], "driver": None, "cuda_driver": None, "note": str(e)}
    return {
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "uuid": g.uuid,
                "memory_mib": g.memory_mib,
                "compute_mode": g.compute_mode,
                "mig": g.mig_current,
                "mig_devices": [m.uuid for m in g.mig_devices],
            }
            for g in gpus
        ],
        "driver": driver,
        "cuda_driver": cuda,
        "note": None if gpus else "no GPU: NVML lists none",
    }


def used_gpu_indices(spec: Spec, gpus: list[dict]) -> list[int]:
    """Indices of the physical GPUs the spec's conditions name (UUIDs and MIG UUIDs resolved)."""
    used: set[int] = set()
    for c in spec.all_conditions():
        for g in c.gpus:
            if g.isdigit():
                used.add(int(g))
                continue
            for info in gpus:
                if g == info["uuid"] or g in info.get("mig_devices", []):
                    used.add(info["index"])
    return sorted(used)


def collect(spec: Spec, spec_text: str | None = None) -> dict[str, Any]:
    gpu = gpu_state()
    idx = used_gpu_indices(spec, gpu["gpus"])
    by_index = {g["index"]: g for g in gpu["gpus"]}
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "spec": {"name": spec.name, "hash": spec.digest(), "file": spec.source},
        "coserve": coserve.__version__,
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu": {"model": _cpu_model(), "count": os.cpu_count()},
        "packages": {p: _version(p) for p in PACKAGES},
        **gpu,
        "gpus_used": [
            {"index": i, "name": by_index[i]["name"], "memory_mib": by_index[i]["memory_mib"]}
            for i in idx
            if i in by_index
        ],
        "argv": sys.argv,
    }


def describe_gpus(fp: dict[str, Any]) -> str:
    used = fp.get("gpus_used") or []
    if not fp.get("gpus"):
        return "no GPU (CPU only)"
    names = [g["name"] for g in used] or [g["name"] for g in fp["gpus"]]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    text = ", ".join(f"{k}x {n}" for n, k in counts.items())
    return f"{text} (driver {fp.get('driver') or '?'})"


def _gpu_identity(fp: dict[str, Any]) -> list[tuple[str, int]] | None:
    """(name, GiB) of each GPU used (else each listed), None without GPUs. Raises ValueError
    naming the field whose memory is no finite number of MiB, KeyError, TypeError."""
    if not fp.get("gpus"):
        return None
    key = "gpus_used" if fp.get("gpus_used") else "gpus"
    out = []
    for i, g in enumerate(fp[key]):
        mib = g["memory_mib"]
        if isinstance(mib, bool) or not isinstance(mib, int | float) or not math.isfinite(mib):
            raise ValueError(f"{key}[{i}].memory_mib is {mib!r}, not a number of MiB")
        out.append((g["name"], int(mib) // 1024))
    return out


def added_conditions(old: dict[str, Any], new: dict[str, Any]) -> list[str] | None:
    """The names of the conditions the spec `new` adds to `old` (both validated specs'
    dicts), where conditions added (to the matrix, and to the sweep's list) and another
    description are all that differ: the finished reps' conditions are then unchanged and a
    resume may run the new ones beside them. None when anything else differs."""
    old_c = {c["name"]: c for c in old.get("conditions", [])}
    new_c = {c["name"]: c for c in new.get("conditions", [])}
    if any(new_c.get(name) != c for name, c in old_c.items()):
        return None

    def rest(spec: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in spec.items() if k not in ("conditions", "description")}
        if isinstance(out.get("sweep"), dict):
            out["sweep"] = {k: v for k, v in out["sweep"].items() if k != "conditions"}
        return out

    if rest(old) != rest(new):
        return None
    swept_old = (old.get("sweep") or {}).get("conditions")
    swept_new = (new.get("sweep") or {}).get("conditions")
    if swept_old != swept_new and not (
        swept_old is not None and swept_new is not None and set(swept_old) <= set(swept_new)
    ):
        return None
    swept = [f"{name}'s sweep" for name in swept_new or () if name not in (swept_old or ())]
    return [name for name in new_c if name not in old_c] + swept


def compare(
    old: dict[str, Any], new: dict[str, Any], added: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """(reasons to refuse a resume, warnings) for adding `new`'s reps to `old`'s run. `added`:
    `added_conditions` of the two specs, which makes a changed spec a warning."""
    refuse, warn = [], []
    if old["spec"]["hash"] != new["spec"]["hash"] and added is not None:
        warn.append(
            (f"the spec grown by {', '.join(added)}" if added else "a new description")
            + " (the finished reps' conditions unchanged)"
        )
    elif old["spec"]["hash"] != new["spec"]["hash"]:
        refuse.append(
            f"the spec differs: this run folder was started with spec hash "
            f"{old['spec']['hash'][:12]} ({old['spec'].get('file')}), "
            f"the spec given now hashes {new['spec']['hash'][:12]} ({new['spec'].get('file')})"
        )
    if _gpu_identity(old) != _gpu_identity(new):
        refuse.append(
            f"the GPU differs: the run folder was measured on {describe_gpus(old)}, "
            f"this machine has {describe_gpus(new)}"
        )
    if old.get("driver") != new.get("driver") and _gpu_identity(old) == _gpu_identity(new):
        warn.append(f"driver {old.get('driver')} -> {new.get('driver')}")
    if old.get("git", {}).get("commit") != new.get("git", {}).get("commit"):
        warn.append(
            f"coserve commit {str(old.get('git', {}).get('commit'))[:12]} -> "
            f"{str(new.get('git', {}).get('commit'))[:12]}"
        )
    for pkg in PACKAGES:
        a, b = old.get("packages", {}).get(pkg), new.get("packages", {}).get(pkg)
        if a != b:
            warn.append(f"{pkg} {a} -> {b}")
    return refuse, warn


def short(fp: dict[str, Any]) -> dict[str, Any]:
    """What each rep keeps of the environment it ran in."""
    return {
        "host": fp["host"],
        "git": fp["git"],
        "gpus": describe_gpus(fp),
        "driver": fp.get("driver"),
        "packages": {k: v for k, v in fp["packages"].items() if v},
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) and "name" in x for x in d):
        out = {}
        for x in d:
            out.update(_flatten(x, f"{prefix}[{x['name']}]"))
        return out
    return {prefix: d}


def spec_changes(old: dict, new: dict) -> list[str]:
    """'dotted.path: old -> new' for each field where two validated specs differ; a condition
    only one has is one entry, 'conditions[NAME]: added' (or removed)."""
    a, b = _flatten(old), _flatten(new)
    names = [{c.get("name") for c in s.get("conditions", [])} for s in (old, new)]
    whole = {n: "added" for n in names[1] - names[0]} | {n: "removed" for n in names[0] - names[1]}
    out = [f"conditions[{n}]: {how}" for n, how in sorted(whole.items())]
    return out + [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
        and not any(k.startswith(f"conditions[{n}].") for n in whole)
    ]
