"""`coserve plan --fleet RUN_DIR --gen-tok-s X --embed-seq-s Y`: how many GPUs a demand needs
on dedicated GPUs and on each measured way of co-locating gen and embed.

The model. A run folder measured, per condition, what its GPUs delivered: gen output tok/s and
embed seq/s (means over finished reps, with 95 % CIs) and latency percentiles (p99 over
requests, mean over reps). Per GPU is that divided by the condition's GPU count.

A condition is deployed as a unit of its GPUs (a TP=2 condition comes in pairs), so a fleet
is a whole number of units: ceil(demand / the unit's rate) units x the unit's GPUs.

- Dedicated: gen GPUs = ceil(X / gen-alone tok/s per unit) x its GPUs per unit, embed GPUs
  likewise from embed alone; the fleet is their sum. A role alone is, of the conditions that
  ran it on GPUs of its own (`RunStats.on_own_gpus`: the role alone, or `exclusive` with each
  model on GPUs of its own, per GPU of that role), the one that needs the fewest GPUs for the
  demand in whole units (on a tie, the most per GPU): a dedicated deployment would be set up
  its best measured way, as each co-located fleet is. In a two-GPU study that is the
  dedicated TP=1 GPU, not the role alone at TP=2 (1.28x on two GPUs: 0.64x per GPU); a
  condition of two GPUs with the better per-GPU rate still loses to one GPU where the demand
  fits on one.
- Co-located condition c on n GPUs: each unit delivers g_c tok/s and e_c seq/s together, so
  the fleet is max(ceil(X / g_c), ceil(Y / e_c)) x n.

The saving is dedicated minus co-located GPUs. Sensitivity: the same counts with every
throughput at its CI's low end (the most GPUs) and at its high end (the fewest); the saving's
range pairs one fleet's worst end with the other's best. A latency SLO is judged on the mean
over reps of the p99; "CI crosses" marks one met at the mean whose CI reaches past the limit.

It extrapolates from one machine's measurement: every added GPU is assumed to do what the
measured ones did, on the same GPU model and workload (lengths, concurrency, arrivals), with
no load-balancing loss and no network or cross-node effect. A role whose load was open loop (a
fixed rate) measured what was offered, not the most it could do: its per-GPU figure is a floor
and the GPU counts built on it are upper bounds.

The command line and the table are in coserve.fleet_command.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from coserve.advise import colocated, condition_label
from coserve.experiment.rep import role_devices
from coserve.report.aggregate import THROUGHPUT
from coserve.report.sections import on_cpu
from coserve.stats import Summary

CAVEAT = (
    "Extrapolated from one machine's measurement ({gpu}): each added GPU is assumed to do what "
    "the measured ones did, on the same GPU model and workload, with no load-balancing, "
    "network or cross-node loss."
)

# a CPU run (the demo's) sizes a "GPU" fleet all the same: say so before the figures mislead
CPU_CAVEAT = (
    "These ran on a CPU: both servers and the load generator shared its cores, so these GPU "
    "counts say nothing about GPUs; size a fleet on a run on the GPUs it will use. "
)


@dataclass(frozen=True)
class SloSpec:
    """A latency SLO `coserve plan --fleet` can check: its flag's attribute, the metric it
    reads (coserve.report.aggregate.METRICS, ms) and the role that metric belongs to."""

    attr: str
    metric: str
    role: str
    name: str


SLOS = (
    SloSpec("gen_tpot_p99_ms", "tpot_p99", "gen", "gen TPOT p99"),
    SloSpec("gen_ttft_p99_ms", "ttft_p99", "gen", "gen TTFT p99"),
    SloSpec("embed_p99_ms", "embed_lat_p99", "embed", "embed latency p99"),
)


# Demands past these are no fleet (1e12 tok/s is millions of H200s): refused, not sized.
MAX_GEN_TOK_S = 1e12
MAX_EMBED_SEQ_S = 1e10


@dataclass(frozen=True)
class Demand:
    """What the fleet must serve: gen output tok/s, embed seq/s, and latency SLOs in ms (None:
    no SLO on that metric)."""

    gen_tok_s: float
    embed_seq_s: float
    gen_tpot_p99_ms: float | None = None
    gen_ttft_p99_ms: float | None = None
    embed_p99_ms: float | None = None

    def check(self) -> None:
        """Raises ValueError naming the flag of a value out of range."""
        for flag, v, most in (
            ("--gen-tok-s", self.gen_tok_s, MAX_GEN_TOK_S),
            ("--embed-seq-s", self.embed_seq_s, MAX_EMBED_SEQ_S),
        ):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{flag}: must be a number >= 0, got {v}")
            if v > most:
                raise ValueError(f"{flag}: must be at most {most:g}, got {v:g}")
        if self.gen_tok_s == 0 and self.embed_seq_s == 0:
            raise ValueError("--gen-tok-s and --embed-seq-s are both 0: nothing to serve")
        for slo in SLOS:
            v = getattr(self, slo.attr)
            if v is not None and not (math.isfinite(v) and v > 0):
                flag = "--" + slo.attr.replace("_", "-")
                raise ValueError(f"{flag}: must be a positive number of ms, got {v}")


@dataclass(frozen=True)
class Rate:
    """A throughput per GPU: the mean and its 95 % CI's ends (None with one rep)."""

    mean: float
    low: float | None
    high: float | None

    @classmethod
    def per_gpu(cls, s: Summary, gpus: int) -> Rate:
        low = None if s.ci_low is None else s.ci_low / gpus
        high = None if s.ci_high is None else s.ci_high / gpus
        return cls(s.mean / gpus, low, high)


@dataclass(frozen=True)
class Gpus:
    """GPUs a fleet needs at the mean throughputs, and with every throughput at its CI's low
    end (`most`) and high end (`fewest`). None: no CI (one rep), or a CI that reaches 0."""

    mean: int
    most: int | None
    fewest: int | None


@dataclass(frozen=True)
class SloCheck:
    """One SLO against one condition's measurement (ms; None: the run did not measure it)."""

    name: str
    condition: str
    limit_ms: float
    measured_ms: float | None
    ci_high_ms: float | None

    @property
    def verdict(self) -> str:
        if self.measured_ms is None:
            return "not measured"
        if self.measured_ms > self.limit_ms:
            return "misses"
        if self.ci_high_ms is not None and self.ci_high_ms > self.limit_ms:
            return "CI crosses"
        return "meets"

    @property
    def meets(self) -> bool:
        return self.verdict in ("meets", "CI crosses")


@dataclass(frozen=True)
class Saving:
    """Dedicated GPUs less co-located GPUs: at the means (and as % of dedicated), and its range
    over the CIs (`least`: co-located at its most, dedicated at its fewest; None without CIs)."""

    gpus: int
    pct: float
    least: int | None
    most: int | None


@dataclass(frozen=True)
class Dedicated:
    gen_condition: str | None  # None when the demand has no gen
    embed_condition: str | None
    gen_per_gpu: Rate | None
    embed_per_gpu: Rate | None
    gen_unit_gpus: int  # GPUs one gen deployment runs on (0: no gen demand)
    embed_unit_gpus: int
    gen_gpus: Gpus
    embed_gpus: Gpus
    total: Gpus
    slos: list[SloCheck]
    open_loop: list[str]  # roles whose alone condition ran at a fixed rate: a floor, as below

    @property
    def meets(self) -> bool:
        return all(c.meets for c in self.slos)


@dataclass(frozen=True)
class Colocated:
    condition: str
    label: str  # strategy, options and overrides
    reps: int
    condition_gpus: int  # GPUs the condition ran on: the unit the fleet is a multiple of
    gen_per_gpu: Rate
    embed_per_gpu: Rate
    gpus: Gpus
    slos: list[SloCheck]
    open_loop: list[str]  # roles whose load was a fixed rate: per-GPU figure is a floor
    saving: Saving | None  # None without a dedicated fleet to compare with

    @property
    def meets(self) -> bool:
        return all(c.meets for c in self.slos)


@dataclass(frozen=True)
class Fleet:
    run_dir: str
    measured_on: str  # the GPUs the run folder was measured on
    demand: Demand
    dedicated: Dedicated | None
    no_dedicated: str | None  # why `dedicated` is None
    colocated: list[Colocated]  # fewest GPUs first
    best: str | None  # the co-located condition meeting the SLOs with the fewest GPUs
    caveat: str
    unreadable: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for src, out in (
            (self.dedicated, d["dedicated"]),
            *zip(self.colocated, d["colocated"], strict=True),
        ):
            if src is not None:
                out["meets"] = src.meets
                for check, o in zip(src.slos, out["slos"], strict=True):
                    o["verdict"] = check.verdict
        return d


def _ceil(demand: float, rate: float | None) -> int | None:
    if demand == 0:
        return 0
    if rate is None or rate <= 0 or not math.isfinite(demand / rate):
        return None  # a rate of 1e-300 tok/s: no count of GPUs serves the demand
    return math.ceil(demand / rate * (1 - 1e-12))  # 2.0000000000001 GPUs is 2


def _need(demand: float, rate: Rate | None, unit: int) -> Gpus:
    """GPUs in whole units of `unit` GPUs, each delivering `unit` x the per-GPU `rate`."""

    def gpus(per_gpu: float | None) -> int | None:
        n = _ceil(demand, None if per_gpu is None else per_gpu * unit)
        return None if n is None else n * unit

    if rate is None:
        return Gpus(0, 0, 0)
    return Gpus(gpus(rate.mean), gpus(rate.low), gpus(rate.high))


def _combine(a: Gpus, b: Gpus, op) -> Gpus:
    def f(x, y):
        return None if x is None or y is None else op(x, y)

    return Gpus(op(a.mean, b.mean), f(a.most, b.most), f(a.fewest, b.fewest))


def _slos(demand: Demand, cs, roles: set[str]) -> list[SloCheck]:
    out = []
    for slo in SLOS:
        limit = getattr(demand, slo.attr)
        if limit is None or slo.role not in roles:
            continue
        s = cs.summary.get(slo.metric)
        measured, ci_high = (None, None) if s is None else (s.mean, s.ci_high)
        out.append(SloCheck(slo.name, cs.name, limit, measured, ci_high))
    return out


def _role_gpus(cs, role: str) -> int:
    """GPUs that served `role` in condition `cs`: all of its GPUs, or under `exclusive` the
    role's own (from the first finished rep's record; 1 where it says nothing)."""
    if cs.condition.strategy != "exclusive":
        return len(cs.condition.gpus)
    return len(role_devices(cs.ok[0]).get(role) or ()) or 1


@dataclass(frozen=True)
class _Choice:
    """`role` deployed as condition `cs` for a demand: what the choice between conditions
    weighs and the dedicated fleet then reports, worked out once."""

    cs: object
    unit: int  # GPUs one deployment runs on
    rate: Rate  # per GPU
    gpus: Gpus

    @classmethod
    def of(cls, cs, role: str, want: float) -> _Choice:
        unit = _role_gpus(cs, role)
        rate = Rate.per_gpu(cs.summary[THROUGHPUT[role]], unit)
        return cls(cs, unit, rate, _need(want, rate, unit))

    def cost(self) -> tuple[float, float]:
        """GPUs in whole units at the mean, inf where it measured nothing; minus the per-GPU
        rate, so the better rate wins a tie."""
        return (math.inf if self.gpus.mean is None else self.gpus.mean, -self.rate.mean)


def _dedicated(run, demand: Demand) -> tuple[Dedicated | None, str | None]:
    found: dict[str, _Choice | None] = {}
    for role, want in (("gen", demand.gen_tok_s), ("embed", demand.embed_seq_s)):
        if want == 0:
            found[role] = None
            continue
        own = run.on_own_gpus(role)
        if not own:
            return None, (
                f"no dedicated fleet: the run has no finished condition running {role} alone"
            )
        c = min((_Choice.of(cs, role, want) for cs in own), key=_Choice.cost)
        if _ceil(want, c.cs.summary[THROUGHPUT[role]].mean) is None:
            return None, f"no dedicated fleet: {c.cs.name} measured no {role} throughput"
        found[role] = c
    g, e = found["gen"], found["embed"]
    gen_gpus, embed_gpus = (Gpus(0, 0, 0) if c is None else c.gpus for c in (g, e))
    slos = [s for r, c in (("gen", g), ("embed", e)) if c for s in _slos(demand, c.cs, {r})]
    return Dedicated(
        g and g.cs.name,
        e and e.cs.name,
        g and g.rate,
        e and e.rate,
        g.unit if g else 0,
        e.unit if e else 0,
        gen_gpus,
        embed_gpus,
        _combine(gen_gpus, embed_gpus, lambda x, y: x + y),
        slos,
        [r for r, c in (("gen", g), ("embed", e)) if c is not None and r in _open_loop(run, c.cs)],
    ), None


def _saving(ded: Dedicated | None, co: Gpus) -> Saving | None:
    if ded is None:
        return None
    d = ded.total
    least = None if d.fewest is None or co.most is None else d.fewest - co.most
    most = None if d.most is None or co.fewest is None else d.most - co.fewest
    return Saving(d.mean - co.mean, 100 * (d.mean - co.mean) / d.mean, least, most)


def _open_loop(run, cs) -> list[str]:
    load = cs.condition.load_for(run.spec)
    return [r for r in ("gen", "embed") if getattr(load, f"{r}_rate", None) is not None]


def plan_fleet(run, demand: Demand) -> Fleet:
    """`run`: a RunStats (coserve.report.aggregate). Raises ValueError for a demand out of
    range, or a run with neither a dedicated fleet nor a co-located condition to size."""
    from coserve.experiment.fingerprint import describe_gpus

    demand.check()
    ded, why = _dedicated(run, demand)
    rows = []
    for cs in colocated(run):
        if cs.condition.strategy == "exclusive":
            continue  # each model on GPUs of its own: the dedicated fleet, not co-located
        n = len(cs.condition.gpus)
        g = Rate.per_gpu(cs.summary["gen_tok_s"], n)
        e = Rate.per_gpu(cs.summary["embed_seq_s"], n)
        if _ceil(demand.gen_tok_s, g.mean) is None or _ceil(demand.embed_seq_s, e.mean) is None:
            continue  # measured nothing of a role the demand needs: no number of GPUs serves it
        gpus = _combine(_need(demand.gen_tok_s, g, n), _need(demand.embed_seq_s, e, n), max)
        rows.append(
            Colocated(
                cs.name,
                condition_label(cs),
                len(cs.ok),
                n,
                g,
                e,
                gpus,
                _slos(demand, cs, {"gen", "embed"}),
                _open_loop(run, cs),
                _saving(ded, gpus),
            )
        )
    if ded is None and not rows:
        raise ValueError(
            f"{run.run_dir.path}: nothing to size: {why.removeprefix('no dedicated fleet: ')}, "
            "and no condition ran gen and embed together and finished a rep"
            + (f" ({run.unreadable_text()})" if run.unreadable else "")
        )
    rows.sort(key=lambda r: (not r.meets, r.gpus.mean, r.condition))
    best = next((r.condition for r in rows if r.meets), None)
    measured_on = describe_gpus(run.fingerprint) if run.fingerprint else "GPU unknown"
    caveat = CAVEAT.format(gpu=measured_on)
    if on_cpu(run):
        caveat = CPU_CAVEAT + caveat
    return Fleet(
        str(run.run_dir.path),
        measured_on,
        demand,
        ded,
        why,
        rows,
        best,
        caveat,
        run.unreadable_text(),
    )
