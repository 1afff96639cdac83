"""Per-request records -> the summary DESIGN.md's contract describes.

Definitions (those of `vllm bench serve`):
- TTFT: arrival of the first token-bearing chunk - send time.
- TPOT per request: (e2e - TTFT) / (output tokens - 1), e2e ending at the last
  token-bearing chunk; requests with one output token have none.
- ITL: gaps between consecutive token-bearing chunks of a request.

Window accounting: the window is [warmup, warmup + duration) after t0.
- Throughput counts what arrived inside it: gen tokens by each chunk's arrival time, embed
  sequences by their response's arrival time, divided by the window's length. Requests
  that straddle an edge contribute exactly their part inside, so they bias nothing.
- completed / failed / requests_per_s, and the TTFT, TPOT, e2e and embed latency
  distributions, take the requests that *ended* inside the window.
- ITL takes every gap whose later chunk arrived inside the window.
- A request the server failed counts no token and no gap (workers.py says which are
  failures); one the bench cut at the window's end counts what arrived inside.

Rate and goodput (open loop; see docs/bench.md):
- achieved_rate_rps = requests *sent* inside the window / window; offered_rate_rps = the
  rate asked. kept_up is False when fewer than 95 % of the arrivals the schedule put in the
  window were sent before the run stopped, an arrival found the in-flight cap full, or the
  requests in flight grew over the window by more than 5 % of those scheduled in it (and by
  more than chance allows: 3 standard deviations of the difference of two Poisson counts),
  that is, the server answered slower than they arrived even though the cap was not reached
  (less the growth of a queue still filling to rate x lifetime when requests outlive the
  warm-up).
  send_late_ms: how long after its scheduled time each of those requests left.
- Either mode: kept_up is False, and the warning says so, when requests were sent but
  nothing (no token, no answer, no failure) came back inside the window, or for too long
  with requests in flight (a frozen server: workers.py), or no request completed inside it.
- Goodput takes the requests that ended inside the window and met every bound given
  (vllm bench serve's definition): req/s, and their output tokens / window; embed:
  their sequences / window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from coserve.bench.records import BenchResult, EndpointRun, RequestRecord

KEPT_UP = 0.95  # achieved / scheduled below this: the sender or the server fell behind

PERCENTILES = (50, 90, 95, 99)


def dist(values) -> dict:
    """mean, p50, p90, p95, p99, std, min, max and n of `values` (ms); None when empty."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        out = {
            "mean": None,
            **{f"p{p}": None for p in PERCENTILES},
            "std": None,
            "min": None,
            "max": None,
        }
        out["n"] = 0
        return out
    ps = np.percentile(a, PERCENTILES)
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, ps, strict=True)})
    out.update(std=float(a.std()), min=float(a.min()), max=float(a.max()), n=int(a.size))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def _errors(ep: EndpointRun) -> list[dict]:
    return [
        {"status": status, "message": msg, "count": n}
        for (status, msg), n in ep.errors.most_common()
    ]


def _in_window(result: BenchResult, end_s: float | None) -> bool:
    if end_s is None:
        return False
    t = result.t0 + end_s
    return result.window_start <= t < min(result.window_end, result.stopped_at)


def _ended(result: BenchResult, ep: EndpointRun, status: str) -> list[RequestRecord]:
    return [r for r in ep.records if r.status == status and _in_window(result, r.end_s)]


def _per_s(window: float):
    return (lambda x: x / window) if window > 0 else (lambda x: 0.0)


def _send_late(result: BenchResult, ep: EndpointRun) -> list[float]:
    """ms from scheduled to sent, of the open-loop requests scheduled inside the window."""
    lo, hi = result.window_start - result.t0, result.window_end - result.t0
    return [
        (r.start_s - r.scheduled_s) * 1e3
        for r in ep.records
        if r.scheduled_s is not None and lo <= r.scheduled_s < hi
    ]


def nothing_answered(result: BenchResult, ep: EndpointRun) -> str | None:
    """Why `ep` measured nothing: requests were sent but no token, answer or failure came
    inside the window (a frozen server); None when something did, or nothing was sent."""
    if result.measured_s <= 0 or ep.sent == 0 or ep.tokens_window > 0:
        return None
    if any(r.status != "cancelled" and _in_window(result, r.end_s) for r in ep.records):
        return None
    waiting = sum(r.status == "cancelled" for r in ep.records)
    return (
        f"nothing was answered by the {ep.kind} server at {ep.url} in the "
        f"{result.measured_s:g} s window ({ep.sent} requests sent, {waiting} still "
        f"unanswered at its end); if one answer can take longer than that (a busy CPU, a "
        f"profiler on), a longer measurement window will measure it"
    )


def _in_flight(ep: EndpointRun, t: float) -> int:
    """Requests of `ep` sent at or before `t` (s after t0) and not ended by then; one the
    bench cut when it stopped was still waiting, whatever time its cut was stamped with."""
    return sum(
        r.start_s <= t and (r.end_s is None or r.end_s > t or r.status == "cancelled")
        for r in ep.records
    )


def _backlog_growth(result: BenchResult, ep: EndpointRun, sched: int) -> str | None:
    """Why the open loop fell behind with the cap never reached: the requests in flight grew
    over the window by more than a queue that keeps up can grow, beyond 5 % of the window's
    schedule and beyond chance (its in-flight count is about Poisson, so the difference of
    two counts has a standard deviation of sqrt(2 x the count)); None when it did not.

    A queue that keeps up still grows while it fills to its steady size (Little's law: rate x
    lifetime), which takes one lifetime from the load's start: with requests that outlive the
    warm-up, the window sees some of that filling. It is allowed for with the p10 lifetime of
    the requests that ended in the window (a queue falling behind answers its early requests
    soonest, so a low quantile does not grant it its own growth)."""
    opened = result.window_start - result.t0
    closed = min(result.window_end, result.stopped_at) - result.t0
    start, end = _in_flight(ep, opened), _in_flight(ep, closed)
    lived = [r.end_s - r.start_s for r in _ended(result, ep, "ok")]
    life = float(np.percentile(lived, 10)) if lived else 0.0
    filling = (ep.rate or 0.0) * (min(closed, life) - min(opened, life))
    grew = end - start - filling
    if grew <= (1 - KEPT_UP) * sched or grew <= 3 * math.sqrt(2 * max(start, 1)):
        return None
    return (
        f"the requests in flight grew from {start} to {end} over the window: the server "
        f"answered slower than they arrived"
    )


def refused_all(ep: EndpointRun) -> str | None:
    """Why nothing was measured when the server answered every request of `ep` with an error
    (a wrong model name, a prompt over its limit): the commonest error and its count; None
    when some request succeeded or none failed."""
    if not ep.errors or any(r.status == "ok" for r in ep.records):
        return None
    # counted by status: messages that quote each request's own figures differ one by one
    by_status: dict = {}
    for (status, msg), n in ep.errors.most_common():
        count, first, kinds = by_status.get(status, (0, msg, 0))
        by_status[status] = (count + n, first, kinds + 1)
    status, (n, msg, kinds) = max(by_status.items(), key=lambda kv: kv[1][0])
    example = "e.g. " if kinds > 1 else ""
    return (
        f"every {ep.kind} request failed, so nothing was measured: {n} x {status} "
        f"{example}{str(msg):.200} (of {sum(ep.errors.values())} failures)"
    )


def _rate(result: BenchResult, ep: EndpointRun, window: float) -> dict:
    """mode, offered and achieved rate, kept_up and its warning (the JSON contract)."""
    achieved = ep.sent_window / window if window > 0 else 0.0
    out = {
        "mode": "closed" if ep.rate is None else "rate",
        "offered_rate_rps": ep.rate,
        "achieved_rate_rps": round(achieved, 4),
        "kept_up": True,
        "warning": None,
    }
    # a stall that ended the run is its reason; the empty window only follows from it
    silent = ep.stalled or nothing_answered(result, ep)
    if silent is None and result.measured_s > 0 and ep.sent and not _ended(result, ep, "ok"):
        silent = refused_all(ep) or (
            f"no {ep.kind} request completed inside the window ({ep.sent} sent): its "
            f"latencies are empty; a window shorter than one request, or a stalled server"
        )
    if silent is not None:
        out["kept_up"], out["warning"] = False, silent
    if ep.rate is None:
        return out
    late_ms = _send_late(result, ep)
    problems = []
    sched = ep.scheduled_window
    out["scheduled_in_window"] = sched
    out["cap_waits"] = ep.cap_waits
    out["cap_wait_s"] = round(ep.cap_wait_s, 3)
    out["send_late_ms"] = dist(late_ms)
    if sched and ep.sent_of_scheduled < KEPT_UP * sched:
        # at the cap, what goes out in the window can be arrivals queued before it
        backlog = f", {ep.sent_backlog} of them arrivals from before it" if ep.sent_backlog else ""
        problems.append(
            f"sent {ep.sent_of_scheduled} of the {sched} requests scheduled in the window "
            f"({ep.sent_window} sent in it{backlog}: {achieved:.4g} of {ep.rate:g} req/s "
            f"offered)"
        )
    grew = _backlog_growth(result, ep, sched)
    if grew is not None:
        problems.append(grew)
    held = []
    if ep.cap_waits:
        held.append(
            f"{ep.cap_waits} arrivals found all {ep.concurrency} slots in flight and waited"
        )
    if ep.cap_wait_s > 0:
        held.append(
            f"the sender was held at the cap of {ep.concurrency} in flight for "
            f"{ep.cap_wait_s:.3g} s of the {result.measured_s:.3g} s window"
        )
    if held:
        problems.append(
            "; ".join(held) + f" (raise --{ep.kind}-concurrency, or the server is saturated)"
        )
    if problems:
        out["kept_up"] = False
        warning = f"{ep.kind} did not keep up with the offered rate: " + "; ".join(problems)
        out["warning"] = "; ".join(filter(None, (silent, warning)))
    return out


def _gen_goodput(cfg, done: list[RequestRecord], window: float) -> dict | None:
    bounds = cfg.goodput_bounds
    if not bounds:
        return None
    good = [
        r
        for r in done
        if r.ttft_ms <= bounds.get("ttft", float("inf"))
        and (r.tpot_ms or 0.0) <= bounds.get("tpot", float("inf"))
        and r.e2e_ms <= bounds.get("e2el", float("inf"))
    ]
    per_s = _per_s(window)
    return {
        "requests_per_s": round(per_s(len(good)), 4),
        "output_tokens_per_s": round(per_s(sum(r.output_tokens for r in good)), 3),
        "requests": len(good),
        "bounds_ms": bounds,
    }


def _embed_goodput(cfg, done: list[RequestRecord], window: float) -> dict | None:
    if cfg.embed_slo_ms is None:
        return None
    good = [r for r in done if r.latency_ms <= cfg.embed_slo_ms]
    return {
        "sequences_per_s": round(_per_s(window)(sum(r.sequences for r in good)), 3),
        "requests": len(good),
        "slo_ms": cfg.embed_slo_ms,
    }


def _gen_summary(result: BenchResult, ep: EndpointRun, window: float) -> dict:
    done = _ended(result, ep, "ok")
    failed = len(_ended(result, ep, "failed"))
    per_s = _per_s(window)
    out_tok = sum(r.output_tokens for r in done)
    return {
        "url": ep.url,
        "model": ep.model,
        "concurrency": ep.concurrency,
        "endpoint": result.config.gen_endpoint,
        **_rate(result, ep, window),
        "output_tokens_per_s": round(per_s(ep.tokens_window), 3),
        "requests_per_s": round(per_s(len(done)), 4),
        "completed": len(done),
        "failed": failed,
        "output_tokens_in_window": round(ep.tokens_window, 3),
        "mean_output_tokens": round(out_tok / len(done), 3) if done else None,
        "tpot_ms": dist([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "ttft_ms": dist([r.ttft_ms for r in done]),
        "itl_ms": dist(np.frombuffer(ep.itl_window, dtype=np.float64) * 1e3),
        "e2e_ms": dist([r.e2e_ms for r in done]),
        "goodput": _gen_goodput(result.config, done, window),
        "totals": {
            "sent": ep.sent,
            "completed": ep.completed_total,
            "failed": ep.failed_total,
            "output_tokens": ep.tokens_total,
            "usage_mismatch": ep.usage_mismatch,
        },
        "errors": _errors(ep),
    }


def _embed_summary(result: BenchResult, ep: EndpointRun, window: float) -> dict:
    done = _ended(result, ep, "ok")
    failed = len(_ended(result, ep, "failed"))
    per_s = _per_s(window)
    mismatch = None
    if ep.encoding_mismatch:
        mismatch = {
            "asked": result.config.embed_encoding,
            "answered": ep.encoding_answered,
            "answers": ep.encoding_mismatch,
        }
    return {
        "url": ep.url,
        "model": ep.model,
        "concurrency": ep.concurrency,
        **_rate(result, ep, window),
        "batch": result.config.embed_batch,
        "encoding": result.config.embed_encoding,
        "dim": ep.dim,
        "encoding_mismatch": mismatch,
        "sequences_per_s": round(per_s(ep.tokens_window), 3),
        "requests_per_s": round(per_s(len(done)), 4),
        "completed": len(done),
        "failed": failed,
        "sequences_in_window": int(ep.tokens_window),
        "latency_ms": dist([r.latency_ms for r in done]),
        "goodput": _embed_goodput(result.config, done, window),
        "totals": {
            "sent": ep.sent,
            "completed": ep.completed_total,
            "failed": ep.failed_total,
            "sequences": ep.tokens_total,
        },
        "errors": _errors(ep),
    }


def summarize(result: BenchResult) -> dict:
    cfg = result.config
    window = result.measured_s
    if result.stopped_at < result.window_start:
        phase = "warmup"
    elif result.cut_short:
        phase = "measure"
    else:
        phase = "done"
    return {
        "warmup_s": cfg.warmup_s,
        "duration_s": round(window, 6) if result.cut_short else cfg.duration_s,
        "planned_duration_s": cfg.duration_s,
        "cut_short": result.cut_short,
        "stopped_in": phase,
        "started_at": result.started_at,
        "aborted": result.aborted,
        "load": {
            "arrival": cfg.arrival,
            "burstiness": cfg.burstiness,
            "gen_rate": cfg.gen_rate,
            "embed_rate": cfg.embed_rate,
            "slo": {
                "ttft_ms": cfg.goodput_ttft_ms,
                "tpot_ms": cfg.goodput_tpot_ms,
                "e2el_ms": cfg.goodput_e2el_ms,
                "embed_ms": cfg.embed_slo_ms,
            },
        },
        "gen": _gen_summary(result, result.gen, window) if result.gen else None,
        "embed": _embed_summary(result, result.embed, window) if result.embed else None,
        "config": cfg.to_dict(),
    }
