"""The SLO guard's input and output: reading gen's step times off its /metrics (and the loop
that feeds them to `SloGuard`), the guard's own /metrics rows, and reading those back from an
embed server for a run's results."""

from __future__ import annotations

import asyncio
import logging
import math
import re

from coserve.engine.types import StepWork
from coserve.server.metrics import ENGINE_METRIC
from coserve.server.slo_guard import GenSample, GuardState, SloGuard

log = logging.getLogger("coserve.server")

STEP_COUNT_METRIC = ENGINE_METRIC["step_window_steps"]
# the mean work of the window's steps, by StepWork field
WORK_METRICS = {
    "seqs": ENGINE_METRIC["step_batch_mean"],
    "prefill_tokens": ENGINE_METRIC["step_prefill_tokens_mean"],
    "kv_tokens": ENGINE_METRIC["step_kv_tokens_mean"],
}

_SAMPLE = re.compile(r"^(coserve:engine_step[a-z_0-9]*)(?:\{[^}]*\})?\s+(\S+)\s*$", re.M)


class BadGenPage(ValueError):
    """gen's /metrics carries a step figure that is no reading: not a number, not finite,
    negative, or a step count that is not whole."""


def parse_gen_metrics(text: str, stat: str = "mean") -> GenSample | None:
    """gen's /metrics page -> GenSample of step time `stat`; None when it lacks the step
    figures (an older server, or not coserve's). The sample's work is None unless the page
    carries every one of WORK_METRICS.

    Raises BadGenPage naming the metric when a figure is there but is no reading (a gen
    server must never hand the guard an inf, a NaN or a negative time for a baseline)."""
    values = {m.group(1): m.group(2) for m in _SAMPLE.finditer(text)}
    step_name, count_name = ENGINE_METRIC[f"step_time_{stat}_s"], STEP_COUNT_METRIC
    if step_name not in values or count_name not in values:
        return None
    step_s, steps = _figure(step_name, values[step_name]), _figure(count_name, values[count_name])
    if not steps.is_integer():
        raise BadGenPage(f"{count_name} is {values[count_name]}, not a whole count")
    work = None
    if all(name in values for name in WORK_METRICS.values()):
        work = StepWork(**{f: _figure(n, values[n]) for f, n in WORK_METRICS.items()})
    return GenSample(step_s, int(steps), work)


def _figure(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadGenPage(f"{name} is {raw!r}, not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BadGenPage(f"{name} is {raw}, not a finite figure >= 0")
    return value


FAILURE_LOG_EVERY_S = 30.0  # a gen server out of reach is logged at most this often


async def run_guard(
    guard: SloGuard, gen_url: str, apply, interval_s: float, stop: asyncio.Event
) -> None:
    """Poll `gen_url`/metrics every `interval_s` until `stop`; call `apply(allowance)` when
    the allowance changes. A failed poll keeps the allowance (and is counted); each kind of
    failure is logged when it first shows, and again at most every FAILURE_LOG_EVERY_S."""
    import aiohttp

    url = gen_url.rstrip("/") + "/metrics"
    loop = asyncio.get_running_loop()
    current = None
    timeout = aiohttp.ClientTimeout(total=max(interval_s * 4, 0.5))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # When each kind of failure was last logged: pages that fail by turns in different
        # ways (inf, then NaN, ...) log each way once, not every poll.
        warned: dict[str, float] = {}
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
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            # A page that does not parse (BadGenPage, one not UTF-8, or any other slip of a
            # figure) is a failed read: the loop must outlive every page gen can serve.
            except (ValueError, ArithmeticError, LookupError) as e:
                sample, failure = None, f"{type(e).__name__}: {e}"
            allowance = guard.update(sample, loop.time())
            if failure is not None and (
                failure not in warned or started - warned[failure] >= FAILURE_LOG_EVERY_S
            ):
                log.warning(
                    "SLO guard: cannot read %s (%s); the allowance stays as it is "
                    "(%d failed reads so far)",
                    url,
                    failure,
                    guard.state.poll_errors,
                )
                warned[failure] = started
            elif failure is None and warned:
                log.info("SLO guard: reading %s again", url)
                warned.clear()
            if allowance != current:
                apply(allowance)
                current = allowance
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (loop.time() - started)))
            except TimeoutError:
                pass


def guard_metrics(st: GuardState, throttled_s: float) -> list[tuple[str, str, str, float]]:
    """(name, type, help, value) for /metrics; the budget is 0 until the first probe sets it.
    The fit's coefficients are 0 while the baseline is the probes' median."""
    a = st.allowance
    fit = st.fit if st.fit is not None and st.fit.fitted else None
    per_kv, per_prefill, per_seq = fit.per_feature_s if fit else (0.0, 0.0, 0.0)
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
            "Gen alone's step time for the work gen's steps do now: the fit of the last probes "
            "(or their median) at gen's current work (0: no probe yet).",
            st.baseline_s or 0.0,
        ),
        (
            "coserve:slo_guard_fit",
            "gauge",
            "1 while the baseline is a fit of the probes to gen's work, 0 while their median.",
            float(fit is not None),
        ),
        (
            "coserve:slo_guard_fit_intercept_seconds",
            "gauge",
            "The fit's constant term: gen alone's step time at no work.",
            fit.intercept_s if fit else 0.0,
        ),
        (
            "coserve:slo_guard_fit_seconds_per_kv_token",
            "gauge",
            "The fit's step time per KV token read.",
            per_kv,
        ),
        (
            "coserve:slo_guard_fit_seconds_per_prefill_token",
            "gauge",
            "The fit's step time per prompt token scheduled.",
            per_prefill,
        ),
        (
            "coserve:slo_guard_fit_seconds_per_seq",
            "gauge",
            "The fit's step time per sequence in the batch.",
            per_seq,
        ),
        (
            "coserve:slo_guard_last_probe_seconds",
            "gauge",
            "Gen's step time the newest probe measured with embed held (0: none yet).",
            st.last_probe_s or 0.0,
        ),
        (
            "coserve:slo_guard_probes_total",
            "counter",
            "Probes of gen alone that gave a figure.",
            float(st.probes),
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
            "1 while embed forwards are held (a probe of gen alone).",
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


def scrape_guard(embed_url: str, timeout_s: float = 5.0) -> dict[str, float | int | str]:
    """The guard's figures on an embed server's /metrics, by metric name less its
    `coserve:slo_guard_` prefix; {"error": why} when the page cannot be read."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(embed_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError, http.client.HTTPException, UnicodeDecodeError) as e:
        return {"error": f"cannot read {embed_url}/metrics: {e!r}"}
    found = re.findall(r"^coserve:slo_guard_(\w+)(?:\{[^}]*\})?\s+(\S+)\s*$", text, re.M)
    out: dict[str, float | int | str] = {}
    for name, value in found:
        try:
            v = float(value)
        except ValueError:  # not a number: left out, as a figure the page does not have
            continue
        # counts of events (probes, cuts, polls) as integers, not "6.0"
        count = name.endswith("_total") and "seconds" not in name and v.is_integer()
        out[name] = int(v) if count else v
    return out
