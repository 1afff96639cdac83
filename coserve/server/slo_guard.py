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

The embed server polls that page every `interval_s` and feeds the figure to `SloGuard`, a
pure AIMD controller: over budget, it halves the tokens an embed forward may take (down to
`min_tokens`) and then doubles a pause between forwards; under the budget it shortens the
pause first and then grows the forward size additively. The embed engine core
applies the resulting `Allowance` (engine_core.py). Nothing is dropped: a throttled embed
request only waits, and the wait shows in its latency.

With a budget given as a percentage over gen alone, the guard measures gen alone itself:
the first time gen is busy it holds every embed forward for `settle_s + calibrate_s`,
takes the median of the figures seen after `settle_s` (the window then holds no step that
ran beside an embed forward) and sets the budget from it."""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
from dataclasses import dataclass, field

log = logging.getLogger("coserve.server")

STEP_METRIC = "coserve:engine_step_seconds_{stat}"  # stat: mean | p99
STATS = ("mean", "p99")
STEP_COUNT_METRIC = "coserve:engine_steps_window"


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
    time (s) over its window and how many steps the window held (0: gen idle)."""

    step_s: float
    steps: int


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """Settings of `SloGuard`. Exactly one of `budget_s` (budget of gen's step time `stat`,
    seconds) and `over_alone_pct` (budget = gen alone's figure x (1 + pct/100)) is set.

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
    margin: float = 1.0  # grow only while measured < margin x budget (1: whenever under it)
    cooldown_s: float = 0.5  # after a cut, no cut for this long: gen's window still holds old steps
    settle_s: float = 0.7
    calibrate_s: float = 2.0

    def __post_init__(self) -> None:
        if (self.budget_s is None) == (self.over_alone_pct is None):
            raise ValueError(
                "gen_tpot_slo: give exactly one of gen_tpot_slo_ms and gen_tpot_slo_pct"
            )
        if self.budget_s is not None and not 0 < self.budget_s < 3600:
            raise ValueError(
                f"gen_tpot_slo_ms: must be in (0, 3.6e6) ms, got {self.budget_s * 1e3:g}"
            )
        if self.over_alone_pct is not None and not 0 <= self.over_alone_pct <= 1000:
            raise ValueError(f"gen_tpot_slo_pct: must be in [0, 1000], got {self.over_alone_pct:g}")
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
        if not 0 < self.first_pause_s <= self.max_pause_s:
            raise ValueError("first_pause_s: must be positive and at most max_pause_s")


@dataclass
class GuardState:
    """What /metrics shows of the guard."""

    budget_s: float | None
    measured_s: float = 0.0
    gen_steps: int = 0
    allowance: Allowance = field(default_factory=lambda: Allowance(1))
    phase: str = "waiting"  # waiting (for a gen figure) | calibrating | guarding
    cuts: int = 0
    polls: int = 0
    poll_errors: int = 0
    baseline_s: float | None = None


class SloGuard:
    """AIMD controller: `update(sample, now)` -> the Allowance to apply. Pure: time comes in
    as `now` (seconds, any monotonic origin), so scripted inputs test it exactly."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.tokens = cfg.max_tokens
        self.pause_s = 0.0
        self.last_cut = -float("inf")
        self.calibration_start: float | None = None
        self._calibration: list[float] = []
        self.state = GuardState(
            budget_s=cfg.budget_s,
            allowance=self._allowance(),
            phase="guarding" if cfg.budget_s is not None else "waiting",
        )

    def _allowance(self, hold: bool = False) -> Allowance:
        return Allowance(self.tokens, round(self.pause_s, 6), hold)

    def update(self, sample: GenSample | None, now: float) -> Allowance:
        """One reading (None: the poll failed, the allowance stays) -> the allowance now."""
        st = self.state
        st.polls += 1
        if sample is None:
            st.poll_errors += 1
            return st.allowance
        st.measured_s, st.gen_steps = sample.step_s, sample.steps
        if st.budget_s is None:
            st.allowance = self._calibrate(sample, now)
            return st.allowance
        if sample.steps == 0:
            self._grow()
        elif sample.step_s > st.budget_s:
            if now - self.last_cut >= self.cfg.cooldown_s:
                self._cut()
                self.last_cut = now
                st.cuts += 1
        elif sample.step_s < self.cfg.margin * st.budget_s:
            self._grow()
        st.allowance = self._allowance()
        return st.allowance

    def _calibrate(self, sample: GenSample, now: float) -> Allowance:
        cfg, st = self.cfg, self.state
        if self.calibration_start is None:
            if sample.steps == 0:
                return self._allowance()  # gen idle: nothing to measure, embed runs freely
            self.calibration_start = now
            st.phase = "calibrating"
        since = now - self.calibration_start
        if since >= cfg.settle_s and sample.steps > 0:
            self._calibration.append(sample.step_s)
        if since >= cfg.settle_s + cfg.calibrate_s and self._calibration:
            st.baseline_s = statistics.median(self._calibration)
            st.budget_s = st.baseline_s * (1 + cfg.over_alone_pct / 100)
            st.phase = "guarding"
            log.info(
                "SLO guard: gen alone step %s %.2f ms, budget %.2f ms",
                cfg.stat,
                st.baseline_s * 1e3,
                st.budget_s * 1e3,
            )
            return self._allowance()
        return self._allowance(hold=True)

    def _cut(self) -> None:
        cfg = self.cfg
        if self.tokens > cfg.min_tokens:
            self.tokens = max(cfg.min_tokens, int(self.tokens * cfg.cut))
        else:
            self.pause_s = min(cfg.max_pause_s, max(cfg.first_pause_s, self.pause_s * 2))

    def _grow(self) -> None:
        cfg = self.cfg
        if self.pause_s > 0:
            self.pause_s = (
                self.pause_s * cfg.cut if self.pause_s * cfg.cut >= cfg.first_pause_s else 0.0
            )
            return
        step = cfg.grow_tokens or max(1, cfg.max_tokens // 32)
        self.tokens = min(cfg.max_tokens, self.tokens + step)


_SAMPLE = re.compile(r"^(coserve:engine_step[a-z_0-9]*)(?:\{[^}]*\})?\s+(\S+)\s*$", re.M)


def parse_gen_metrics(text: str, stat: str = "mean") -> GenSample | None:
    """gen's /metrics page -> GenSample of step time `stat`; None when it lacks the step
    figures (an older server, or not coserve's)."""
    values = {m.group(1): m.group(2) for m in _SAMPLE.finditer(text)}
    try:
        return GenSample(
            float(values[STEP_METRIC.format(stat=stat)]), int(float(values[STEP_COUNT_METRIC]))
        )
    except (KeyError, ValueError):
        return None


FAILURE_LOG_EVERY_S = 30.0  # a gen server out of reach is logged at most this often


async def run_guard(
    guard: SloGuard, gen_url: str, apply, interval_s: float, stop: asyncio.Event
) -> None:
    """Poll `gen_url`/metrics every `interval_s` until `stop`; call `apply(allowance)` when
    the allowance changes. A failed poll keeps the allowance (and is counted)."""
    import aiohttp

    url = gen_url.rstrip("/") + "/metrics"
    loop = asyncio.get_running_loop()
    current = None
    timeout = aiohttp.ClientTimeout(total=max(interval_s * 4, 0.5))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        warned_at: float | None = None  # when the last failed read was logged
        while not stop.is_set():
            started = loop.time()
            sample, failure = None, None
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        failure = f"HTTP {resp.status}"
                    else:
                        sample = parse_gen_metrics(await resp.text(), guard.cfg.stat)
                        failure = None if sample is not None else "no step times on the page"
            except (
                TimeoutError,
                aiohttp.ClientError,
                OSError,
                ValueError,
            ) as e:  # ValueError: a page not UTF-8
                failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            allowance = guard.update(sample, loop.time())
            if failure is not None and (
                warned_at is None or started - warned_at >= FAILURE_LOG_EVERY_S
            ):
                log.warning(
                    "SLO guard: cannot read %s (%s); the allowance stays as it is "
                    "(%d failed reads so far)",
                    url,
                    failure,
                    guard.state.poll_errors,
                )
                warned_at = started
            elif failure is None and warned_at is not None:
                log.info("SLO guard: reading %s again", url)
                warned_at = None
            if allowance != current:
                apply(allowance)
                current = allowance
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (loop.time() - started)))
            except TimeoutError:
                pass


def guard_metrics(st: GuardState, throttled_s: float) -> list[tuple[str, str, str, float]]:
    """(name, type, help, value) for /metrics; the budget is 0 until calibration sets it."""
    a = st.allowance
    return [
        (
            "coserve:slo_guard_budget_seconds",
            "gauge",
            "Budget of gen's step time the guard holds (0: not set yet).",
            st.budget_s or 0.0,
        ),
        (
            "coserve:slo_guard_gen_alone_seconds",
            "gauge",
            "Gen's step time measured with embed held (0: not measured).",
            st.baseline_s or 0.0,
        ),
        (
            "coserve:slo_guard_gen_step_seconds",
            "gauge",
            "Gen's step time the guard read last.",
            st.measured_s,
        ),
        (
            "coserve:slo_guard_tokens_per_forward",
            "gauge",
            "Most tokens an embed forward may take now.",
            float(a.tokens_per_forward),
        ),
        (
            "coserve:slo_guard_pause_seconds",
            "gauge",
            "Least pause between embed forwards now.",
            a.pause_s,
        ),
        (
            "coserve:slo_guard_holding",
            "gauge",
            "1 while embed forwards are held (calibrating).",
            float(a.hold),
        ),
        (
            "coserve:slo_guard_cuts_total",
            "counter",
            "Times the guard cut the embed allowance.",
            float(st.cuts),
        ),
        (
            "coserve:slo_guard_polls_total",
            "counter",
            "Readings of gen's /metrics.",
            float(st.polls),
        ),
        (
            "coserve:slo_guard_poll_errors_total",
            "counter",
            "Readings that failed.",
            float(st.poll_errors),
        ),
        (
            "coserve:slo_guard_throttled_seconds_total",
            "counter",
            "Seconds embed work waited on the guard (pause or hold) while requests were pending.",
            throttled_s,
        ),
    ]


def scrape_guard(embed_url: str, timeout_s: float = 5.0) -> dict[str, float | str]:
    """The guard's figures on an embed server's /metrics, by metric name less its
    `coserve:slo_guard_` prefix; {"error": why} when the page cannot be read."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(embed_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return {"error": f"cannot read {embed_url}/metrics: {e}"}
    found = re.findall(r"^coserve:slo_guard_(\w+)(?:\{[^}]*\})?\s+(\S+)\s*$", text, re.M)
    return {name: float(value) for name, value in found}
