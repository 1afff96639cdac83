"""A run folder -> per-condition statistics (what `stats.json` holds and the report shows)."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coserve import stats
from coserve.experiment.rundir import RunDir, Unreadable, read_object
from coserve.spec import Condition, Spec, SpecError, parse_spec

# metric -> path into a rep record; each is summarised over the condition's finished reps.
METRICS: dict[str, tuple[str, ...]] = {
    "gen_tok_s": ("bench", "gen", "output_tokens_per_s"),
    "gen_req_s": ("bench", "gen", "requests_per_s"),
    "embed_seq_s": ("bench", "embed", "sequences_per_s"),
    "embed_req_s": ("bench", "embed", "requests_per_s"),
    **{f"tpot_{p}": ("bench", "gen", "tpot_ms", p) for p in ("mean", "p50", "p95", "p99")},
    **{f"ttft_{p}": ("bench", "gen", "ttft_ms", p) for p in ("mean", "p50", "p95", "p99")},
    **{f"itl_{p}": ("bench", "gen", "itl_ms", p) for p in ("p50", "p95", "p99")},
    **{
        f"embed_lat_{p}": ("bench", "embed", "latency_ms", p) for p in ("mean", "p50", "p95", "p99")
    },
    # Open-loop load and goodput (results from before them lack these keys: left out).
    **{
        f"{r}_{k}_rps": ("bench", r, f"{k}_rate_rps")
        for r in ("gen", "embed")
        for k in ("offered", "achieved")
    },
    "gen_goodput_req_s": ("bench", "gen", "goodput", "requests_per_s"),
    "gen_goodput_tok_s": ("bench", "gen", "goodput", "output_tokens_per_s"),
    "embed_goodput_seq_s": ("bench", "embed", "goodput", "sequences_per_s"),
    # The SLO guard's state at the end of the load (conditions with embed.slo_guard only).
    **{
        f"slo_guard_{k}": ("slo_guard", k)
        for k in (
            "budget_seconds",
            "gen_alone_seconds",
            "last_probe_seconds",
            "probes_total",
            "gen_step_seconds",
            "tokens_per_forward",
            "pause_seconds",
            "cuts_total",
            "throttled_seconds_total",
        )
    },
    **{
        m: ("telemetry", "window", m, "mean")
        for m in (
            "sm_active",
            "sm_occupancy",
            "tensor_active",
            "dram_active",
            "fp16_active",
            "fp32_active",
            "gpu_util",
            "power_w",
            "sm_clock_mhz",
            "power_capped",
            "mem_used_mib",
        )
    },
    # the card's budget: its enforced limit, and its draw with the servers up before the load
    "power_limit_w": ("telemetry", "at_start", "power_limit_w"),
    "power_before_load_w": ("telemetry", "at_start", "power_w"),
}
TELEMETRY = ("sm_active", "sm_occupancy", "tensor_active", "dram_active")
THROUGHPUT = {"gen": "gen_tok_s", "embed": "embed_seq_s"}  # each role's throughput metric


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


@dataclass(frozen=True)
class LoadWarning:
    """An endpoint that did not keep up with its offered rate in one rep."""

    condition: str
    rep: int
    role: str
    text: str


@dataclass
class ConditionStats:
    condition: Condition
    planned: int
    ok: list[dict] = field(default_factory=list)  # finished reps, by rep number
    failed: list[dict] = field(default_factory=list)  # reps recorded as failed
    values: dict[str, list[float]] = field(default_factory=dict)
    summary: dict[str, stats.Summary] = field(default_factory=dict)
    gen_delta: stats.Delta | None = None
    embed_delta: stats.Delta | None = None
    gen_baseline: str | None = None
    embed_baseline: str | None = None

    @property
    def name(self) -> str:
        return self.condition.name

    @property
    def status(self) -> str:
        n_ok = len(self.ok)
        if n_ok >= self.planned:
            return "complete"
        if n_ok:
            return "partial"
        return "failed" if self.failed else "not run"

    def mean(self, metric: str) -> float | None:
        s = self.summary.get(metric)
        return None if s is None else s.mean

    def load_warnings(self) -> list[LoadWarning]:
        """Each finished rep's endpoints whose result says `kept_up: false`."""
        out = []
        for r in self.ok:
            for role in ("gen", "embed"):
                part = _get(r, ("bench", role)) or {}
                if part.get("kept_up") is False:
                    text = part.get("warning") or "did not keep up with the offered rate"
                    held = _get(r, ("slo_guard", "throttled_seconds_total"))
                    if role == "embed" and stats.finite_number(held) and held > 0:
                        # the load generator cannot tell a guard's hold from a slow server
                        text += (
                            f" — the SLO guard held embed back for {held:.1f} s of the load, "
                            "by design: its throttling, not the server, set the rate"
                        )
                    elif list(self.condition.servers) == [role]:
                        text += (
                            f" — {role} alone: what it served is what the GPU serves it (its "
                            "capacity)"
                        )
                    out.append(LoadWarning(self.name, r["rep"], role, text))
        return out

    def to_dict(self) -> dict:
        return {
            "condition": self.name,
            "strategy": self.condition.strategy,
            "servers": list(self.condition.servers),
            "status": self.status,
            "reps_planned": self.planned,
            "reps_ok": [r["rep"] for r in self.ok],
            "failures": [{"rep": r["rep"], "error": r.get("error")} for r in self.failed],
            "sweep": list(self.condition.sweep) if self.condition.sweep else None,
            "metrics": {k: s.to_dict() for k, s in self.summary.items()},
            "per_rep": self.values,
            "gen_delta_pct": self.gen_delta.to_dict() if self.gen_delta else None,
            "gen_baseline": self.gen_baseline,
            "embed_delta_pct": self.embed_delta.to_dict() if self.embed_delta else None,
            "embed_baseline": self.embed_baseline,
            "load_warnings": [
                {"rep": w.rep, "role": w.role, "warning": w.text} for w in self.load_warnings()
            ],
        }


@dataclass
class RunStats:
    run_dir: RunDir
    spec: Spec
    fingerprint: dict  # {} when fingerprint.json is unreadable
    conditions: list[ConditionStats]
    unreadable: list[Unreadable] = field(default_factory=list)  # files left out, and why

    def unreadable_text(self) -> str | None:
        """One sentence naming every unreadable file (None when there is none)."""
        if not self.unreadable:
            return None
        return (
            f"could not read {len(self.unreadable)} file(s) of the run folder; left out of "
            "every figure: " + "; ".join(str(u) for u in self.unreadable)
        )

    def get(self, name: str) -> ConditionStats:
        return next(c for c in self.conditions if c.name == name)

    @property
    def matrix(self) -> list[ConditionStats]:
        return [c for c in self.conditions if c.condition.sweep is None]

    def on_own_gpus(self, role: str) -> list[ConditionStats]:
        """The matrix conditions (no sweep point) that finished a rep, measured `role`'s
        ("gen" or "embed") THROUGHPUT and ran it on GPUs of its own: the role alone, or
        `exclusive` (each model on GPUs of its own), in spec order."""
        metric = THROUGHPUT[role]
        return [
            c
            for c in self.matrix
            if c.ok
            and metric in c.summary
            and (list(c.condition.servers) == [role] or c.condition.strategy == "exclusive")
        ]

    def alone(self, role: str) -> ConditionStats | None:
        """The condition `coserve advise` quotes as `role` alone, of `on_own_gpus`: the spec's
        baseline where it runs the role alone, else the first condition that does; without
        one, the baseline where it is `exclusive`, else the first `exclusive` one; None when
        there is none."""
        own = self.on_own_gpus(role)
        for group in (
            [c for c in own if list(c.condition.servers) == [role]],
            [c for c in own if c.condition.strategy == "exclusive"],
        ):
            if group:
                return next((c for c in group if c.name == self.spec.baseline), group[0])
        return None

    @property
    def sweep(self) -> list[ConditionStats]:
        return [c for c in self.conditions if c.condition.sweep is not None]

    def gen_tokens_per_embed(self, c: ConditionStats) -> float | None:
        """What each embedding served cost gen, in gen tok/s lost per embed seq/s: (gen alone's
        mean - the condition's) / the condition's embed mean. Only against a gen baseline
        that runs gen alone (the study's section 3 calls it "cost per embed"); None without
        one, for the baseline itself, without embed throughput, or where gen alone served
        nothing (no yardstick, as its delta has none)."""
        base = self.get(c.gen_baseline) if c.gen_baseline else None
        gen, emb = c.mean("gen_tok_s"), c.mean("embed_seq_s")
        if base is None or base is c or list(base.condition.servers) != ["gen"]:
            return None
        alone = base.mean("gen_tok_s")
        if gen is None or not emb or not (alone or 0) > 0:
            return None
        return (alone - gen) / emb

    def sweep_optimum(self) -> dict[str, tuple[float, float]]:
        """Per swept condition: (swept value, throughput) of the best point measured."""
        if self.spec.sweep is None:
            return {}
        metric = THROUGHPUT[self.spec.sweep.role]
        best: dict[str, tuple[int, float]] = {}
        for c in self.sweep:
            pt = c.condition.sweep
            v = c.mean(metric)
            if v is not None and (pt.base not in best or v > best[pt.base][1]):
                best[pt.base] = (pt.value, v)
        return best

    def to_dict(self) -> dict:
        return {
            "spec": {
                "name": self.spec.name,
                "hash": self.spec.digest(),
                "baseline": self.spec.baseline,
            },
            "conditions": [c.to_dict() for c in self.conditions],
            "sweep_optimum": {
                k: {self.spec.sweep.knob: c, "throughput": v}
                for k, (c, v) in self.sweep_optimum().items()
            },
            "method": "mean over finished reps; 95% CI of the mean from Student's t; delta = "
            "condition mean / baseline mean - 1 with a delta-method CI (Welch df)",
        }


def load_spec_of(run_dir: RunDir) -> Spec:
    """The spec the run folder was started with. Raises SpecError (spec.json unreadable or
    not a valid spec), OSError."""
    if run_dir.spec_json.exists():
        try:
            data = read_object(run_dir.spec_json)
        except ValueError as e:
            raise SpecError(str(run_dir.spec_json), [f"unreadable: {e}"]) from None
        return parse_spec(data, str(run_dir.spec_json))
    from coserve.spec import load_spec

    return load_spec(run_dir.spec_file)


def embed_baseline(spec: Spec) -> str | None:
    """The condition embed deltas are against: the first that runs embed alone."""
    for c in spec.conditions:
        if list(c.servers) == ["embed"]:
            return c.name
    return None


def _unusable(record: dict) -> str | None:
    """Why a rep record's figures cannot be used (bench.gen or bench.embed no object, a
    metric no number or not finite, a throughput below zero), or None."""
    for role in ("gen", "embed"):
        part = _get(record, ("bench", role))
        if part is not None and not isinstance(part, dict):
            return f"bench.{role} is a {type(part).__name__}, not an object"
    for path in METRICS.values():
        v = _get(record, path)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"{'.'.join(path)} is {reprlib.repr(v)}, not a number"
        try:
            finite = v is None or math.isfinite(v)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            return f"{'.'.join(path)} is {reprlib.repr(v)}, not a finite number"
    for metric in THROUGHPUT.values():
        v = _get(record, METRICS[metric])
        if v is not None and v < 0:
            return f"{'.'.join(METRICS[metric])} is {reprlib.repr(v)}, a negative rate"
    return None


def _odd_fingerprint(fp: dict) -> str | None:
    """Why the report cannot quote a fingerprint.json (GPUs no list of objects with a string
    `name`, or packages, git or cpu no object), or None."""
    for key in ("gpus", "gpus_used"):
        gpus = fp.get(key)
        if gpus is None:
            continue
        if not isinstance(gpus, list):
            return f"{key} is a {type(gpus).__name__}, not a list"
        if not all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in gpus):
            return f"{key} holds an entry with no string 'name'"
    for key in ("packages", "git", "cpu"):
        if fp.get(key) is not None and not isinstance(fp[key], dict):
            return f"{key} is a {type(fp[key]).__name__}, not an object"
    return None


def aggregate(path: str | Path) -> RunStats:
    rd = RunDir(path)
    if not rd.path.exists():
        raise FileNotFoundError(f"{rd.path} does not exist")
    if not rd.readable():
        raise FileNotFoundError(
            f"{rd.path} is not a coserve run folder (no fingerprint.json nor spec.json)"
        )
    spec = load_spec_of(rd)
    scan = rd.scan_records()
    unreadable = list(scan.unreadable)
    try:
        fp = read_object(rd.fingerprint_file)
        if (why := _odd_fingerprint(fp)) is not None:
            raise ValueError(why)
    except (OSError, ValueError) as e:
        fp = {}
        why = getattr(e, "strerror", None) or str(e)
        unreadable.insert(0, Unreadable(rd.fingerprint_file, why))
    by_cond: dict[str, list[dict]] = {}
    for r in scan.records:
        why = _unusable(r)
        if why is not None:  # a NaN throughput is no measurement: the rep is left out whole
            unreadable.append(Unreadable(rd.rep_dir(r["condition"], r["rep"]) / "rep.json", why))
            continue
        by_cond.setdefault(r["condition"], []).append(r)
    out = []
    for cond in spec.all_conditions():
        cs = ConditionStats(cond, spec.reps_of(cond))
        recs = sorted(by_cond.get(cond.name, []), key=lambda r: r["rep"])
        recs = [r for r in recs if r["rep"] <= cs.planned]
        cs.ok = [r for r in recs if r.get("status") == "ok"]
        cs.failed = [r for r in recs if r.get("status") != "ok"]
        for metric, p in METRICS.items():
            vals = [_get(r, p) for r in cs.ok]
            vals = [float(v) for v in vals if isinstance(v, int | float)]
            if vals:
                cs.values[metric] = vals
                cs.summary[metric] = stats.summarize(vals)
        out.append(cs)
    _set_deltas(spec, out)
    return RunStats(rd, spec, fp, out, unreadable)


def _set_deltas(spec, conditions: list[ConditionStats]) -> None:
    """Each condition's gen and embed deltas against its baselines. A sweep point is held
    against its baselines' points at the same swept value (the same offered load). Where a
    baseline has no such point and runs only the role the sweep leaves alone (gen alone in an
    embed sweep, embed alone in a gen sweep), the point is held against it: the swept knob
    does not change that role's load. Otherwise the point gets no delta."""
    names = {c.name: c for c in conditions}
    points = {
        (c.condition.sweep.base, c.condition.sweep.value): c
        for c in conditions
        if c.condition.sweep is not None
    }
    emb = embed_baseline(spec)
    for cs in conditions:
        gen_base, embed_base = names.get(cs.condition.baseline_name(spec)), names.get(emb)
        pt = cs.condition.sweep
        if pt is not None:
            base_cond = names[pt.base].condition
            gen_base = points.get((base_cond.baseline_name(spec), pt.value)) or _unswept_alone(
                names.get(base_cond.baseline_name(spec)), "gen", spec.sweep.role
            )
            embed_base = points.get((emb, pt.value)) or _unswept_alone(
                names.get(emb), "embed", spec.sweep.role
            )
        for role, metric, base in (
            ("gen", "gen_tok_s", gen_base),
            ("embed", "embed_seq_s", embed_base),
        ):
            if role not in cs.condition.servers or base is None or metric not in base.values:
                continue
            setattr(cs, f"{role}_baseline", base.name)
            if base is not cs and metric in cs.values:
                setattr(cs, f"{role}_delta", stats.delta(cs.values[metric], base.values[metric]))


def _unswept_alone(base: ConditionStats | None, role: str, swept: str) -> ConditionStats | None:
    """`base` where it runs `role` alone and the sweep moves the other role's load, else None."""
    if base is None or role == swept or list(base.condition.servers) != [role]:
        return None
    return base
