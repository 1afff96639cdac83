"""The SLO guard: an embed admission controller that holds the gen server's decode latency
within a budget and gives embeddings the rest.

The gen server's engine core times every engine step (wall clock around `engine.step()`)
and its /metrics carries the mean and the p99 of those times over the last half second
(`coserve:engine_step_seconds_mean`, `..._p99`) and how many steps that window held
(`coserve:engine_steps_window`). A request's TPOT is the mean of the step times it decoded
through, so holding every window's mean step time within the budget holds each request's
TPOT, and so gen's TPOT p99, within it (up to the gaps between steps). The guard follows
the mean by default; the p99 of a half-second window (~20 decode steps) is nearly its
maximum, a noisy signal, kept for a stricter guard (`stat = "p99"`).

The embed server polls that page every `interval_s` (slo_guard_io.run_guard) and feeds the
figure to `SloGuard`, a pure AIMD controller: over budget, it halves the tokens an embed
forward may take (down to `min_tokens`) and then doubles a pause between forwards; under the
budget it shortens the pause first and then grows the forward size additively. The embed
engine core applies the resulting `Allowance` (engine_core.py). Nothing is dropped: a
throttled embed request only waits, and the wait shows in its latency.

With a budget given as a percentage over gen alone, the guard measures gen alone itself, by
probes: it holds every embed forward, waits `settle_s` (the embed forward in flight ends, so
does the gen step beside it, and gen's figures catch up), then reads gen's window for the
probe's span; a reading counts only once the whole window lies after the settle. The first
probe (span `calibrate_s`) starts when gen first gets busy; later ones (span `probe_s`) every
`probe_interval_s` while gen is busy, because gen alone's step time drifts with its load (a
decode step reads the KV cache of every running sequence, which grows as they age).

A step's time depends on the work it does, and a closed loop's refills make that work swing
within seconds, so the guard compares gen now with gen alone doing the same work: each probe
keeps the mean work of gen's steps beside its figure (sequences, prompt tokens, KV tokens
read; GenSample.work), and the baseline is a fit of gen alone's step time to that work over
the last `probe_keep` probes (slo_guard_fit.py), evaluated at every reading for the work in
gen's window then. Without work figures on gen's page, too few probes, or probes whose work
does not vary, the baseline is the median of those probes."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field

from coserve.engine.types import StepWork
from coserve.server.engine_core import STEP_WINDOW_S
from coserve.server.slo_guard_fit import Baseline, ProbePoint, fit_baseline

log = logging.getLogger("coserve.server")

STATS = ("mean", "p99")
BUDGET_MAX_MS = 3.6e6  # an hour: a budget past it is a typo (a spec's bound too)
# 0.1 ms: below any gen step's time (one decode step is tens of kernel launches of several
# µs each, even for the tiny presets), so every step would miss it and embed be held at its
# floor throughout, as with a 0 budget; a budget that small is a unit slip (s for ms).
BUDGET_MIN_MS = 0.1


@dataclass(frozen=True)
class Allowance:
    """What the embed engine may do now: at most `tokens_per_forward` tokens in one forward
    (one input always fits), at least `pause_s` seconds between the end of one forward and
    the start of the next, and no forward at all while `hold`."""

    tokens_per_forward: int
    pause_s: float = 0.0
    hold: bool = False


@dataclass(frozen=True)
class GenSample:
    """One reading of gen's /metrics: the guarded statistic (mean or p99) of its step wall
    time (s) over its window, how many steps the window held (0: gen idle), and the mean
    work of those steps (None: gen does not publish it)."""

    step_s: float
    steps: int
    work: StepWork | None = None


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """Settings of `SloGuard`. Exactly one of `budget_s` (budget of gen's step time `stat`,
    seconds) and `over_alone_pct` (budget = gen alone's figure x (1 + pct/100), gen alone
    measured by probes) is set. Times are seconds.

    Raises ValueError naming the field when a value is out of range."""

    budget_s: float | None = None
    over_alone_pct: float | None = None
    stat: str = "mean"  # which figure of gen's step times: mean | p99
    max_tokens: int = 8192  # the embed server's max_num_batched_tokens
    # The floor of tokens per forward before pauses take over: an embed forward reads all its
    # weights however few tokens it runs, so much smaller forwards only waste bandwidth.
    min_tokens: int = 512
    cut: float = 0.5  # multiplicative decrease of tokens per forward
    grow_tokens: int = 0  # additive increase per reading under budget; 0: max_tokens / 32
    first_pause_s: float = 0.002
    max_pause_s: float = 0.5
    # At the token floor a cut lengthens the pause between forwards by `pause_cut` and a
    # growth shortens it by `pause_grow`: back off fast, come back gently. Halving it on a
    # growth doubled embed's duty at once (on an H200 the pause swung 125-500 ms and gen's
    # step rose 2-4 ms over the budget each time it had come down to 125 ms, the fourth
    # measurements of docs/co-scheduling.md; in test_slo_guard_probes.py's plant at the
    # floor the largest reading went from 1.8 % over the budget to 0.2 %, for ~17 % less
    # embed duty).
    pause_cut: float = 2.0
    pause_grow: float = 1.25
    margin: float = 1.0  # grow only while measured < margin x budget (1: whenever under it)
    cooldown_s: float = 0.5  # after a cut, no cut for this long: gen's window still holds old steps
    # After a growth, no growth for this long: its effect on gen shows only once gen's window
    # has turned over. Growing on every poll ran the allowance past the budget before the
    # first reading over it arrived, so gen's mean step sat over the budget: on an H200 gen's
    # TPOT ran +10 % over gen alone in steady state under a +5 % budget (docs/co-scheduling.md,
    # third measurements); in test_slo_guard_probes.py's plant the mean reading went from
    # 1.1 % over the budget to 0.6 % under it.
    grow_interval_s: float = STEP_WINDOW_S
    # A probe's hold before its span: the embed forward in flight, the gen step that overlaps
    # its end, and the age of gen's figures (its engine core sends them every 50 ms).
    settle_s: float = 0.3
    calibrate_s: float = 2.0  # the first probe's span
    probe_s: float = 0.5  # a later probe's span
    probe_interval_s: float = 5.0  # from one probe's end to the next one's start; 0: one probe
    # A probe holds embed for settle + span (~0.8 s of every ~5.8 s at the defaults). Once a
    # probe's figure lies within `probe_agree_pct` of what the baseline predicted for its work,
    # the interval doubles, up to `probe_interval_max_s` (or `probe_interval_s` where that is
    # longer); a probe that disagrees (gen's load changed) sets it back to `probe_interval_s`.
    probe_agree_pct: float = 2.0
    probe_interval_max_s: float = 40.0
    # The baseline is fitted to (or, failing a fit, the median of) this many last probes. A
    # fit of up to 4 parameters needs more probes than that, and gen's work levels alternate
    # (refills), so 8 probes (~45 s at the default interval) see each level several times.
    probe_keep: int = 8
    gen_window_s: float = STEP_WINDOW_S  # the span of gen's step figures

    def __post_init__(self) -> None:
        if (self.budget_s is None) == (self.over_alone_pct is None):
            raise ValueError(
                "gen_tpot_slo: give exactly one of gen_tpot_slo_ms and gen_tpot_slo_pct"
            )
        if self.budget_s is not None and not BUDGET_MIN_MS <= self.budget_s * 1e3 <= BUDGET_MAX_MS:
            raise ValueError(
                f"gen_tpot_slo_ms: must be in [{BUDGET_MIN_MS:g}, {BUDGET_MAX_MS:g}] ms, got "
                f"{self.budget_s * 1e3:g}"
            )
        # 0 %: gen's own step-time noise would pass for embed's cost (embed held at its floor)
        if self.over_alone_pct is not None and not 0 < self.over_alone_pct <= 1000:
            raise ValueError(f"gen_tpot_slo_pct: must be in (0, 1000], got {self.over_alone_pct:g}")
        if self.stat not in STATS:
            raise ValueError(f"stat: must be one of {', '.join(STATS)}, got {self.stat!r}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"max_tokens: must be at least min_tokens ({self.min_tokens}), got "
                f"{self.max_tokens}"
            )
        if not 0 < self.cut < 1:
            raise ValueError(f"cut: must be in (0, 1), got {self.cut}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin: must be in (0, 1], got {self.margin}")
        for name in ("pause_cut", "pause_grow"):
            if not getattr(self, name) > 1:
                raise ValueError(f"{name}: must be > 1, got {getattr(self, name)}")
        if not 0 < self.first_pause_s <= self.max_pause_s:
            raise ValueError("first_pause_s: must be positive and at most max_pause_s")
        if self.grow_interval_s < 0:
            raise ValueError(f"grow_interval_s: must be >= 0, got {self.grow_interval_s:g}")
        if self.settle_s < 0:
            raise ValueError(f"settle_s: must be >= 0, got {self.settle_s:g}")
        for name in ("calibrate_s", "probe_s"):  # a shorter span would read pre-probe steps
            if getattr(self, name) < self.gen_window_s:
                raise ValueError(
                    f"{name}: must be at least gen's step window ({self.gen_window_s:g} s), "
                    f"got {getattr(self, name):g}"
                )
        if not 0 <= self.probe_interval_s <= 86400:
            raise ValueError(
                f"probe_interval_s: must be in [0, 86400] (0: probe once), got "
                f"{self.probe_interval_s:g}"
            )
        if not 0 <= self.probe_agree_pct <= 100:
            raise ValueError(f"probe_agree_pct: must be in [0, 100], got {self.probe_agree_pct:g}")
        if not 0 <= self.probe_interval_max_s <= 86400:
            raise ValueError(
                f"probe_interval_max_s: must be in [0, 86400], got {self.probe_interval_max_s:g}"
            )
        if self.probe_keep < 1:
            raise ValueError(f"probe_keep: must be >= 1, got {self.probe_keep}")


@dataclass
class GuardState:
    """What /metrics shows of the guard (times in seconds)."""

    budget_s: float | None
    measured_s: float = 0.0
    gen_steps: int = 0
    allowance: Allowance = field(default_factory=lambda: Allowance(1))
    phase: str = "waiting"  # waiting (for a gen figure) | probing | guarding
    cuts: int = 0
    polls: int = 0
    poll_errors: int = 0
    baseline_s: float | None = None  # gen alone's step time for gen's work now (the fit)
    fit: Baseline | None = None  # the baseline of the last probes (a fit or their median)
    probes: int = 0  # probes that gave a figure
    last_probe_s: float | None = None  # the newest probe's figure


@dataclass
class _Probe:
    start: float
    span_s: float  # measured after the settle
    readings: list[GenSample] = field(default_factory=list)


class SloGuard:
    """AIMD controller with probes: `update(sample, now)` -> the Allowance to apply. Pure:
    time comes in as `now` (seconds, any monotonic origin), so scripted inputs test it
    exactly."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.tokens = cfg.max_tokens
        self.pause_s = 0.0
        self.last_cut = -float("inf")
        # Probes measure gen alone for a percentage budget only; the first is due at once.
        self.next_probe_at = -float("inf") if cfg.over_alone_pct is not None else float("inf")
        self.probe: _Probe | None = None
        self.points: deque[ProbePoint] = deque(maxlen=cfg.probe_keep)
        self.probe_interval_s = cfg.probe_interval_s  # doubles while probes agree
        self.grow_from = -float("inf")  # no growth before: gen's window still holds a probe
        self.state = GuardState(
            budget_s=cfg.budget_s,
            allowance=self._allowance(),
            phase="guarding" if cfg.budget_s is not None else "waiting",
        )

    def _allowance(self, hold: bool = False) -> Allowance:
        return Allowance(self.tokens, round(self.pause_s, 6), hold)

    def update(self, sample: GenSample | None, now: float) -> Allowance:
        """One reading -> the allowance now. None (the poll failed) keeps the allowance, but
        ends a probe without a figure."""
        st = self.state
        st.polls += 1
        if sample is None:
            st.poll_errors += 1
            if self.probe is not None:  # never hold embed on a gen server it cannot read
                self._end_probe(now)
                st.allowance = self._allowance()
            return st.allowance
        st.measured_s, st.gen_steps = sample.step_s, sample.steps
        due = sample.steps > 0 and now >= self.next_probe_at
        if (self.probe is not None or due) and self._probing(sample, now):
            st.allowance = self._allowance(hold=True)
            return st.allowance
        if st.budget_s is None:  # gen idle so far: nothing to protect, embed runs freely
            st.allowance = self._allowance()
            return st.allowance
        if st.fit is not None and sample.steps > 0:
            self._set_budget(sample.work)
        if sample.steps == 0:
            self._grow()
        elif sample.step_s > st.budget_s:
            if now - self.last_cut >= self.cfg.cooldown_s:
                self._cut()
                self.last_cut = now
                st.cuts += 1
        elif sample.step_s < self.cfg.margin * st.budget_s and now >= self.grow_from:
            self._grow()
            self.grow_from = now + self.cfg.grow_interval_s
        st.allowance = self._allowance()
        return st.allowance

    def _probing(self, sample: GenSample, now: float) -> bool:
        """Start or go on with a probe; True while it holds embed."""
        cfg, st = self.cfg, self.state
        if self.probe is None:
            span = cfg.calibrate_s if st.baseline_s is None else cfg.probe_s
            self.probe = _Probe(now, span)
            st.phase = "probing"
        probe = self.probe
        if sample.steps == 0:  # gen went idle: nothing to measure, try again when it is busy
            self._end_probe(now)
            return False
        since = now - probe.start
        if since >= cfg.settle_s + cfg.gen_window_s:  # the window lies wholly after the settle
            probe.readings.append(sample)
        if since < cfg.settle_s + probe.span_s:
            return True
        self._end_probe(now, _probe_point(probe.readings))
        return False

    def _end_probe(self, now: float, point: ProbePoint | None = None) -> None:
        cfg, st = self.cfg, self.state
        self.probe = None
        self.grow_from = now + cfg.gen_window_s
        if point is None:
            st.phase = "waiting" if st.budget_s is None else "guarding"
            return
        agrees = st.fit is not None and abs(point.step_s - st.fit.predict(point.work)) <= (
            cfg.probe_agree_pct / 100 * point.step_s
        )
        self.probe_interval_s = (
            min(2 * self.probe_interval_s, max(cfg.probe_interval_max_s, cfg.probe_interval_s))
            if agrees
            else cfg.probe_interval_s
        )
        if not self.points:
            # The first figure of gen alone: embed restarts from its floor and grows into the
            # room the budget leaves. Resuming the forwards it ran before gen was busy (up to
            # max_tokens) put gen's steps far over the budget for the ~3 s the cuts took: the
            # first wave of requests on an H200 ran at +18 to +19 % under a +5 % budget
            # (docs/co-scheduling.md, fourth measurements).
            self.tokens, self.pause_s = cfg.min_tokens, 0.0
        self.points.append(point)
        st.probes += 1
        st.last_probe_s = point.step_s
        st.fit = fit_baseline(list(self.points))
        self._set_budget(point.work)
        st.phase = "guarding"
        self.next_probe_at = now + self.probe_interval_s if cfg.probe_interval_s else float("inf")
        log.info(
            "SLO guard: probe %d: gen alone step %s %.2f ms at %s; baseline now %.2f ms "
            "(%s; %d probes), budget %.2f ms",
            st.probes,
            cfg.stat,
            point.step_s * 1e3,
            point.work,
            st.baseline_s * 1e3,
            st.fit.describe(),
            len(self.points),
            st.budget_s * 1e3,
        )

    def _set_budget(self, work: StepWork | None) -> None:
        st = self.state
        st.baseline_s = st.fit.predict(work)
        st.budget_s = st.baseline_s * (1 + self.cfg.over_alone_pct / 100)

    def _cut(self) -> None:
        cfg = self.cfg
        if self.tokens > cfg.min_tokens:
            self.tokens = max(cfg.min_tokens, int(self.tokens * cfg.cut))
        else:
            self.pause_s = min(
                cfg.max_pause_s, max(cfg.first_pause_s, self.pause_s * cfg.pause_cut)
            )

    def _grow(self) -> None:
        cfg = self.cfg
        if self.pause_s > 0:
            shorter = self.pause_s / cfg.pause_grow
            self.pause_s = shorter if shorter >= cfg.first_pause_s else 0.0
            return
        step = cfg.grow_tokens or max(1, cfg.max_tokens // 32)
        self.tokens = min(cfg.max_tokens, self.tokens + step)


def _probe_point(readings: list[GenSample]) -> ProbePoint:
    """A probe's readings (at least one) -> its point: the median figure, and the median of
    each work feature (None unless every reading carries work)."""
    works = [r.work for r in readings]
    work = None
    if all(w is not None for w in works):
        work = StepWork(
            statistics.median(w.seqs for w in works),
            statistics.median(w.prefill_tokens for w in works),
            statistics.median(w.kv_tokens for w in works),
        )
    return ProbePoint(statistics.median(r.step_s for r in readings), work)
