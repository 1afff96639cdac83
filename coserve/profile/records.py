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

    def _decode_mean(self, attr: str) -> float | None:
        steps = self.decode_steps()
        return sum(getattr(s, attr) for s in steps) / len(steps) if steps else None

    @property
    def step_wall_ms(self) -> float | None:
        """Mean wall time per decode step (ms); None where the window holds none (a window of
        prefill steps only)."""
        return self._decode_mean("wall_ms")

    @property
    def step_busy_ms(self) -> float | None:
        """Mean device-busy time per decode step (ms); None as step_wall_ms."""
        return self._decode_mean("busy_ms")

    @property
    def step_collective_ms(self) -> float | None:
        """Mean collective time per decode step (ms); 0 on one rank, which runs none; None as
        step_wall_ms."""
        return self._decode_mean("collective_ms")


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
    def from_dict(cls, d: Any) -> RepProfile:
        """The summary's JSON read back. Fields added later may be absent; raises KeyError or
        TypeError (naming the field) on a summary of another shape or of wrong types."""
        d = _object(d, "summary")
        roles = {}
        for name, r in _object(d.get("roles", {}), "roles").items():
            w = f"roles.{name}"
            r = _object(r, w)
            roles[name] = RoleProfile(
                role=_typed(r["role"], str, f"{w}.role"),
                source=_typed(r["source"], str, f"{w}.source"),
                steps=_records(StepStat, r["steps"], f"{w}.steps"),
                kernels=_records(KernelStat, r["kernels"], f"{w}.kernels"),
                classes=_records(ClassShare, r["classes"], f"{w}.classes"),
                gaps=_record(GapStats, r["gaps"], f"{w}.gaps"),
                timeline=_records(Span, r["timeline"], f"{w}.timeline"),
                launches=_records(ApiStat, r.get("launches", []), f"{w}.launches"),
                trace=_typed(r.get("trace", ""), str, f"{w}.trace"),
            )
        notes = _typed(d.get("notes", []), list, "notes")
        return cls(
            condition=_typed(d["condition"], str, "condition"),
            roles=roles,
            clocks=_records(ClockSecond, d.get("clocks", []), "clocks"),
            interleave=_record(Interleave, d["interleave"], "interleave")
            if d.get("interleave")
            else None,
            notes=[_typed(n, str, f"notes[{i}]") for i, n in enumerate(notes)],
        )


# The JSON types of the records' annotations (`from __future__ import annotations`: strings);
# a bool is no number here, though Python's bool is an int.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool | None": (bool, type(None)),
    "float | None": (int, float, type(None)),
}


def _typed(v: Any, kind: type, where: str) -> Any:
    if not isinstance(v, kind):
        raise TypeError(f"{where}: expected {kind.__name__}, got {type(v).__name__} {v!r:.40}")
    return v


def _object(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError(f"{where}: expected an object, got {type(v).__name__} {v!r:.40}")
    return v


def _record(kind: type, d: Any, where: str) -> Any:
    """`kind(**d)` with each field of the JSON type its annotation names."""
    try:
        obj = kind(**_object(d, where))
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    for f in dataclasses.fields(kind):
        v = getattr(obj, f.name)
        ok = _JSON_TYPES[f.type]
        if not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok):
            raise TypeError(f"{where}.{f.name}: expected {f.type}, got {v!r:.40}")
    return obj


def _records(kind: type, items: Any, where: str) -> list:
    return [_record(kind, d, f"{where}[{i}]") for i, d in enumerate(_typed(items, list, where))]
