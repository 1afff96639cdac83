"""`coserve doctor`: what this machine can do for a co-location study, in one table.

GPUs (name, memory, driver, CUDA), compute mode, MIG mode and instances, MPS binaries and any
running daemon, GPM support, profilers (ncu, nsys, dcgmi), torch and its CUDA, vLLM; then which
of coserve's parts have run on real hardware and which are built but not run there. Exits 0
everywhere; on a CPU machine the first row says "no GPU" plainly.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from coserve.gpu import nvml as nv
from coserve.term import stdout_console


@dataclass(frozen=True)
class HardwareRecord:
    part: str
    ran_on: str | None  # GPU, date and where the record is; None: built, not run on hardware


NOT_RUN = "built, not run on hardware"
# What the committed records show (docs/study.md, docs/gpu.md, docs/kernels.md,
# docs/performance.md); change an entry only with a run to point to.
HARDWARE: tuple[HardwareRecord, ...] = (
    HardwareRecord(
        "built-in engine: the study's models, offline and served",
        "H200, 2026-11-25 (docs/performance.md)",
    ),
    HardwareRecord(
        "coserve run/bench/report with the built-in servers: timeslice, mps, graphs and eager",
        "H200, 2026-11-25 (docs/study.md)",
    ),
    HardwareRecord("MPS daemon checks (coserve.gpu.devcheck)", "H100, 2026-11-25 (docs/gpu.md)"),
    HardwareRecord("NVML/GPM telemetry", "H100 and H200, 2026-11-25 (docs/gpu.md, docs/study.md)"),
    HardwareRecord(
        "Hopper kernels (Triton, FP8)",
        "H100 and H200, 2026-11-25 (docs/kernels.md, docs/performance.md)",
    ),
    HardwareRecord("coserve bench against vLLM, SGLang or TEI servers", None),
    HardwareRecord("launcher 'vllm' (binary or docker)", None),
    HardwareRecord("MIG: instance creation (apply_mig), servers on MIG devices", None),
    HardwareRecord(
        "strategy 'exclusive' (one GPU each)",
        "2 x H200, 2026-11-30 (docs/study.md, TP=2 section)",
    ),
    HardwareRecord(
        "built-in engine at TP=2 on two GPUs (offline benchmark, GPU tests, symm-mem, EP)",
        "2 x H200, 2026-11-29 and 2026-11-30 (docs/performance.md, docs/gpu.md)",
    ),
    HardwareRecord(
        "open-loop embed load in coserve run (seed-equal-work, 3 reps)",
        "H200, 2026-11-30 (docs/study.md)",
    ),
    HardwareRecord(
        "tensor parallelism across GPUs in coserve run (tp+mps, tp+timeslice; 3 reps each)",
        "2 x H200, 2026-11-30 (docs/study.md, TP=2 section)",
    ),
    HardwareRecord(
        "co-scheduling: embed granularity, the SLO guard before its probes (1 rep each)",
        "H200, 2026-11-30 (docs/co-scheduling.md)",
    ),
    HardwareRecord(
        "co-scheduling: the SLO guard's probes (median baseline), MPS thread limits and client "
        "priority (1 rep each)",
        "H200, 2026-11-30 (docs/co-scheduling.md, second measurements)",
    ),
    HardwareRecord(
        "the SLO guard's baseline fitted to gen's step work (1 rep)",
        "H200 (GPU 0 of 2), 2026-11-30 (docs/co-scheduling.md, third measurements)",
    ),
    HardwareRecord(
        "built-in engine: the running batch kept in arrays (batch_state.py; GPU tests)",
        "2 x H200, 2026-11-30 (docs/performance.md)",
    ),
    HardwareRecord(
        "coserve profile (torch profiler / CUPTI), graphs and eager, under MPS",
        "H200, 2026-11-30 (docs/mechanism.md)",
    ),
    HardwareRecord(
        "coserve profile --ncu (Nsight Compute wrapper), gen alone and eager; beside embed ncu "
        "fails (another process's context on the GPU)",
        "H200, 2026-11-30 and 2026-12-01 (docs/mechanism.md, L2 cache contention)",
    ),
    HardwareRecord("coserve export's files; coserve run --ray", None),
    HardwareRecord(
        "tensor parallel: the ranks' rendezvous and NCCL's sockets on loopback, symm-mem as "
        "the default all-reduce (the embed server's too)",
        "2x H200, 2026-11-30 (docs/performance.md: the served TP tests; docs/study.md: the "
        "closed loop with symm-mem everywhere)",
    ),
    HardwareRecord(
        "coserve run --resume of a folder whose spec only gained conditions; the SLO guard at "
        "TP=2 over a capped, low-priority MPS client (3 reps, closed loop, 490 and 1,128 "
        "seq/s); a rate sweep's points against the baseline's own",
        "2x H200, 2026-11-30 (docs/study.md, TP=2 section)",
    ),
    HardwareRecord(
        "coserve profile of a TP=2 gen server (rank 0), alone and time-sliced (1 rep each)",
        "2x H200, 2026-11-30 (docs/mechanism.md, the collective wait)",
    ),
    HardwareRecord(
        "serve colocated: stream priorities, green contexts (--embed-sms)",
        "H200, 2026-11-30 (docs/co-scheduling.md, second measurements)",
    ),
    HardwareRecord(
        "serve colocated: a disjoint SM split (--gen-sms; GPU test and 2 reps)",
        "H200 (GPU 0 of 2), 2026-11-30 (docs/co-scheduling.md, third measurements)",
    ),
    HardwareRecord(
        "serve colocated: the SLO guard inside the one process (1 rep)",
        "H200 (GPU 0 of 2), 2026-11-30 (docs/co-scheduling.md, fifth measurements)",
    ),
    HardwareRecord(
        "MoE kernels: expert weights by TMA (GEMM2), the many-program align, the Triton "
        "combine (GPU tests, kernel and engine benchmarks, coserve run gen alone)",
        "H200, 2026-12-01 (docs/kernels.md, docs/performance.md)",
    ),
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the facts as JSON instead of a table"
    )


def _which(name: str, extra_globs: tuple[str, ...] = ()) -> str | None:
    p = shutil.which(name)
    if p:
        return p
    for pattern in extra_globs:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _version(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    text = (r.stdout or r.stderr).strip().splitlines()
    return text[-1].strip() if text else None


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gather(nvml: Any = None, *, with_torch: bool = True) -> dict:
    """Collect the facts; `nvml` may be a fake for tests."""
    from coserve.gpu import mig, mps
    from coserve.gpu.strategies import mps_client_priority_supported

    facts: dict[str, Any] = {"gpu": None, "gpus": [], "driver": None, "cuda_driver": None}
    nvml_ok = True
    try:
        with nv.nvml_session(nvml) as lib:
            facts["driver"], facts["cuda_driver"] = nv.driver_versions(lib)
            gpus = nv.all_gpus(lib)
            facts["gpu"] = f"{len(gpus)} GPU(s)" if gpus else "no GPU: NVML works but sees no GPU"
            for g in gpus:
                allowed, source = mig.allowed_profiles(
                    g.name, g.memory_mib, g.supported_mig_profiles
                )
                layout = mig.default_layout(allowed) if g.mig_current is not None else None
                facts["gpus"].append(
                    {
                        "index": g.index,
                        "name": g.name,
                        "uuid": g.uuid,
                        "memory_mib": g.memory_mib,
                        "compute_mode": g.compute_mode,
                        "mig": None
                        if g.mig_current is None
                        else {"current": g.mig_current, "pending": g.mig_pending},
                        "mig_devices": [
                            {
                                "uuid": d.uuid,
                                "profile": d.profile,
                                "gpu_instance_id": d.gpu_instance_id,
                                "memory_mib": d.memory_mib,
                            }
                            for d in g.mig_devices
                        ],
                        "mig_profiles": sorted(allowed, key=lambda n: allowed[n])
                        if g.mig_current is not None
                        else [],
                        "mig_profiles_source": source if g.mig_current is not None else None,
                        "mig_study_layout": "+".join(layout) if layout else None,
                        "gpm": g.gpm_supported,
                    }
                )
    except nv.NvmlUnavailable as e:
        facts["gpu"] = str(e)
        nvml_ok = False

    control = _which("nvidia-cuda-mps-control")
    facts["mps"] = {
        "control": control,
        "server": _which("nvidia-cuda-mps-server"),
        "running": [p.describe() for p in mps.find_mps_processes()],
        "client_priority": mps_client_priority_supported() if nvml_ok else None,
    }
    ncu = _which("ncu", ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda/bin/ncu"))
    nsys = _which("nsys", ("/opt/nvidia/nsight-systems/*/bin/nsys", "/usr/local/cuda/bin/nsys"))
    facts["tools"] = {
        "nvidia-smi": _which("nvidia-smi"),
        "ncu": ncu,
        "ncu_version": _version([ncu, "--version"]) if ncu else None,
        "nsys": nsys,
        "dcgmi": _which("dcgmi"),
        "docker": _which("docker"),
        "vllm": _which("vllm") or ("python module" if importlib.util.find_spec("vllm") else None),
    }
    facts["python"] = {
        "nvidia-ml-py": _pkg_version("nvidia-ml-py"),
        "vllm": _pkg_version("vllm"),
        "cuda-bindings": _pkg_version("cuda-bindings"),
    }
    if with_torch:
        try:
            import torch

            facts["torch"] = {
                "version": torch.__version__,
                "cuda": torch.version.cuda,
                "cuda_available": bool(torch.cuda.is_available()),
                "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                "green_contexts": bool(
                    getattr(getattr(torch.cuda, "green_contexts", None), "SUPPORTED", False)
                ),
            }
        except Exception as e:  # pragma: no cover - torch is a dependency
            facts["torch"] = {"error": str(e)}
    facts["hardware"] = [asdict(r) for r in HARDWARE]
    facts["env"] = {
        k: os.environ[k]
        for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "NCCL_NVLS_ENABLE")
        if k in os.environ
    }
    return facts


def _yn(v) -> str:
    return {True: "yes", False: "no", None: "unknown"}[v]


def rows(facts: dict) -> list[tuple[str, str]]:
    """The table as (what, value) rows."""
    out: list[tuple[str, str]] = []
    if not facts["gpus"]:
        out.append(("GPU", facts["gpu"] or "no GPU"))
    else:
        out.append(("GPUs", facts["gpu"]))
        out.append(
            ("driver / CUDA", f"{facts['driver'] or '?'} / CUDA {facts['cuda_driver'] or '?'}")
        )
        for g in facts["gpus"]:
            p = f"GPU {g['index']}"
            out.append((p, f"{g['name']}, {g['memory_mib']:,} MiB, {g['uuid']}"))
            out.append((f"{p} compute mode", g["compute_mode"]))
            if g["mig"] is None:
                out.append((f"{p} MIG", "not supported"))
            else:
                state = "enabled" if g["mig"]["current"] else "disabled"
                if g["mig"]["pending"] != g["mig"]["current"]:
                    pending = "enabled" if g["mig"]["pending"] else "disabled"
                    state += f" (pending: {pending}, after reset)"
                devs = (
                    ", ".join(f"{d['profile'] or '?'} {d['uuid']}" for d in g["mig_devices"])
                    or "no instances"
                )
                out.append((f"{p} MIG", f"{state}; {devs}" if g["mig"]["current"] else state))
                if g["mig_profiles"]:
                    out.append(
                        (
                            f"{p} MIG profiles",
                            f"{', '.join(g['mig_profiles'])} (from {g['mig_profiles_source']}); "
                            f"study layout: {g['mig_study_layout'] or 'n/a'}",
                        )
                    )
            out.append(
                (
                    f"{p} GPM",
                    _yn(g["gpm"])
                    + ("" if g["gpm"] else " (no SM/tensor/DRAM activity in telemetry)"),
                )
            )
    m = facts["mps"]
    out.append(("MPS control", m["control"] or "missing (nvidia-cuda-mps-control not on PATH)"))
    out.append(("MPS server", m["server"] or "missing"))
    out.append(("MPS daemons running", "; ".join(m["running"]) if m["running"] else "none"))
    if m["client_priority"] is not None:
        out.append(
            (
                "MPS client priority",
                "supported by libcuda" if m["client_priority"] else "not in this driver",
            )
        )
    t = facts["tools"]
    out.append(("ncu", f"{t['ncu']} ({t['ncu_version']})" if t["ncu"] else "missing"))
    out.append(("nsys", t["nsys"] or "missing"))
    out.append(("dcgmi", t["dcgmi"] or "missing (telemetry uses NVML GPM instead)"))
    out.append(("nvidia-smi", t["nvidia-smi"] or "missing"))
    out.append(("vLLM", t["vllm"] or "missing (launcher 'vllm' unavailable; 'builtin' works)"))
    out.append(("docker", t["docker"] or "missing"))
    tor = facts.get("torch") or {}
    if "error" in tor:
        out.append(("torch", f"import failed: {tor['error']}"))
    elif tor:
        cuda = f"CUDA {tor['cuda']}" if tor["cuda"] else "CPU build"
        avail = (
            f", {tor['device_count']} device(s) visible"
            if tor["cuda_available"]
            else ", no CUDA device"
        )
        out.append(("torch", f"{tor['version']} ({cuda}{avail})"))
        out.append(
            (
                "green contexts",
                "in this torch (serve colocated --embed-sms)"
                if tor.get("green_contexts")
                else "not in this torch (serve colocated --embed-sms is refused)",
            )
        )
    out.append(("nvidia-ml-py", facts["python"]["nvidia-ml-py"] or "missing"))
    out.append(
        (
            "cuda-bindings",
            facts["python"]["cuda-bindings"] or "missing (serve colocated --gen-sms is refused)",
        )
    )
    for k, v in facts["env"].items():
        out.append((f"env {k}", v))
    for r in facts["hardware"]:
        out.append((r["part"], f"ran: {r['ran_on']}" if r["ran_on"] else NOT_RUN))
    return out


def run(args) -> int:
    facts = gather()
    if getattr(args, "json", False):
        print(json.dumps(facts, indent=2, default=str))
        return 0
    from rich.table import Table

    table = Table(title="coserve doctor", show_lines=False)
    table.add_column("what", style="bold")
    table.add_column("this machine")
    for what, value in rows(facts):
        style = "yellow" if value.startswith(("no GPU", "missing", "not ", NOT_RUN)) else None
        table.add_row(what, value, style=style)
    console = stdout_console()
    if not facts["gpus"]:
        console.print(
            f"{facts['gpu']}. coserve runs here on CPU with tiny presets; GPU strategies (mps, "
            "mig, tp) need a GPU."
        )
    console.print(table)
    return 0
