"""From a server's Chrome trace (step_profile.py wrote it) to a RoleProfile: per-kernel
durations, busy time against wall time per step, gaps between consecutive kernels, and the
kernel-class breakdown.

The steps are the `coserve.step` ranges on the host. The "kernels" are the trace's CUDA
kernels (cat "kernel") when it has any; a CPU engine has none, and then the top-level torch
ops of the thread that ran the steps stand in for them, so the same tables come out on CPU.
A torch reference kernel runs inside a KERNEL_RANGE range while profiled: that range is the
top-level "op", named and classed as the kernel's GPU twin (the MoE reference's matmuls and
index_add_ count as moe_gemm, the attention reference's einsums as attention).

    events = load_events(rep_dir / "profile" / "gen" / "trace.json.gz")
    prof = analyze("gen", events, step_labels)   # step_labels: steps.json's "steps"
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coserve.engine.kernels import KERNEL_RANGE
from coserve.profile.records import (
    KERNEL_CLASSES,
    ApiStat,
    ClassShare,
    GapStats,
    KernelStat,
    RoleProfile,
    Span,
    StepStat,
)
from coserve.server.step_profile import STEP_RANGE

TIMELINE_STEPS = 3  # steps of kernels kept for the timeline plot
TIMELINE_MAX = 4000

# First match wins: MoE and attention before GEMM (a MoE GEMM is a GEMM too), norms before
# the rest. coserve's Triton kernels (engine/kernels/triton) are named _<what>_kernel.
_CLASS_PATTERNS = (
    ("collective", r"nccl|all_?reduce|all_?gather|reduce_?scatter|custom_ar|cross_device"),
    ("moe_gemm", r"moe|expert|topk_softmax|grouped_gemm"),
    ("attention", r"attn|attention|flash|fmha|paged_decode|merge_splits|sdpa|paged_prefill"),
    ("norm", r"norm"),
    (
        "dense_gemm",
        r"gemm|gemv|cutlass|xmma|cublas|nvjet|matmul|aten::(mm|addmm|bmm|linear)\b|_scaled_mm"
        r"|fp8_block_linear",
    ),
)
_COMPILED = tuple((cls, re.compile(p, re.IGNORECASE)) for cls, p in _CLASS_PATTERNS)


def classify(name: str) -> str:
    """The kernel class (records.KERNEL_CLASSES) of a kernel or op name."""
    for cls, pat in _COMPILED:
        if pat.search(name):
            return cls
    return "other"


@dataclass
class Interval:
    """A kernel or op on the trace's clock (microseconds)."""

    name: str
    start: float
    dur: float

    @property
    def end(self) -> float:
        return self.start + self.dur


def load_events(path: Path) -> list[dict]:
    """The traceEvents of a Chrome trace (.json or .json.gz). Raises OSError, ValueError."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list")
    return events


def _complete(events: list[dict], cat: str) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") == cat and "dur" in e]


def steps_of(events: list[dict]) -> list[Interval]:
    """The `coserve.step` ranges, in time order."""
    ranges = [e for e in _complete(events, "user_annotation") if e.get("name") == STEP_RANGE]
    return sorted(
        (Interval(STEP_RANGE, float(e["ts"]), float(e["dur"])) for e in ranges),
        key=lambda i: i.start,
    )


def kernels_of(events: list[dict], steps: list[Interval]) -> tuple[list[Interval], str]:
    """(kernels in time order, source): the CUDA kernels, or without any the top-level CPU ops
    (kernel ranges included) inside the steps on the steps' thread."""
    kernels = _complete(events, "kernel")
    if kernels:
        out = [Interval(str(e["name"]), float(e["ts"]), float(e["dur"])) for e in kernels]
        return sorted(out, key=lambda i: i.start), "cuda kernels"
    step_tids = {
        e.get("tid") for e in _complete(events, "user_annotation") if e.get("name") == STEP_RANGE
    }
    candidates = [
        (0, e)
        for e in _complete(events, "user_annotation")
        if str(e.get("name", "")).startswith(KERNEL_RANGE)
    ] + [(1, e) for e in _complete(events, "cpu_op")]
    # by start, the longest first, and a kernel range before an op as long that starts with it
    # (its child)
    ordered = sorted(
        (float(e["ts"]), -float(e["dur"]), rank, str(e["name"]))
        for rank, e in candidates
        if e.get("tid") in step_tids
    )
    ops = [Interval(name, start, -neg_dur) for start, neg_dur, _, name in ordered]
    top: list[Interval] = []
    for op in ops:  # an op inside the last top-level one is its child
        if top and op.start < top[-1].end:
            continue
        if any(s.start <= op.start < s.end for s in steps):
            top.append(op)
    return top, "cpu ops (no CUDA kernels in the trace)"


class Coverage:
    """The union of intervals, asked how much of a span it covers in O(log n): the
    co-located traces' interleave asks once per gen kernel, ~10^5 kernels against ~10^5 of
    embed's (a scan per question took 150 s for 2 s of trace, two H200s, 2026-11-30)."""

    def __init__(self, intervals: list[Interval]):
        starts, ends = [], []
        for iv in sorted(intervals, key=lambda iv: iv.start):
            if iv.end <= iv.start:
                continue
            if ends and iv.start <= ends[-1]:
                ends[-1] = max(ends[-1], iv.end)
            else:
                starts.append(iv.start)
                ends.append(iv.end)
        self._starts = np.asarray(starts, dtype=np.float64)
        self._ends = np.asarray(ends, dtype=np.float64)
        # before[i]: the length of the first i merged intervals
        self._before = np.concatenate(([0.0], np.cumsum(self._ends - self._starts)))

    def _up_to(self, x: float) -> float:
        """Microseconds covered before `x`."""
        k = int(np.searchsorted(self._starts, x, side="right"))
        if k == 0:
            return 0.0
        return float(self._before[k] - max(0.0, self._ends[k - 1] - x))

    def ms(self, lo: float, hi: float) -> float:
        """Milliseconds of [lo, hi) (microseconds) covered by at least one interval."""
        return max(0.0, self._up_to(hi) - self._up_to(lo)) / 1e3


def gaps_us(kernels: list[Interval]) -> list[float]:
    """Idle time before each kernel after the first: its start minus the latest end so far,
    0 where it overlaps (kernels sorted by start)."""
    out, latest = [], None
    for k in kernels:
        if latest is not None:
            out.append(max(0.0, k.start - latest))
            latest = max(latest, k.end)
        else:
            latest = k.end
    return out


def gap_stats(gaps: list[float]) -> GapStats:
    if not gaps:
        return GapStats()
    a = np.asarray(gaps, dtype=float)
    return GapStats(
        count=len(gaps),
        mean_us=float(a.mean()),
        p50_us=float(np.percentile(a, 50)),
        p99_us=float(np.percentile(a, 99)),
        max_us=float(a.max()),
        total_ms=float(a.sum()) / 1e3,
    )


def kernel_stats(kernels: list[Interval]) -> list[KernelStat]:
    """Per kernel name: count, total, mean, p50 and p99 of its durations; largest total first."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for k in kernels:
        by_name[k.name].append(k.dur)
    out = []
    for name, durs in by_name.items():
        a = np.asarray(durs, dtype=float)
        out.append(
            KernelStat(
                name=name,
                kernel_class=classify(name),
                count=len(durs),
                total_ms=float(a.sum()) / 1e3,
                mean_us=float(a.mean()),
                p50_us=float(np.percentile(a, 50)),
                p99_us=float(np.percentile(a, 99)),
            )
        )
    return sorted(out, key=lambda k: (-k.total_ms, k.name))


def _pcts(values: list[float]) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def launch_stats(events: list[dict], lo: float, hi: float) -> list[ApiStat]:
    """Per CUDA launch call (runtime or driver API, name containing "Launch") that started in
    [lo, hi): count and host duration; most frequent first. [] on CPU."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        name = str(e.get("name", ""))
        if "Launch" in name and lo <= float(e["ts"]) < hi:
            by_name[name].append(float(e["dur"]))
    out = [ApiStat(name, len(d), *_pcts(d)) for name, d in by_name.items()]
    return sorted(out, key=lambda a: (-a.count, a.name))


def class_shares(stats: list[KernelStat]) -> list[ClassShare]:
    """Kernel time per class (every class, in KERNEL_CLASSES order), with its share."""
    total = sum(k.total_ms for k in stats)
    out = []
    for cls in KERNEL_CLASSES:
        mine = [k for k in stats if k.kernel_class == cls]
        ms = sum(k.total_ms for k in mine)
        out.append(
            ClassShare(cls, sum(k.count for k in mine), ms, ms / total if total > 0 else 0.0)
        )
    return out


def step_stats(
    steps: list[Interval], kernels: list[Interval], labels: list[dict] | None = None
) -> list[StepStat]:
    """Per step: wall ms, busy ms (kernels' union clipped to the step), collective ms (the
    same for the collective class alone), kernels started in it. `labels` (steps.json's, in
    the same order) give each step's decode flag."""
    busy = Coverage(kernels)
    collective = Coverage([k for k in kernels if classify(k.name) == "collective"])
    starts = np.sort(np.asarray([k.start for k in kernels], dtype=np.float64))
    out = []
    for i, s in enumerate(steps):
        label = labels[i] if labels is not None and i < len(labels) else {}
        out.append(
            StepStat(
                index=i,
                decode=label.get("decode"),
                wall_ms=s.dur / 1e3,
                busy_ms=busy.ms(s.start, s.end),
                kernels=int(
                    np.searchsorted(starts, s.end, side="left")
                    - np.searchsorted(starts, s.start, side="left")
                ),
                collective_ms=collective.ms(s.start, s.end),
            )
        )
    return out


def timeline(steps: list[Interval], kernels: list[Interval]) -> list[Span]:
    """The kernels of the first TIMELINE_STEPS steps, from the first step's start."""
    if not steps:
        return []
    t0 = steps[0].start
    t1 = steps[min(TIMELINE_STEPS, len(steps)) - 1].end
    spans = [Span(k.start - t0, k.dur, classify(k.name)) for k in kernels if t0 <= k.start < t1]
    return spans[:TIMELINE_MAX]


def analyze(role: str, events: list[dict], labels: list[dict] | None = None) -> RoleProfile:
    """The RoleProfile of one server's trace events. Kernels outside the steps' window
    (the first step's start to the last one's end) are left out. Raises ValueError when the
    trace holds no step."""
    steps = steps_of(events)
    if not steps:
        raise ValueError(f"{role}: the trace holds no {STEP_RANGE} range (no step was captured)")
    kernels, source = kernels_of(events, steps)
    lo, hi = steps[0].start, max(s.end for s in steps)
    kernels = [k for k in kernels if lo <= k.start < hi]
    stats = kernel_stats(kernels)
    launches = launch_stats(events, lo, hi)
    return RoleProfile(
        role=role,
        source=source,
        steps=step_stats(steps, kernels, labels),
        kernels=stats,
        classes=class_shares(stats),
        gaps=gap_stats(gaps_us(kernels)),
        timeline=timeline(steps, kernels),
        launches=launches,
    )
