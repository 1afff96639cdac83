"""Report sections about the load itself: offered and achieved rates, endpoints that did not
keep up, goodput, and whether compared conditions did equal embed work.

Results written before open-loop load lack these keys; the sections then say nothing
(the equal-work line needs only embed seq/s, which every result has)."""

from __future__ import annotations

from coserve.report.aggregate import ConditionStats, RunStats
from coserve.report.blocks import Block, num, with_ci
from coserve.report.tradeoff import equal_work_checks
from coserve.spec_load import LoadSpec


def load_text(load: LoadSpec, role: str) -> str:
    """'rate 61.25 req/s (poisson, cap 256)' or 'closed, C=512'."""
    rate = getattr(load, f"{role}_rate")
    cap = getattr(load, f"{role}_concurrency")
    if rate is None:
        return f"closed, C={cap}"
    shape = (
        load.arrival if load.burstiness == 1 else f"{load.arrival}, burstiness {load.burstiness:g}"
    )
    return f"rate {rate:g} req/s ({shape}, cap {cap})"


def _uses_rates(run: RunStats) -> bool:
    loads = [c.condition.load_for(run.spec) for c in run.conditions]
    measured = any(
        m in c.summary for c in run.conditions for m in ("gen_achieved_rps", "embed_achieved_rps")
    )
    return measured or any(ld.gen_rate or ld.embed_rate for ld in loads)


def _measured(c: ConditionStats) -> bool:
    """Whether its results say if the load kept up (results from before open loop do not)."""
    return any(
        "kept_up" in ((r.get("bench") or {}).get(role) or {})
        for r in c.ok
        for role in ("gen", "embed")
    )


def _kept_up(c: ConditionStats, load) -> str:
    """ "yes", "**no** (N of M reps)", or "closed loop" where every served role ran one and
    none fell silent (a closed loop has no rate to keep up with)."""
    if not _measured(c):
        return "-"
    bad = {w.rep for w in c.load_warnings()}
    if bad:
        return f"**no** ({len(bad)} of {len(c.ok)} reps)"
    open_loop = any(getattr(load, f"{role}_rate") for role in c.condition.servers)
    return "yes" if open_loop else "closed loop"


def load_blocks(run: RunStats) -> list[Block]:
    """The offered/achieved table and each rep that did not keep up (only for open loops)."""
    if not _uses_rates(run):
        return []
    rows = []
    for c in run.conditions:
        load = c.condition.load_for(run.spec)
        cells = [c.name]
        for role in ("gen", "embed"):
            if role not in c.condition.servers:
                cells += ["-", "-", "-"]
                continue
            cells += [
                load_text(load, role),
                with_ci(c.summary.get(f"{role}_offered_rps")),
                with_ci(c.summary.get(f"{role}_achieved_rps")),
            ]
        rows.append([*cells, with_ci(c.summary.get("embed_seq_s")), _kept_up(c, load)])
    out = [
        Block("h3", "Offered and achieved load"),
        Block(
            "table",
            headers=[
                "Condition",
                "Gen load",
                "Gen offered (req/s)",
                "Gen achieved (req/s)",
                "Embed load",
                "Embed offered (req/s)",
                "Embed achieved (req/s)",
                "Embed (seq/s)",
                "Kept up",
            ],
            rows=rows,
            align="llrrlrrrl",
        ),
        Block(
            "p",
            "Achieved: requests sent per second inside the window (Poisson arrivals can "
            "put it above the offered rate). An endpoint at a rate did not keep up when it "
            "sent under 95 % of the arrivals its schedule put inside the window, hit its cap "
            "on requests in flight, or its requests in flight grew over the window (net of "
            "a queue still filling); then the strategy, not the load, set its work. A closed "
            "loop has no rate to keep up with (its concurrency sets the load); it counts as "
            "not keeping up only when its server fell silent.",
        ),
    ]
    unmeasured = [c.name for c in run.conditions if c.ok and not _measured(c)]
    if unmeasured:
        out.append(
            Block(
                "p",
                "No offered or achieved rate in the results of "
                + ", ".join(unmeasured)
                + ": the load generator that wrote them did not report one, so whether "
                "it drove the spec's rates is not known from these files.",
            )
        )
    warnings = [w for c in run.conditions for w in c.load_warnings()]
    if warnings:
        out.append(
            Block(
                "ul", items=[f"**{w.condition}** rep {w.rep}, {w.role}: {w.text}" for w in warnings]
            )
        )
    return out


def _bounds(load: LoadSpec) -> str:
    gen = [
        f"{k} <= {v:g} ms"
        for k, v in (
            ("TTFT", load.goodput_ttft_ms),
            ("TPOT", load.goodput_tpot_ms),
            ("E2E latency", load.goodput_e2el_ms),
        )
        if v is not None
    ]
    parts = []
    if gen:
        parts.append("a gen request counts only if it meets every bound (" + ", ".join(gen) + ")")
    if load.embed_slo_ms is not None:
        parts.append(f"an embed request only if it took <= {load.embed_slo_ms:g} ms")
    return "; ".join(parts)


def goodput_blocks(run: RunStats) -> list[Block]:
    metrics = ("gen_goodput_req_s", "gen_goodput_tok_s", "embed_goodput_seq_s")
    have = [c for c in run.conditions if any(m in c.summary for m in metrics)]
    if not have:
        return []
    rows = [
        [
            c.name,
            *(with_ci(c.summary.get(m)) for m in metrics),
            num(c.mean("gen_tok_s")),
            num(c.mean("embed_seq_s")),
        ]
        for c in have
    ]
    bounds = sorted({_bounds(c.condition.load_for(run.spec)) for c in have} - {""})
    return [
        Block("h3", "Goodput"),
        Block(
            "table",
            headers=[
                "Condition",
                "Gen goodput (req/s)",
                "Gen goodput (tok/s)",
                "Embed goodput (seq/s)",
                "Gen (tok/s)",
                "Embed (seq/s)",
            ],
            rows=rows,
        ),
        Block(
            "p",
            "Goodput (vllm bench's definition): "
            + (" / ".join(bounds) or "no bounds set")
            + ". Beside it, the plain throughput of the same reps.",
        ),
    ]


def equal_work_blocks(run: RunStats) -> list[Block]:
    """One sentence per comparison of the matrix: did the compared conditions do equal embed
    work? (The sweep's comparisons go under its table.)"""
    return [Block("p", e.sentence()) for e in equal_work_checks(run) if e.scope == "matrix"]
