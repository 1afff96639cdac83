"""The trade-off between gen and embedding work, and whether compared conditions did equal
embedding work.

`curves(run)`: per sharing strategy, the conditions that run gen and embed together (matrix
and sweep points) as points (achieved embed seq/s; gen tok/s; gen TPOT p99), each a mean
over reps with its CI, sorted by embed work. `equal_work_checks(run)`: for each set of
conditions a report compares, whether their achieved embed seq/s lie within
`EQUAL_WORK_TOLERANCE` of each other; a gen delta only compares strategies when they did.
`embed_capacity(run)` and `Tradeoff.shares`: the yardstick of taking turns on the GPU (gen
alone, then embed alone at capacity) and each co-located condition's work against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coserve.reference import REFERENCES, Reference
from coserve.report.aggregate import ConditionStats, RunStats
from coserve.report.blocks import num
from coserve.stats import Summary

EQUAL_WORK_TOLERANCE = 0.05  # largest/smallest achieved embed seq/s - 1


def equal_work(seq_s: list[float]) -> bool:
    """Whether achieved embed seq/s figures count as equal work: the largest within
    EQUAL_WORK_TOLERANCE of the smallest."""
    return max(seq_s) <= min(seq_s) * (1 + EQUAL_WORK_TOLERANCE)


@dataclass
class CurvePoint:
    condition: str
    embed_seq_s: Summary  # achieved embed sequences/s
    gen_tok_s: Summary
    tpot_p99_ms: Summary | None


@dataclass
class Curve:
    """One strategy's points, against one gen baseline."""

    label: str  # strategy plus its options, e.g. "mps (active_thread_percentage=50)"
    baseline: str | None  # the gen-alone condition its deltas are against
    points: list[CurvePoint]


@dataclass
class Baseline:
    """A gen-alone condition: the curves' point at zero embed work."""

    condition: str
    gen_tok_s: Summary
    tpot_p99_ms: Summary | None


@dataclass
class EmbedCapacity:
    """Embed alone at what its GPU can serve: a closed loop, or an open loop it fell behind
    in every rep (an open loop it kept up with measured the load, not the GPU)."""

    condition: str
    seq_s: Summary


@dataclass
class Share:
    """A co-located condition against taking turns on the GPU: its gen tok/s as a fraction of
    gen alone's and its embed seq/s as a fraction of embed alone's capacity. Taking turns
    (the GPU given to one server, then the other) adds up to 1; above 1, sharing did more."""

    condition: str
    gen_alone: str
    gen_alone_tok_s: float
    gen: float
    embed: float

    @property
    def total(self) -> float:
        return self.gen + self.embed


@dataclass
class Tradeoff:
    curves: list[Curve]
    baselines: list[Baseline]
    reference: Reference | None  # published figures to mark, never mixed into the curves
    embed_capacity: EmbedCapacity | None = None
    # co-located conditions but exclusive ones (a GPU each), run order
    shares: list[Share] = field(default_factory=list)

    def turns_sentence(self) -> str | None:
        """What taking turns trades and each co-located condition's share sum (markdown);
        None without embed alone's capacity or a share."""
        cap = self.embed_capacity
        if cap is None or not self.shares:
            return None
        # from the shares, not the curves' baselines: a gen sweep's point is against gen
        # alone's point at its load, which no curve names
        alone = dict.fromkeys((s.gen_alone, s.gen_alone_tok_s) for s in self.shares)
        rates = "; ".join(
            f"{name} ({num(tok_s)} tok/s) and {cap.condition} ({num(cap.seq_s.mean)} seq/s) "
            f"trade {tok_s / cap.seq_s.mean:.3g} gen tokens per embed"
            for name, tok_s in alone
        )
        sums = ", ".join(f"{s.condition} {s.total:.2f}" for s in self.shares)
        return (
            f"Against taking turns (the GPU given to gen alone, then to embed alone at its "
            f"capacity): {rates}. Each co-located condition's gen tok/s over gen alone's plus "
            f"its embed seq/s over that capacity: {sums} (1: as much work as taking turns; "
            "above 1: sharing did more)."
        )


def strategy_label(c: ConditionStats) -> str:
    """The strategy, its options and the condition's server overrides (embed granularity,
    the SLO guard): conditions that differ in any of them are separate curves."""
    cond = c.condition
    opts = [f"{k}={_value(v)}" for k, v in sorted(cond.options.items())]
    overrides = {
        f"{role}.{k}": v
        for role in ("gen", "embed")
        for k, v in sorted(getattr(cond, role, {}).items())
    }
    opts += [f"{k}={_value(v)}" for k, v in overrides.items() if k.split(".")[1] not in _BY_NAME]
    flags = {k: v for k, v in overrides.items() if k.split(".")[1] == "extra_args"}
    short = all(len(" ".join(map(str, v))) <= _SHORT_FLAGS for v in flags.values())
    if flags and short and len(flags) == sum(k.split(".")[1] in _BY_NAME for k in overrides):
        # a few flags say what differs better than the condition's name
        opts += [f"{k.split('.')[0]} {' '.join(map(str, v))}" for k, v in flags.items()]
    elif any(
        k.split(".")[1] in _BY_NAME for k in overrides
    ):  # a command line: the condition's name says it
        opts.append(cond.sweep.base if cond.sweep is not None else cond.name)
    return f"{cond.strategy} ({', '.join(opts)})" if opts else cond.strategy


_BY_NAME = ("launcher", "extra_args", "url", "docker_image")
_SHORT_FLAGS = 48  # characters of extra_args shown as themselves in a label


def _value(v) -> str:
    """An option or server override as the spec writes it (TOML): 5 for 5.0, true for True,
    { embed = 50 } for {'embed': 50}, "x" for 'x' inside a table or array."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_inner(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_inner(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _inner(v) -> str:
    return f'"{v}"' if isinstance(v, str) else _value(v)


def _co_located(c: ConditionStats) -> bool:
    return set(c.condition.servers) == {"gen", "embed"}


def tradeoff(run: RunStats) -> Tradeoff:
    groups: dict[tuple[str, str], list[CurvePoint]] = {}
    for c in run.conditions:
        if not _co_located(c) or "embed_seq_s" not in c.summary or "gen_tok_s" not in c.summary:
            continue
        key = (strategy_label(c), c.condition.baseline_name(run.spec))
        groups.setdefault(key, []).append(
            CurvePoint(
                c.name, c.summary["embed_seq_s"], c.summary["gen_tok_s"], c.summary.get("tpot_p99")
            )
        )
    several = len({base for _, base in groups}) > 1
    curves = [
        Curve(
            f"{label} vs {base}" if several else label,
            base,
            sorted(pts, key=lambda p: p.embed_seq_s.mean),
        )
        for (label, base), pts in groups.items()
    ]
    baselines = []
    for base in dict.fromkeys(c.baseline for c in curves):
        b = next((c for c in run.conditions if c.name == base), None)
        if b is not None and "embed" not in b.condition.servers and "gen_tok_s" in b.summary:
            baselines.append(Baseline(b.name, b.summary["gen_tok_s"], b.summary.get("tpot_p99")))
    cap = embed_capacity(run)
    return Tradeoff(
        curves,
        baselines,
        REFERENCES.get(run.spec.report.reference),
        cap,
        _shares(run, cap) if cap is not None else [],
    )


def embed_capacity(run: RunStats) -> EmbedCapacity | None:
    """The embed-alone condition (matrix) that measured the most embed seq/s the GPU can
    serve: a closed loop, or an open loop that fell behind its offered rate in every rep.
    One that served no sequences, or ran on a MIG slice, measured none."""
    found = []
    for c in run.matrix:
        if list(c.condition.servers) != ["embed"] or not (c.mean("embed_seq_s") or 0) > 0:
            continue
        if not _whole_gpu(c):
            continue
        closed = c.condition.load_for(run.spec).embed_rate is None
        behind = {w.rep for w in c.load_warnings() if w.role == "embed"} == {r["rep"] for r in c.ok}
        if closed or behind:
            found.append(EmbedCapacity(c.name, c.summary["embed_seq_s"]))
    return max(found, key=lambda e: e.seq_s.mean, default=None)


def _whole_gpu(c: ConditionStats) -> bool:
    """Whether a server alone had its GPUs whole: on a MIG instance it measured the slice."""
    return c.condition.strategy != "mig"


def _shares(run: RunStats, cap: EmbedCapacity) -> list[Share]:
    out = []
    for c in run.conditions:
        base = run.get(c.gen_baseline) if c.gen_baseline else None
        if not _co_located(c) or base is None or list(base.condition.servers) != ["gen"]:
            continue
        if c.condition.strategy == "exclusive" or not _whole_gpu(base):
            continue  # exclusive: a GPU each, nothing shared, no turns taken
        gen, emb, alone = c.mean("gen_tok_s"), c.mean("embed_seq_s"), base.mean("gen_tok_s")
        if gen is None or emb is None or not alone or not cap.seq_s.mean:
            continue
        out.append(Share(c.name, base.name, alone, gen / alone, emb / cap.seq_s.mean))
    return out


@dataclass
class EqualWork:
    """Whether `conditions` did equal embed work: achieved embed seq/s within the tolerance."""

    what: str  # which comparison, e.g. "the conditions that serve both models"
    scope: str  # "matrix" | "sweep"
    conditions: list[str]
    seq_s: list[float]  # mean achieved embed sequences/s, one per condition
    # Conditions whose embed load fell behind its offered rate in some rep: with an embed
    # rate set, unequal work means a server could not serve it, not a load left to differ.
    behind: list[str] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """Largest / smallest - 1 (inf when one did no embed work)."""
        lo, hi = min(self.seq_s), max(self.seq_s)
        return hi / lo - 1 if lo > 0 else float("inf")

    @property
    def equal(self) -> bool:
        return equal_work(self.seq_s)

    def sentence(self) -> str:
        each = ", ".join(f"{n} {num(v)}" for n, v in zip(self.conditions, self.seq_s, strict=True))
        tol = f"{EQUAL_WORK_TOLERANCE * 100:g} %"
        if self.equal:
            return (
                f"**Equal embed work** for {self.what}: {each} embed seq/s, within {tol} of "
                f"each other (spread {self.spread * 100:.1f} %); their gen figures compare the "
                f"same work."
            )
        pairs = list(zip(self.conditions, self.seq_s, strict=True))
        kept = [(n, v) for n, v in pairs if n not in self.behind]
        kept_work = EqualWork(self.what, self.scope, [n for n, _ in kept], [v for _, v in kept])
        if self.behind and len(kept) >= 2 and kept_work.equal:
            # the servers that kept up did the same work: only the ones behind compare less
            late = ", ".join(f"{n} {num(v)}" for n, v in pairs if n in self.behind)
            return (
                f"**Equal embed work** for {self.what} but {', '.join(self.behind)}: "
                f"{', '.join(f'{n} {num(v)}' for n, v in kept)} embed seq/s, within {tol} of "
                f"each other; {late} did not keep up with the offered embed rate (its embed "
                f"server could not serve it beside gen), so its gen figure compares less "
                f"embedding work."
            )
        if self.spread == float("inf"):
            gap = "some did none"
        elif self.spread < 1:
            gap = f"the most is {self.spread * 100:.0f} % above the least"
        else:
            gap = f"the most is {self.spread + 1:.1f}x the least"
        return (
            f"**Unequal embed work** for {self.what}: {each} embed seq/s ({gap}; equal "
            f"means within {tol}). Their gen "
            f"figures compare different amounts of embedding work, not the strategies "
            f"alone; "
            + (
                f"{', '.join(self.behind)} did not keep up with the offered embed "
                f"rate (its embed server could not serve it beside gen)."
                if self.behind
                else "an embed rate (`embed_rate` in [load]) gives each the same work."
            )
        )

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "scope": self.scope,
            "conditions": self.conditions,
            "embed_seq_s": self.seq_s,
            "spread_pct": self.spread * 100,
            "equal": self.equal,
            "tolerance_pct": EQUAL_WORK_TOLERANCE * 100,
            "behind": self.behind,
        }


def _check(what: str, scope: str, conds: list[ConditionStats]) -> EqualWork | None:
    have = [c for c in conds if "embed_seq_s" in c.summary]
    if len(have) < 2:
        return None
    behind = [c.name for c in have if any(w.role == "embed" for w in c.load_warnings())]
    return EqualWork(
        what, scope, [c.name for c in have], [c.summary["embed_seq_s"].mean for c in have], behind
    )


def equal_work_checks(run: RunStats) -> list[EqualWork]:
    """The matrix's co-located conditions (per gen baseline), then each sweep value run under
    more than one condition. Only comparisons with two or more measured conditions."""
    out = []
    by_base: dict[str, list[ConditionStats]] = {}
    for c in run.matrix:
        if _co_located(c):
            by_base.setdefault(c.condition.baseline_name(run.spec), []).append(c)
    for base, conds in by_base.items():
        against = f" against {base}" if len(by_base) > 1 else ""
        what = "the conditions that serve both models" + against
        out.append(_check(what, "matrix", conds))
    by_value: dict[float, list[ConditionStats]] = {}
    for c in run.sweep:
        if _co_located(c):
            by_value.setdefault(c.condition.sweep.value, []).append(c)
    for _, conds in sorted(by_value.items()):
        out.append(
            _check(f"the sweep points at {conds[0].condition.sweep.label()}", "sweep", conds)
        )
    return [e for e in out if e is not None]
