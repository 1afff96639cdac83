"""The summary of a load run as the console shows it (`coserve bench` without --quiet)."""

from __future__ import annotations

__all__ = ["format_summary"]


def _fmt_dist(d: dict) -> str:
    if not d or d.get("n", 0) == 0:
        return "-"
    return "  ".join(f"{k} {d[k]:.2f}" for k in ("mean", "p50", "p95", "p99"))


def _fmt_load(ep: dict) -> str:
    if ep["mode"] == "closed":
        return f"C={ep['concurrency']}"
    return (
        f"rate {ep['offered_rate_rps']:g}/s offered, {ep['achieved_rate_rps']:.4g}/s sent "
        f"(cap {ep['concurrency']})"
    )


def _fmt_bounds(b: dict) -> str:
    return ", ".join(f"{k} {v:g} ms" for k, v in b.items())


def format_summary(s: dict) -> str:
    lines = []
    state = f" (CUT SHORT: stopped during the {s['stopped_in']})" if s["cut_short"] else ""
    if s.get("aborted"):
        state = f" (ABORTED: {s['aborted']})"
    lines.append(f"window {s['duration_s']:g} s after {s['warmup_s']:g} s warm-up{state}")
    g = s.get("gen")
    if g:
        lines.append(f"gen    {g['url']}  model {g['model']}  {g['endpoint']}  {_fmt_load(g)}")
        lines.append(
            f"  {g['output_tokens_per_s']:,.1f} output tok/s  "
            f"{g['requests_per_s']:.2f} req/s  completed {g['completed']}  "
            f"failed {g['failed']}"
        )
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            lines.append(f"  {name[:-3].upper():5s} ms  {_fmt_dist(g[name])}")
        if g["goodput"]:
            lines.append(
                f"  goodput {g['goodput']['requests_per_s']:.2f} req/s  "
                f"{g['goodput']['output_tokens_per_s']:,.1f} tok/s  "
                f"(within {_fmt_bounds(g['goodput']['bounds_ms'])})"
            )
    e = s.get("embed")
    if e:
        lines.append(
            f"embed  {e['url']}  model {e['model']}  {_fmt_load(e)}  "
            f"batch {e['batch']}  {e['encoding']}"
            # no answer came back to read the dimension from: "dim None" read as a bug
            + (f"  dim {e['dim']}" if e["dim"] is not None else "")
        )
        lines.append(
            f"  {e['sequences_per_s']:,.1f} seq/s  {e['requests_per_s']:.2f} req/s  "
            f"completed {e['completed']}  failed {e['failed']}"
        )
        lines.append(f"  LAT   ms  {_fmt_dist(e['latency_ms'])}")
        if e["goodput"]:
            lines.append(
                f"  goodput {e['goodput']['sequences_per_s']:,.1f} seq/s  "
                f"(within {e['goodput']['slo_ms']:g} ms)"
            )
        m = e["encoding_mismatch"]
        if m:
            lines.append(
                f"  NOTE: asked for {m['asked']} embeddings, {m['answers']} answers "
                f"came as {m['answered']}; measured all the same"
            )
    for name in ("gen", "embed"):
        ep = s.get(name)
        if ep and ep["warning"]:
            lines.append(f"  WARNING: {ep['warning']}")
        for err in (ep or {}).get("errors", [])[:5]:
            status = err["status"] if err["status"] is not None else "no answer"
            lines.append(f"  {name} error x{err['count']} [{status}] {err['message']}")
    return "\n".join(lines)
