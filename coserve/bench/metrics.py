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
"""

from __future__ import annotations

import numpy as np

from coserve.bench.loadgen import BenchResult, EndpointRun

PERCENTILES = (50, 90, 95, 99)


def dist(values) -> dict:
    """mean, p50, p90, p95, p99, std, min, max and n of `values` (ms); None when empty."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        out = {"mean": None, **{f"p{p}": None for p in PERCENTILES},
               "std": None, "min": None, "max": None}
        out["n"] = 0
        return out
    ps = np.percentile(a, PERCENTILES)
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, ps, strict=True)})
    out.update(std=float(a.std()), min=float(a.min()), max=float(a.max()), n=int(a.size))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def _errors(ep: EndpointRun) -> list[dict]:
    return [{"status": status, "message": msg, "count": n}
            for (status, msg), n in ep.errors.most_common()]


def _in_window(result: BenchResult, end_s: float) -> bool:
    t = result.t0 + end_s
    return result.window_start <= t < min(result.window_end, result.stopped_at)


def _gen_summary(result: BenchResult, ep: EndpointRun, window: float) -> dict:
    done = [r for r in ep.records if r["status"] == "ok" and _in_window(result, r["end_s"])]
    failed = sum(1 for r in ep.records
                 if r["status"] == "failed" and _in_window(result, r["end_s"]))
    per_s = (lambda x: x / window) if window > 0 else (lambda x: 0.0)
    out_tok = sum(r["output_tokens"] for r in done)
    return {
        "url": ep.url,
        "model": ep.model,
        "concurrency": ep.concurrency,
        "output_tokens_per_s": round(per_s(ep.tokens_window), 3),
        "requests_per_s": round(per_s(len(done)), 4),
        "completed": len(done),
        "failed": failed,
        "output_tokens_in_window": round(ep.tokens_window, 3),
        "mean_output_tokens": round(out_tok / len(done), 3) if done else None,
        "tpot_ms": dist([r["tpot_ms"] for r in done if r["tpot_ms"] is not None]),
        "ttft_ms": dist([r["ttft_ms"] for r in done]),
        "itl_ms": dist(np.frombuffer(ep.itl_window, dtype=np.float64) * 1e3),
        "e2e_ms": dist([r["e2e_ms"] for r in done]),
        "totals": {"sent": ep.sent, "completed": ep.completed_total,
                   "failed": ep.failed_total, "output_tokens": ep.tokens_total,
                   "usage_mismatch": ep.usage_mismatch},
        "errors": _errors(ep),
    }


def _embed_summary(result: BenchResult, ep: EndpointRun, window: float) -> dict:
    done = [r for r in ep.records if r["status"] == "ok" and _in_window(result, r["end_s"])]
    failed = sum(1 for r in ep.records
                 if r["status"] == "failed" and _in_window(result, r["end_s"]))
    per_s = (lambda x: x / window) if window > 0 else (lambda x: 0.0)
    return {
        "url": ep.url,
        "model": ep.model,
        "concurrency": ep.concurrency,
        "batch": result.config.embed_batch,
        "encoding": result.config.embed_encoding,
        "dim": ep.dim,
        "sequences_per_s": round(per_s(ep.tokens_window), 3),
        "requests_per_s": round(per_s(len(done)), 4),
        "completed": len(done),
        "failed": failed,
        "sequences_in_window": int(ep.tokens_window),
        "latency_ms": dist([r["latency_ms"] for r in done]),
        "totals": {"sent": ep.sent, "completed": ep.completed_total,
                   "failed": ep.failed_total, "sequences": ep.tokens_total},
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
        "gen": _gen_summary(result, result.gen, window) if result.gen else None,
        "embed": _embed_summary(result, result.embed, window) if result.embed else None,
        "config": cfg.to_dict(),
    }
