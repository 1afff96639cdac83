"""Gen's kernels against embed's, from the two servers' traces: both profilers stamp events
with the host's clock, so two processes on one machine share a timeline (to within the
profilers' clock alignment, microseconds). Over the time both windows cover: gen's kernel time
during which an embed kernel also ran (the two share the SMs: possible under MPS, not under
time-slicing, which runs one context at a time) and the idle time between gen's kernels that
an embed kernel filled (the study's graph-interleaving hypothesis, which its authors later
reported falsified by an nsys gap analysis)."""

from __future__ import annotations

from coserve.profile.records import Interleave
from coserve.profile.trace import Coverage, Interval, kernels_of, steps_of


def _window(events: list[dict]) -> tuple[float, float] | None:
    steps = steps_of(events)
    if not steps:
        return None
    return steps[0].start, max(s.end for s in steps)


def interleave(gen_events: list[dict], embed_events: list[dict]) -> Interleave | None:
    """The Interleave of two traces; None when either has no step or no CUDA kernel, or the
    two windows do not overlap."""
    gw, ew = _window(gen_events), _window(embed_events)
    if gw is None or ew is None:
        return None
    lo, hi = max(gw[0], ew[0]), min(gw[1], ew[1])
    if hi <= lo:
        return None
    gen, gsrc = kernels_of(gen_events, steps_of(gen_events))
    emb, esrc = kernels_of(embed_events, steps_of(embed_events))
    if gsrc != "cuda kernels" or esrc != "cuda kernels":
        return None
    return interleave_of(gen, emb, lo, hi)


def interleave_of(gen: list[Interval], embed: list[Interval], lo: float, hi: float) -> Interleave:
    """The Interleave of two kernel lists (each sorted by start) over [lo, hi) (microseconds)."""
    gen = [k for k in gen if lo <= k.start < hi]
    embed = [k for k in embed if k.end > lo and k.start < hi]
    out = Interleave(window_ms=(hi - lo) / 1e3, embed_kernels=len(embed))
    covered = Coverage(embed)
    latest = None
    for k in gen:
        end = min(k.end, hi)
        out.gen_kernel_ms += (end - k.start) / 1e3
        out.gen_kernel_overlapped_ms += covered.ms(k.start, end)
        if latest is not None and k.start > latest:
            out.gen_gap_ms += (k.start - latest) / 1e3
            out.gen_gap_filled_ms += covered.ms(latest, k.start)
        latest = end if latest is None else max(latest, end)
    return out
