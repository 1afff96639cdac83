"""The typed results of a profile (what trace.py computes, what the report shows), and their
JSON form (`to_dict` / `from_dict`, as `profile/summary.json` of a rep holds them).

Times: `_us` microseconds, `_ms` milliseconds, on the trace's clock (the torch profiler's,
CUPTI's for kernels)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KERNEL_CLASSES = ("attention", "moe_gemm", "dense_gemm", "norm", "collective", "other")


@dataclass
class KernelStat:
    """One kernel name over the window: how often it ran and for how long each time."""

    name: str
    kernel_class: str
    count: int
    total_ms: float
    mean_us: float
    p50_us: float
    p99_us: float


@dataclass
class ClassShare:
    """One kernel class (KERNEL_CLASSES) over the window; `share` of all kernel time, 0..1."""

    kernel_class: str
    count: int
    total_ms: float
    share: float


@dataclass
class StepStat:
    """One engine step: its wall time (the `coserve.step` range on the host), the time the
    device was busy inside it (the union of kernels, clipped to the step) and the part of that
    spent in collectives (NCCL and other all-reduce / all-gather kernels). A collective kernel
    runs until every rank has reached it, so on a tensor-parallel rank this includes the wait
    for the other ranks."""

    index: int
    decode: bool | None  # gen: only decodes (the CUDA-graph path); None: not known (embed)
    wall_ms: float
    busy_ms: float
    kernels: int
    collective_ms: float = 0.0  # summaries written before it was measured read back as 0

    @property
    def busy_fraction(self) -> float:
        return self.busy_ms / self.wall_ms if self.wall_ms > 0 else 0.0


@dataclass
class GapStats:
    """Idle time between consecutive kernels (next start - latest end so far, 0 where they
    overlap) over the window, steps' boundaries included."""

    count: int = 0
    mean_us: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    total_ms: float = 0.0


@dataclass
class ApiStat:
    """One CUDA launch call on the host (cudaLaunchKernel, cudaGraphLaunch, ...) over the
    window: the dispatch latency the study measured with nsys."""

    name: str
    count: int
    mean_us: float
    p50_us: float
    p99_us: float


@dataclass
class Interleave:
    """Gen's kernels against embed's on the same clock, over the time both were captured:
    how much of gen's kernel time ran while an embed kernel ran too (SM sharing), and how much
    of the idle time between gen's kernels an embed kernel filled (interleaving)."""

    window_ms: float = 0.0
    gen_kernel_ms: float = 0.0
    gen_kernel_overlapped_ms: float = 0.0
    gen_gap_ms: float = 0.0
    gen_gap_filled_ms: float = 0.0
    embed_kernels: int = 0


@dataclass
class Span:
    """A kernel on the timeline plot, `start_us` from the window's first step."""

    start_us: float
    dur_us: float
    kernel_class: str


@dataclass
class RoleProfile:
    """One server's window of steps. `source` says what the "kernels" are: CUDA kernels
    (CUPTI), or on a CPU engine the top-level torch ops of the engine thread."""

    role: str
    source: str
    steps: list[StepStat] = field(default_factory=list)
    kernels: list[KernelStat] = field(default_factory=list)  # by total time, largest first
    classes: list[ClassShare] = field(default_factory=list)
    gaps: GapStats = field(default_factory=GapStats)
    timeline: list[Span] = field(default_factory=list)  # the first few steps, for the plot
    launches: list[ApiStat] = field(default_factory=list)  # CUDA launch calls (GPU only)
    trace: str = ""  # the Chrome trace, relative to the run folder

    def decode_steps(self) -> list[StepStat]:
        """The steps known to be pure decode, else every step (embed has no such label)."""
        labelled = [s for s in self.steps if s.decode]
        return labelled or [s for s in self.steps if s.decode is None]

    @property
    def step_wall_ms(self) -> float:
        steps = self.decode_steps()
        return sum(s.wall_ms for s in steps) / len(steps) if steps else 0.0

    @property
    def step_busy_ms(self) -> float:
        steps = self.decode_steps()
        return sum(s.busy_ms for s in steps) / len(steps) if steps else 0.0

    @property
    def step_collective_ms(self) -> float:
        """Mean collective time per decode step (ms); 0 on one rank, which runs none."""
        steps = self.decode_steps()
        return sum(s.collective_ms for s in steps) / len(steps) if steps else 0.0


@dataclass
class ClockSecond:
    """One telemetry tick: clocks, power and NVML's clock-event reasons (True: active)."""

    t_rel_s: float
    device: str
    sm_clock_mhz: float | None
    mem_clock_mhz: float | None
    power_w: float | None
    power_capped: bool | None
    thermal: bool | None
    sync_boost: bool | None


@dataclass
class RepProfile:
    """What `coserve profile` measured in one rep of one condition."""

    condition: str
    roles: dict[str, RoleProfile] = field(default_factory=dict)
    clocks: list[ClockSecond] = field(default_factory=list)
    interleave: Interleave | None = None  # both servers captured
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RepProfile:
        """Raises KeyError or TypeError on a summary of another shape."""
        roles = {}
        for name, r in d.get("roles", {}).items():
            roles[name] = RoleProfile(
                role=r["role"],
                source=r["source"],
                steps=[StepStat(**s) for s in r["steps"]],
                kernels=[KernelStat(**k) for k in r["kernels"]],
                classes=[ClassShare(**c) for c in r["classes"]],
                gaps=GapStats(**r["gaps"]),
                timeline=[Span(**s) for s in r["timeline"]],
                launches=[ApiStat(**a) for a in r.get("launches", [])],
                trace=r.get("trace", ""),
            )
        return cls(
            condition=d["condition"],
            roles=roles,
            clocks=[ClockSecond(**c) for c in d.get("clocks", [])],
            interleave=Interleave(**d["interleave"]) if d.get("interleave") else None,
            notes=list(d.get("notes", [])),
        )
