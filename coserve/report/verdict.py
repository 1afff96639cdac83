"""The report's opening line: what co-location cost each server against its baseline, the
study's criterion where the baseline is a dedicated deployment, and on a CPU run why the
figures say nothing about GPUs."""

from __future__ import annotations

from coserve.report.aggregate import ConditionStats, RunStats, embed_baseline
from coserve.report.blocks import pct
from coserve.report.sections import on_cpu
from coserve.report.tradeoff import EQUAL_WORK_TOLERANCE, equal_work
from coserve.spec_load import SweepSpec


def _no_baseline(run: RunStats) -> str | None:
    """The verdict line when conditions ran both servers but their baselines finished no rep
    (None when none ran both, or nothing is missing)."""
    ran = [c for c in run.matrix if {"gen", "embed"} <= set(c.condition.servers) and c.ok]
    names = {c.name: c for c in run.conditions}
    wanted = {c.condition.baseline_name(run.spec) for c in ran}
    if any("embed" in c.condition.servers for c in ran):
        wanted.add(embed_baseline(run.spec))
    missing = sorted(b for b in wanted if b in names and not names[b].ok)
    if not ran or not missing:
        return None
    return (
        "**Verdict:** none: the conditions that ran both servers have no baseline to compare "
        f"with ({', '.join(missing)} finished no rep)."
    )


def verdict(run: RunStats) -> str | None:
    """One line (markdown): what co-location cost each server against running alone; on a CPU
    run, why the figures say nothing about GPUs (and about co-located gen coming out faster).
    None when no condition runs both servers."""
    both = [
        c
        for c in run.matrix
        if {"gen", "embed"} <= set(c.condition.servers) and (c.gen_delta or c.embed_delta)
    ]
    if not both:
        return _no_baseline(run)
    gen_bases = sorted({c.gen_baseline for c in both if c.gen_delta})
    embed_bases = sorted({c.embed_baseline for c in both if c.embed_delta})
    # a dedicated deployment (the gen baseline) runs both servers too: its embed delta is
    # shown, but it is no co-location
    parts = "; ".join(
        f"{c.name}{' (the gen baseline, not co-located)' if c.name in gen_bases else ''}: "
        + ", ".join(
            f"{role} {pct(d)}"
            for role, d in (("gen", c.gen_delta), ("embed", c.embed_delta))
            if d is not None
        )
        for c in both
    )
    if all(len(run.get(b).condition.servers) == 1 for b in gen_bases + embed_bases):
        text = f"**Verdict:** throughput against each server alone: {parts}."
    else:  # a baseline that runs both servers (dedicated GPUs): name what each delta is against
        against = [
            f"{role} against {', '.join(bases)}"
            for role, bases in (("gen", gen_bases), ("embed", embed_bases))
            if bases
        ]
        text = f"**Verdict:** throughput, {'; '.join(against)}: {parts}."
        text += _criterion(run, both, _matrix_lead(run, both))
        text += _sweep_criteria(run)
    if on_cpu(run):
        text += (
            " This ran on a CPU: both servers' threads and the load generator share the same "
            "cores, so these deltas measure how the OS schedules them, not how GPUs are shared."
        )
        for role, attr in (("Gen", "gen_delta"), ("Embed", "embed_delta")):
            faster = [c.name for c in both if getattr(c, attr) and getattr(c, attr).pct > 0]
            if faster:
                text += (
                    f" {role} came out faster sharing the cores ({', '.join(faster)}) than "
                    "alone: a CPU scheduling effect (co-location gives it no extra compute) "
                    "that says nothing about GPUs."
                )
    return text


def _sweep_criteria(run: RunStats) -> str:
    """The criterion again at each swept value, each point against the baseline's own point
    at that value (for a rate sweep: the same offered load)."""
    sw = run.spec.sweep
    if sw is None:
        return ""
    by_value: dict[float, list] = {}
    for c in run.sweep:
        if {"gen", "embed"} <= set(c.condition.servers) and c.gen_delta is not None:
            by_value.setdefault(c.condition.sweep.value, []).append(c)
    return "".join(
        _criterion(run, cs, _sweep_lead(run, sw, v, cs), with_delta=True)
        for v, cs in sorted(by_value.items())
    )


def _load_words(run: RunStats, sw: SweepSpec, value: float, conds: list[ConditionStats]) -> str:
    """The swept load at `value` in the spec's unit and, for an embed rate, in the seq/s the
    header and the tables speak of (rate x inputs per request): 'embed rate 141 req/s
    (1,128 seq/s offered)'."""
    at = f"{sw.role} {sw.knob} {value:g}"
    if sw.knob == "rate":
        at += " req/s"
        batches = {c.condition.load_for(run.spec).embed_batch for c in conds}
        if sw.role == "embed" and len(batches) == 1:
            at += f" ({value * batches.pop():,.0f} seq/s offered)"
    return at


def _sweep_lead(run: RunStats, sw: SweepSpec, value: float, conds: list[ConditionStats]) -> str:
    """Opens the criterion at one swept value."""
    words = _load_words(run, sw, value, conds)
    return f" At {words}, the same criterion against the baseline's point there: "


def _matrix_lead(run: RunStats, both: list[ConditionStats]) -> str:
    """Opens the criterion for the conditions outside the sweep: beside the sweep's
    sentences it names the load it was judged at, where they all ran the same one."""
    sw = run.spec.sweep
    if sw is None:
        return CRITERION
    values = {getattr(c.condition.load_for(run.spec), f"{sw.role}_{sw.knob}") for c in both}
    if len(values) != 1 or None in values:
        return CRITERION
    words = _load_words(run, sw, values.pop(), both)
    return f" At {words}, co-located gen" + CRITERION.removeprefix(" Co-located gen")


CRITERION = (
    " Co-located gen at least the dedicated GPUs' (the study's criterion), with 95 % confidence: "
)


def _criterion(run: RunStats, both: list, lead: str = CRITERION, with_delta: bool = False) -> str:
    """The study's section-4 criterion answered per condition whose gen baseline runs both
    servers (dedicated GPUs): co-located gen tok/s at least the baseline's, judged by the 95 %
    CI of the delta: yes (all of it >= 0), no (all of it < 0), or open (it crosses 0 or there
    is none). `lead` opens the sentence (the sweep's names the load judged at); `with_delta`
    gives each answer its gen delta (a sweep point's is in no other sentence). "" where no
    condition has such a baseline."""
    judged = [
        c
        for c in both
        if c.gen_delta is not None and len(run.get(c.gen_baseline).condition.servers) > 1
    ]
    if not judged:
        return ""

    def answer(d) -> str:
        if d.ci_low is None:
            return "open (one rep: no CI)"
        if d.ci_low >= 0:
            return "yes"
        return "no" if d.ci_high < 0 else "open (the CI crosses 0)"

    def work(c) -> str:
        """Where the condition's embed work was not the baseline's, how much it was: the
        study's criterion holds gen against a dedicated embed GPU serving the same load."""
        base = run.get(c.gen_baseline).summary.get("embed_seq_s")
        mine = c.summary.get("embed_seq_s")
        if base is None or mine is None or not base.mean or equal_work([mine.mean, base.mean]):
            return ""
        share = mine.mean / base.mean * 100
        # the rule holds the larger within 5 % of the smaller: near that line the share reads
        # 95 % for what the rule calls unequal, so the gap is given in the rule's own terms
        gap = (max(mine.mean, base.mean) / min(mine.mean, base.mean) - 1) * 100
        if gap < 2 * EQUAL_WORK_TOLERANCE * 100:
            return (
                f", at {share:.1f} % of {c.gen_baseline}'s embed seq/s (not equal work: the "
                f"larger is {gap:.1f} % above the smaller, over the "
                f"{EQUAL_WORK_TOLERANCE * 100:g} % line)"
            )
        return f", at {share:.0f} % of {c.gen_baseline}'s embed seq/s (not equal work)"

    def delta(c) -> str:
        return f" (gen {pct(c.gen_delta)})" if with_delta else ""

    return (
        lead
        + "; ".join(f"{c.name}: {answer(c.gen_delta)}{delta(c)}{work(c)}" for c in judged)
        + "."
    )
