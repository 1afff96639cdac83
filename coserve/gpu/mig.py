"""MIG partition plans: profiles -> validated plan -> MIG device UUIDs for each server.

A plan is a list of GPU-instance profiles, one per server in role order (gen first), e.g.
`4g.71gb+3g.71gb` on an H200 (the study's layout) or its H100 80GB equivalent
`4g.40gb+3g.40gb`. Plans are validated against the profiles the driver reports for the GPU
(NVML `nvmlDeviceGetGpuInstanceProfileInfo`) and, where NVML cannot tell (MIG off, no GPU
here), against the built-in table of NVIDIA's published profiles.

Creating instances changes the card, so it happens only when asked (`apply=True`, the
`--apply-mig` flag), after the plan is printed, and only for the instances that are missing.
coserve never destroys instances and never switches MIG mode on or off.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from coserve.gpu import nvml as nv

# NVIDIA's published GPU-instance profiles: name -> (compute slices of 7, memory slices of 8).
_H200 = {
    "1g.18gb": (1, 1),
    "1g.35gb": (1, 2),
    "2g.35gb": (2, 2),
    "3g.71gb": (3, 4),
    "4g.71gb": (4, 4),
    "7g.141gb": (7, 8),
}
_H100_80 = {
    "1g.10gb": (1, 1),
    "1g.20gb": (1, 2),
    "2g.20gb": (2, 2),
    "3g.40gb": (3, 4),
    "4g.40gb": (4, 4),
    "7g.80gb": (7, 8),
}
_H100_94 = {
    "1g.12gb": (1, 1),
    "1g.24gb": (1, 2),
    "2g.24gb": (2, 2),
    "3g.47gb": (3, 4),
    "4g.47gb": (4, 4),
    "7g.94gb": (7, 8),
}
_A100_80 = dict(_H100_80)
_A100_40 = {
    "1g.5gb": (1, 1),
    "1g.10gb": (1, 2),
    "2g.10gb": (2, 2),
    "3g.20gb": (3, 4),
    "4g.20gb": (4, 4),
    "7g.40gb": (7, 8),
}
KNOWN_PROFILES: dict[str, dict[str, tuple[int, int]]] = {
    "H200": _H200,
    "H100-80GB": _H100_80,
    "H100-94GB": _H100_94,
    "A100-80GB": _A100_80,
    "A100-40GB": _A100_40,
}
# The study's layout and its equivalents: gen on 4 of 7 compute slices, embed on the other 3.
STUDY_LAYOUT = {
    "H200": "4g.71gb+3g.71gb",
    "H100-80GB": "4g.40gb+3g.40gb",
    "H100-94GB": "4g.47gb+3g.47gb",
    "A100-80GB": "4g.40gb+3g.40gb",
    "A100-40GB": "4g.20gb+3g.20gb",
}
COMPUTE_SLICES = 7
MEMORY_SLICES = 8
_PROFILE_RE = re.compile(r"^(\d)g\.(\d+)gb$")


class MigError(RuntimeError):
    """A MIG plan that cannot be used here; the message says what is missing."""


def gpu_family(name: str, memory_mib: int) -> str | None:
    n = (name or "").upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100-94GB" if memory_mib > 90_000 or "NVL" in n else "H100-80GB"
    if "A100" in n:
        return "A100-80GB" if memory_mib > 50_000 else "A100-40GB"
    return None


def parse_profiles(profiles: str | list[str]) -> list[str]:
    if isinstance(profiles, str):
        items = [p for p in re.split(r"[+,\s]+", profiles.strip()) if p]
    else:
        items = [str(p).strip() for p in profiles]
    out = []
    for p in items:
        p = p.lower().removeprefix("mig ").removeprefix("mig-")
        if not _PROFILE_RE.match(p):
            raise MigError(
                f"bad MIG profile {p!r}: expected the form '<compute slices>g.<memory>gb', e.g. "
                "4g.71gb"
            )
        out.append(p)
    if not out:
        raise MigError("empty MIG plan: give profiles such as '4g.71gb+3g.71gb'")
    return out


def profile_slices(supported: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """NVML profile info -> (compute slices, memory slices), memory slices from the memory size."""
    if not supported:
        return {}
    full = max(info["memory_mib"] for info in supported.values())
    out = {}
    for name, info in supported.items():
        mem_slices = max(1, round(info["memory_mib"] * MEMORY_SLICES / full)) if full else 1
        out[name] = (int(info["slices"]), int(mem_slices))
    return out


@dataclass
class MigPlan:
    gpu: str
    gpu_name: str | None
    profiles: list[str]
    roles: list[str]
    source: str  # where the allowed profiles came from: "nvml" or "builtin:<family>"
    allowed: dict[str, tuple[int, int]] = field(default_factory=dict)

    def create_command(self, missing: list[str] | None = None) -> list[str]:
        todo = self.profiles if missing is None else missing
        return ["nvidia-smi", "mig", "-i", str(self.gpu), "-cgi", ",".join(todo), "-C"]

    def render(self) -> str:
        used_c = sum(self.allowed.get(p, (0, 0))[0] for p in self.profiles)
        used_m = sum(self.allowed.get(p, (0, 0))[1] for p in self.profiles)
        lines = [
            f"MIG plan for GPU {self.gpu}"
            + (f" ({self.gpu_name})" if self.gpu_name else "")
            + f": {'+'.join(self.profiles)}  [profiles checked against {self.source}]"
        ]
        for role, prof in zip(self.roles, self.profiles, strict=False):
            c, m = self.allowed.get(prof, (0, 0))
            lines.append(
                f"  {role:<6} -> {prof:<9} {c}/{COMPUTE_SLICES} compute slices, "
                f"{m}/{MEMORY_SLICES} memory slices"
            )
        lines.append(
            f"  total     {used_c}/{COMPUTE_SLICES} compute, {used_m}/{MEMORY_SLICES} memory"
        )
        lines.append("  create with: " + " ".join(self.create_command()))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "gpu_name": self.gpu_name,
            "profiles": list(self.profiles),
            "roles": list(self.roles),
            "source": self.source,
        }


def allowed_profiles(
    gpu_name: str | None, memory_mib: int, nvml_supported: dict[str, dict] | None
) -> tuple[dict[str, tuple[int, int]], str]:
    if nvml_supported:
        return profile_slices(nvml_supported), "nvml"
    fam = gpu_family(gpu_name or "", memory_mib)
    if fam is None:
        return {}, "nothing (GPU not known to have MIG)"
    return dict(KNOWN_PROFILES[fam]), f"builtin:{fam}"


def default_layout(allowed: dict[str, tuple[int, int]]) -> list[str] | None:
    """The study's 4g + 3g layout among the allowed profiles (largest memory of each)."""

    def best(compute: int) -> str | None:
        cands = [(m, name) for name, (c, m) in allowed.items() if c == compute]
        return max(cands)[1] if cands else None

    four, three = best(4), best(3)
    return [four, three] if four and three else None


def make_plan(
    gpu: str,
    gpu_name: str | None,
    memory_mib: int,
    profiles: str | list[str] | None,
    roles: list[str],
    nvml_supported: dict[str, dict] | None = None,
) -> MigPlan:
    """Build and validate a plan; raises MigError naming what does not fit."""
    allowed, source = allowed_profiles(gpu_name, memory_mib, nvml_supported)
    if profiles in (None, "", "auto"):
        chosen = default_layout(allowed)
        if chosen is None:
            raise MigError(
                f"no default MIG layout for GPU {gpu} ({gpu_name or 'unknown'}): profiles known "
                f"from {source}: "
                f"{', '.join(sorted(allowed)) or 'none'}; give them explicitly, e.g. profiles = "
                "'4g.71gb+3g.71gb'"
            )
    else:
        chosen = parse_profiles(profiles)
    plan = MigPlan(
        gpu=str(gpu),
        gpu_name=gpu_name,
        profiles=chosen,
        roles=list(roles),
        source=source,
        allowed=allowed,
    )
    errors = validate(plan)
    if errors:
        raise MigError("MIG plan does not fit:\n  " + "\n  ".join(errors) + "\n" + plan.render())
    return plan


def validate(plan: MigPlan) -> list[str]:
    errors = []
    if len(plan.profiles) != len(plan.roles):
        errors.append(
            f"{len(plan.profiles)} profiles for {len(plan.roles)} servers "
            f"({', '.join(plan.roles)}): give one profile per server"
        )
    if plan.allowed:
        unknown = [p for p in plan.profiles if p not in plan.allowed]
        if unknown:
            errors.append(
                f"GPU {plan.gpu} ({plan.gpu_name or 'unknown'}) does not offer "
                f"{', '.join(unknown)}; "
                f"it offers {', '.join(sorted(plan.allowed, key=lambda n: plan.allowed[n]))} (from "
                f"{plan.source})"
            )
        else:
            c = sum(plan.allowed[p][0] for p in plan.profiles)
            m = sum(plan.allowed[p][1] for p in plan.profiles)
            if c > COMPUTE_SLICES:
                errors.append(f"needs {c} compute slices, the GPU has {COMPUTE_SLICES}")
            if m > MEMORY_SLICES:
                errors.append(f"needs {m} memory slices, the GPU has {MEMORY_SLICES}")
    else:
        errors.append(
            f"GPU {plan.gpu} ({plan.gpu_name or 'unknown'}) has no MIG profiles known to NVML or "
            "to coserve"
        )
    return errors


def match_instances(
    plan: MigPlan, existing: list[nv.MigDevice]
) -> tuple[dict[str, str], list[str]]:
    """Assign existing MIG devices to roles by profile: ({role: MIG uuid}, [missing profiles])."""
    free = list(existing)
    assigned: dict[str, str] = {}
    missing: list[str] = []
    for role, prof in zip(plan.roles, plan.profiles, strict=False):
        hit = next((d for d in free if d.profile == prof), None)
        if hit is None:
            missing.append(prof)
        else:
            free.remove(hit)
            assigned[role] = hit.uuid
    return assigned, missing


def describe_existing(existing: list[nv.MigDevice]) -> str:
    if not existing:
        return "none"
    return ", ".join(f"{d.profile or '?'} {d.uuid}" for d in existing)


def resolve(
    gpu: str,
    profiles: str | list[str] | None,
    roles: list[str],
    *,
    apply: bool = False,
    nvml: Any = None,
    run_cmd=subprocess.run,
    out=None,
) -> tuple[MigPlan, dict[str, str], list[str]]:
    """Plan, print, check MIG mode and instances, create missing ones if `apply`.

    Returns (plan, {role: MIG uuid}, created profiles). Raises MigError saying what is missing."""
    out = out or sys.stderr
    try:
        with nv.nvml_session(nvml) as lib:
            return _resolve_on(lib, gpu, profiles, roles, apply, run_cmd, out)
    except nv.NvmlUnavailable as e:
        # Still show the plan the user asked for when it can be checked offline.
        fam_plan = ""
        if profiles not in (None, "", "auto"):
            try:
                fam_plan = "\nplan (unchecked, no GPU to check against): " + "+".join(
                    parse_profiles(profiles)
                )
            except MigError as pe:
                fam_plan = f"\n{pe}"
        raise MigError(f"MIG needs an NVIDIA GPU with MIG support; {e}{fam_plan}") from e


def _resolve_on(
    lib: Any, gpu: str, profiles, roles: list[str], apply: bool, run_cmd, out
) -> tuple[MigPlan, dict[str, str], list[str]]:
    idx = nv.resolve_gpu_index(lib, gpu)
    if idx is None:
        raise MigError(f"GPU {gpu!r} not found by NVML")
    info = nv.gpu_info(lib, idx)
    if info.mig_current is None:
        raise MigError(
            f"GPU {idx} ({info.name}) does not support MIG (no MIG mode in NVML): no MIG plan "
            "possible; "
            f"use timeslice, mps or exclusive"
        )
    plan = make_plan(
        str(idx), info.name, info.memory_mib, profiles, roles, info.supported_mig_profiles
    )
    print(plan.render(), file=out)
    if not info.mig_current:
        pending = (
            " (MIG is pending: it turns on after a GPU reset or reboot)" if info.mig_pending else ""
        )
        raise MigError(
            f"MIG mode is off on GPU {idx} ({info.name}){pending}. Missing: MIG mode, then the "
            "instances "
            f"{'+'.join(plan.profiles)}.\n"
            f"  1. as root, with no process on the GPU: nvidia-smi -i {idx} -mig 1   (coserve "
            f"never switches MIG mode)\n"
            "  2. create the instances: rerun with --apply-mig, or: "
            f"{' '.join(plan.create_command())}\n"
            f"{plan.render()}"
        )
    assigned, missing = match_instances(plan, info.mig_devices)
    created: list[str] = []
    if missing and apply:
        cmd = plan.create_command(missing)
        print(f"--apply-mig: creating {'+'.join(missing)} on GPU {idx}: {' '.join(cmd)}", file=out)
        try:
            res = run_cmd(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError as e:
            raise MigError(f"cannot create MIG instances: nvidia-smi not found ({e})") from e
        if res.returncode != 0:
            raise MigError(
                f"creating MIG instances failed ({' '.join(cmd)} exited {res.returncode}):\n"
                f"{(res.stdout or '')}{(res.stderr or '')}".rstrip()
            )
        created = list(missing)
        info = nv.gpu_info(lib, idx, with_mig_profiles=False)
        assigned, missing = match_instances(plan, info.mig_devices)
    if missing:
        raise MigError(
            f"GPU {idx} ({info.name}) lacks MIG instances {'+'.join(missing)} for the plan "
            f"{'+'.join(plan.profiles)}; "
            f"existing: {describe_existing(info.mig_devices)}.\n"
            "  rerun with --apply-mig to create the missing ones (coserve only creates, never "
            "destroys), or: "
            f"{' '.join(plan.create_command(missing))}\n{plan.render()}"
        )
    return plan, assigned, created
