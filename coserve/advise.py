"""`coserve advise RUN_DIR --gen-tpot-p99-ms X [--embed-seq-s Y]`: which measured way of
sharing the GPU keeps gen within a latency budget with the most embedding work.

Reads the run folder as the report does (coserve.report.aggregate). Candidates are the
conditions that ran gen and embed together and finished at least one rep. One meets the
budget when its mean gen TPOT p99 (the bench's per-request TPOT, p99 over requests, mean
over reps) is at most X ms and, with Y, its mean achieved embed seq/s is at least Y. The
answer is the one meeting it with the most embed seq/s (conditions whose embed seq/s lie
within the report's equal-work tolerance of the most did the same embed work: of those, the
one with the most gen tok/s), with every candidate as evidence; when none does, the one
closest to it (the smallest sum of its relative misses). Conditions that ran gen and embed
together but are no candidate (no finished rep, only failed reps, or a metric missing) are
named with the reason, so none is taken for weighed.

Exit status: 0 a condition meets the budget, 1 none does, 2 bad input (no run folder, a
value out of range, no candidate)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from coserve.stats import Summary
from coserve.term import counted_names


@dataclass(frozen=True)
class Evidence:
    """One candidate condition: means over its finished reps."""

    condition: str
    label: str  # strategy, options and server overrides
    reps: int
    embed_seq_s: Summary
    gen_tok_s: Summary
    tpot_p99_ms: Summary
    gen_vs_base_pct: float | None  # gen tok/s against the spec's baseline, %
    miss: float  # 0 when it meets the budget; else the sum of relative misses

    @property
    def meets(self) -> bool:
        return self.miss == 0.0


@dataclass(frozen=True)
class NotConsidered:
    """A condition that ran gen and embed together but is no candidate, and why."""

    condition: str
    reason: str  # "not run: 0 of 3 reps", "2 failed reps: <why the first failed>"

    def __str__(self) -> str:
        return f"{self.condition} ({self.reason})"

    @property
    def not_run(self) -> bool:
        return self.reason.startswith(NOT_RUN)


NOT_RUN = "not run"
# Conditions not run are named up to this many, then counted: a slice of a large spec (5 of
# 70 conditions) otherwise listed 65 names before the table.
NOT_RUN_NAMED = 5


def not_considered_text(items) -> str:
    """NotConsidered items as one phrase: each failed or unmeasured condition with its reason,
    then the conditions not run, named up to NOT_RUN_NAMED and counted past that."""
    parts = [str(n) for n in items if not n.not_run]
    idle = [n.condition for n in items if n.not_run]
    if idle:
        parts.append(f"{NOT_RUN}: {counted_names(idle, NOT_RUN_NAMED)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Advice:
    budget_tpot_p99_ms: float
    min_embed_seq_s: float | None
    best: Evidence | None  # meets the budget with the most embed work (then gen tok/s)
    closest: Evidence | None  # when none meets it
    rows: list[Evidence]  # every candidate: those meeting the budget first, then most embed work
    baseline_tpot_p99_ms: float | None  # the spec baseline's (gen alone, or a dedicated pair)
    baseline: str | None
    baseline_runs_both: bool = False  # a dedicated deployment, not gen alone
    tie_on_embed: bool = False  # best: picked for gen tok/s among equal embed work
    on_cpu: bool = False  # every server ran on a CPU: the figures say nothing about GPUs
    embed_alone: tuple[str, float] | None = None  # (condition, seq/s) of embed on its own
    unreadable: str | None = None  # the run folder's files left out, named (None: none)
    not_considered: tuple[NotConsidered, ...] = ()  # in the spec's order


def _misses(
    tpot: float, embed: float, budget: float, min_embed: float | None
) -> tuple[float, float]:
    """(TPOT's relative excess over the budget, embed's relative shortfall from its floor),
    each 0 where met."""
    return max(0.0, tpot / budget - 1), max(0.0, 1 - embed / min_embed) if min_embed else 0.0


def _miss(tpot: float, embed: float, budget: float, min_embed: float | None) -> float:
    return sum(_misses(tpot, embed, budget, min_embed))


_NEEDED = ("embed_seq_s", "gen_tok_s", "tpot_p99")


def _shared(c) -> bool:
    return set(c.condition.servers) == {"gen", "embed"}


def colocated(run) -> list:
    """The conditions of `run` (a RunStats) that ran gen and embed together, finished at least
    one rep and measured gen tok/s, embed seq/s and gen TPOT p99: the ConditionStats
    (coserve.report.aggregate), in the spec's order."""
    return [c for c in run.conditions if _shared(c) and c.ok and set(_NEEDED) <= c.summary.keys()]


def not_considered(run) -> list[NotConsidered]:
    """The conditions of `run` that ran gen and embed together but are not in colocated(run),
    each with its reason, in the spec's order."""
    from coserve.experiment.failure import why

    out = []
    for c in run.conditions:
        if not _shared(c):
            continue
        if not c.ok and c.failed:
            n = len(c.failed)
            told = why(c.failed[0].get("error"), 200)
            reason = f"{n} failed rep{'s' if n > 1 else ''}" + (f": {told}" if told else "")
        elif not c.ok:
            reason = f"{NOT_RUN}: 0 of {c.planned} reps"
        elif missing := [m for m in _NEEDED if m not in c.summary]:
            reason = f"its finished reps did not measure {', '.join(missing)}"
        else:
            continue
        out.append(NotConsidered(c.name, reason))
    return out


def condition_label(c) -> str:
    """A ConditionStats' strategy, options and server overrides, and its sweep point."""
    from coserve.report.tradeoff import strategy_label

    label = strategy_label(c)
    if c.condition.sweep is not None:
        label += f", {c.condition.sweep.label()}"
    return label


def advise(run, budget_tpot_p99_ms: float, min_embed_seq_s: float | None = None) -> Advice:
    """`run`: a RunStats (coserve.report.aggregate). Raises ValueError when the budget is not
    a positive number or the run has no condition that ran gen and embed together."""
    from coserve.report import sections

    if not (math.isfinite(budget_tpot_p99_ms) and budget_tpot_p99_ms > 0):
        raise ValueError(
            f"--gen-tpot-p99-ms: must be a positive number of ms, got {budget_tpot_p99_ms}"
        )
    if min_embed_seq_s is not None and not (math.isfinite(min_embed_seq_s) and min_embed_seq_s > 0):
        raise ValueError(f"--embed-seq-s: must be a positive number, got {min_embed_seq_s}")
    base = next((c for c in run.conditions if c.name == run.spec.baseline), None)
    base_tok = base.mean("gen_tok_s") if base is not None else None
    rows = []
    for c in colocated(run):
        s = c.summary
        rows.append(
            Evidence(
                condition=c.name,
                label=condition_label(c),
                reps=len(c.ok),
                embed_seq_s=s["embed_seq_s"],
                gen_tok_s=s["gen_tok_s"],
                tpot_p99_ms=s["tpot_p99"],
                gen_vs_base_pct=100 * (s["gen_tok_s"].mean / base_tok - 1) if base_tok else None,
                miss=_miss(
                    s["tpot_p99"].mean, s["embed_seq_s"].mean, budget_tpot_p99_ms, min_embed_seq_s
                ),
            )
        )
    skipped = not_considered(run)
    if not rows:
        raise ValueError(
            f"{run.run_dir.path}: no condition ran gen and embed together and finished a rep"
            + (f"; not considered: {not_considered_text(skipped)}" if skipped else "")
            + (f" ({run.unreadable_text()})" if run.unreadable else "")
        )
    rows.sort(key=lambda e: (not e.meets, -e.embed_seq_s.mean))
    meeting = [e for e in rows if e.meets]
    best, tie = _best(meeting)
    return Advice(
        budget_tpot_p99_ms=budget_tpot_p99_ms,
        min_embed_seq_s=min_embed_seq_s,
        best=best,
        closest=None if meeting else min(rows, key=lambda e: (e.miss, -e.embed_seq_s.mean)),
        rows=rows,
        baseline_tpot_p99_ms=base.mean("tpot_p99") if base is not None else None,
        baseline=base.name if base is not None and base.ok else None,
        baseline_runs_both=base is not None and _shared(base),
        tie_on_embed=tie,
        on_cpu=sections.on_cpu(run),
        embed_alone=_embed_alone(run),
        unreadable=run.unreadable_text(),
        not_considered=tuple(skipped),
    )


def _best(meeting: list[Evidence]) -> tuple[Evidence | None, bool]:
    """The condition with the most embed work, and whether it was picked for its gen tok/s
    among others that did the same embed work (within EQUAL_WORK_TOLERANCE: at an equal
    offered rate, embed seq/s differ only by noise)."""
    from coserve.report.tradeoff import EQUAL_WORK_TOLERANCE

    if not meeting:
        return None, False
    most = max(e.embed_seq_s.mean for e in meeting)
    same = [e for e in meeting if e.embed_seq_s.mean * (1 + EQUAL_WORK_TOLERANCE) >= most]
    return max(same, key=lambda e: e.gen_tok_s.mean), len(same) > 1


def apart_text(v: float, limit: float, digits: int = 1) -> str:
    """`v` with the decimals, `digits` to `digits` + 3, that tell it apart from `limit`: 20.05,
    not 20.0, against a limit of 20."""
    for d in range(digits, digits + 4):
        text = f"{v:,.{d}f}"
        value = float(text.replace(",", ""))
        if (value > limit) == (v > limit) and value != limit:
            return text
    return text


def _budget_text(a: Advice, e: Evidence) -> str:
    """A row's verdict and why: `meets`, `CI crosses: TPOT to 20.3 ms`, `misses: TPOT 20.05 >
    20 ms; embed 919 < 1,000 seq/s`."""
    budget, floor = a.budget_tpot_p99_ms, a.min_embed_seq_s
    tpot, embed = e.tpot_p99_ms, e.embed_seq_s
    if not e.meets:
        why = []
        if tpot.mean > budget:
            why.append(f"TPOT {apart_text(tpot.mean, budget)} > {budget:g} ms")
        if floor is not None and embed.mean < floor:
            why.append(f"embed {apart_text(embed.mean, floor, 0)} < {floor:,g} seq/s")
        return "misses: " + "; ".join(why)
    if not _crosses(a, e):
        return "meets"
    why = []
    if tpot.ci_high is not None and tpot.ci_high > budget:
        why.append(f"TPOT to {apart_text(tpot.ci_high, budget)} ms")
    if floor is not None and embed.ci_low is not None and embed.ci_low < floor:
        why.append(f"embed to {apart_text(embed.ci_low, floor, 0)} seq/s")
    return "CI crosses: " + "; ".join(why)


def _ci(s: Summary, digits: int) -> str:
    """`mean ± half the CI`; a half-width too small for `digits` (31.0 ± 0.0) with the digits
    of the report's tables (± 0.03); the mean alone without a CI (one rep)."""
    from coserve.report.blocks import num

    text = f"{s.mean:,.{digits}f}"
    half = s.half_width
    if half is not None:
        narrow = 0 < half < 0.5 * 10**-digits  # rounds to 0 at `digits`
        text += f" ± {num(half) if narrow else f'{half:,.{digits}f}'}"
    return text


def _over_text(over: float) -> str:
    """A relative excess (0.25: 25 % over) in words; past 100x as a ratio."""
    if not math.isfinite(over):
        return "far over the budget (too small a budget to compare with)"
    if over < 100:
        return f"{100 * over:.1f} % over the budget"
    return f"{over + 1:.3g} times the budget"


def _embed_alone(run) -> tuple[str, float] | None:
    c = run.alone("embed")
    return None if c is None else (c.name, c.summary["embed_seq_s"].mean)


def _crosses(a: Advice, e: Evidence) -> bool:
    """Met at the means, but the 95 % CI of TPOT p99 reaches past the budget (or that of embed
    seq/s below its floor): more reps could show it missing."""
    hi, lo = e.tpot_p99_ms.ci_high, e.embed_seq_s.ci_low
    return e.meets and (
        (hi is not None and hi > a.budget_tpot_p99_ms)
        or (a.min_embed_seq_s is not None and lo is not None and lo < a.min_embed_seq_s)
    )


def render(a: Advice) -> str:
    """The answer in words, then the evidence table."""
    from coserve.report.tradeoff import EQUAL_WORK_TOLERANCE

    want = f"gen TPOT p99 <= {a.budget_tpot_p99_ms:g} ms"
    if a.min_embed_seq_s:
        want += f" and embed >= {a.min_embed_seq_s:g} seq/s"
    lines = []
    if a.best is not None:
        e = a.best
        how = (
            "the most embed work (others did the same within "
            f"{EQUAL_WORK_TOLERANCE * 100:g} %: of those, the most gen tok/s)"
            if a.tie_on_embed
            else "the most embed work"
        )
        lines.append(
            f"Meets {want} with {how}: {e.condition} — {e.label}: "
            f"{e.embed_seq_s.mean:,.0f} seq/s, gen TPOT p99 {e.tpot_p99_ms.mean:.1f} ms, "
            f"gen {e.gen_tok_s.mean:,.0f} tok/s"
            + (" (met at the means; its 95 % CI crosses the limit)." if _crosses(a, e) else ".")
        )
    else:
        e = a.closest
        over, under = _misses(
            e.tpot_p99_ms.mean, e.embed_seq_s.mean, a.budget_tpot_p99_ms, a.min_embed_seq_s
        )
        misses = []
        if over:
            misses.append(f"TPOT p99 {_over_text(over)}")
        if under:
            misses.append(f"embed {100 * under:.1f} % below {a.min_embed_seq_s:g} seq/s")
        lines.append(
            f"No measured condition meets {want}. Closest (the smallest sum of relative "
            f"misses): {e.condition} — {e.label}: {e.embed_seq_s.mean:,.0f} seq/s at gen "
            f"TPOT p99 {e.tpot_p99_ms.mean:.1f} ms ({'; '.join(misses)})."
        )
    if a.baseline_tpot_p99_ms is not None:
        lines.append(
            f"{'Baseline' if a.baseline_runs_both else 'Gen alone'} ({a.baseline}): "
            f"TPOT p99 {a.baseline_tpot_p99_ms:.1f} ms"
            + (
                " — above the budget already."
                if a.baseline_tpot_p99_ms > a.budget_tpot_p99_ms
                else "."
            )
        )
    if a.best is None and a.min_embed_seq_s and a.embed_alone:
        name, seq_s = a.embed_alone
        if seq_s < a.min_embed_seq_s:
            lines.append(
                f"Embed alone ({name}) served {seq_s:,.0f} seq/s under this run's embed load: "
                f"{a.min_embed_seq_s:g} seq/s is beyond anything it measured (a higher "
                "embed_concurrency or embed_rate in the spec's [load] measures more)."
            )
    if a.on_cpu:
        lines.append(
            "These ran on a CPU: both servers and the load generator shared its cores, so the "
            "figures measure how the OS schedules them and say nothing about sharing a GPU."
        )
    if a.not_considered:
        lines.append(f"Not considered: {not_considered_text(a.not_considered)}.")
    if a.unreadable:
        lines.append(f"Warning: {a.unreadable}.")
    lines.append("")
    head = (
        "condition",
        "strategy and settings",
        "reps",
        "embed seq/s",
        "gen tok/s",
        "gen vs baseline" if a.baseline_runs_both else "gen vs alone",
        "TPOT p99 ms",
        "budget",
    )
    table = [head]
    for e in a.rows:
        table.append(
            (
                e.condition,
                e.label,
                str(e.reps),
                _ci(e.embed_seq_s, 0),
                _ci(e.gen_tok_s, 0),
                "" if e.gen_vs_base_pct is None else f"{e.gen_vs_base_pct:+.1f} %",
                _ci(e.tpot_p99_ms, 1),
                _budget_text(a, e),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    lines.append("")
    lines.append(
        "Means over finished reps (± half the 95 % CI where a condition has 2+ reps); those "
        "meeting the budget first. A condition meets it at its means; 'CI crosses' where it "
        "does but its CI reaches past the limit."
    )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Exit status: 0 when a condition meets the budget, 1 when none does (the closest is "
        "named), 2 for a bad option or run folder."
    )
    from coserve.text_flags import nonempty

    parser.add_argument("run_dir", metavar="RUN_DIR", type=nonempty, help="a `coserve run` folder")
    parser.add_argument(
        "--gen-tpot-p99-ms",
        metavar="X",
        type=float,
        required=True,
        help="gen's budget: TPOT p99 in ms (mean over reps)",
    )
    parser.add_argument(
        "--embed-seq-s",
        metavar="Y",
        type=float,
        default=None,
        help="also needed: at least this many embed sequences/s",
    )


def run(args) -> int:
    from coserve.report.aggregate import aggregate

    try:
        stats = aggregate(Path(args.run_dir))
        answer = advise(stats, args.gen_tpot_p99_ms, args.embed_seq_s)
    except (FileNotFoundError, ValueError) as e:
        print(f"coserve advise: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(answer))
    return 0 if answer.best is not None else 1
