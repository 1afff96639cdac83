"""`coserve bench`: closed-loop load against a generative and an embedding endpoint at once.

    coserve bench --gen-url http://127.0.0.1:8000 --embed-url http://127.0.0.1:8001 \\
        --gen-concurrency 512 --input-len 30 --output-len 512 \\
        --embed-concurrency 64 --embed-batch 8 --embed-input-len 32 \\
        --warmup 30 --duration 60 --seed 0 --out runs/bench.json

Writes FILE.json (the summary: DESIGN.md's contract and more) and FILE.records.jsonl (one
line per request). Ctrl-C (or SIGTERM) stops the load and still writes what was measured,
marked `"cut_short": true`; a second Ctrl-C gives up at once.
"""

from __future__ import annotations

import argparse
import sys

from coserve.bench.embed_answer import ENCODINGS

_D = dict(gen_concurrency=512, input_len=30, output_len=512, embed_concurrency=64,
          embed_batch=8, embed_input_len=32, warmup_s=30.0, duration_s=60.0, seed=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    g = p.add_argument_group("endpoints (give one or both)")
    g.add_argument("--gen-url", help="OpenAI-compatible server for /v1/completions")
    g.add_argument("--embed-url", help="OpenAI-compatible server for /v1/embeddings")
    g.add_argument("--gen-model", help="model name (default: first of the server's /v1/models)")
    g.add_argument("--embed-model",
                   help="model name (default: first of the server's /v1/models)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    w = p.add_argument_group("workload")
    w.add_argument("--gen-concurrency", type=int, default=_D["gen_concurrency"],
                   help="gen requests kept in flight (closed loop)")
    w.add_argument("--input-len", type=int, default=_D["input_len"],
                   help="prompt length in tokens (random token ids)")
    w.add_argument("--output-len", type=int, default=_D["output_len"],
                   help="max_tokens of each gen request (sent with ignore_eos)")
    w.add_argument("--embed-concurrency", type=int, default=_D["embed_concurrency"],
                   help="embed requests kept in flight (closed loop)")
    w.add_argument("--embed-batch", type=int, default=_D["embed_batch"],
                   help="inputs per embed request")
    w.add_argument("--embed-input-len", type=int, default=_D["embed_input_len"],
                   help="tokens (or words, with --embed-text) per embed input")
    w.add_argument("--embed-text", action="store_true",
                   help="send embed inputs as text (random common words), not token ids")
    w.add_argument("--embed-encoding", choices=ENCODINGS, default="base64",
                   help="encoding_format asked of /v1/embeddings (base64: what the openai "
                        "client asks for by default)")
    w.add_argument("--token-id-range", default="10:256", metavar="LO:HI",
                   help="random prompt token ids are drawn from [LO, HI)")
    w.add_argument("--seed", type=int, default=_D["seed"], help="workload seed")
    t = p.add_argument_group("timing and output")
    t.add_argument("--warmup", type=float, default=_D["warmup_s"],
                   help="seconds of load before the window")
    t.add_argument("--duration", type=float, default=_D["duration_s"],
                   help="seconds of the measurement window")
    t.add_argument("--ramp", type=float, default=None,
                   help="seconds over which the first requests are spread "
                        "(default min(1, warm-up/4))")
    t.add_argument("--out", metavar="FILE.json",
                   help="write the summary here and the per-request records to "
                        "FILE.records.jsonl")
    t.add_argument("--record-chunks", action="store_true",
                   help="keep each chunk's arrival time in the records (large)")
    t.add_argument("--json", action="store_true", help="print the summary JSON on stdout")
    t.add_argument("--quiet", action="store_true", help="no live progress, no summary table")
    t.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (auto: uvloop when installed)")


def _config(args):
    from coserve.bench.config import ConfigError, LoadConfig

    try:
        lo, hi = (int(x) for x in args.token_id_range.split(":"))
    except ValueError:
        raise SystemExit(f"coserve bench: --token-id-range: expected LO:HI, got "
                         f"{args.token_id_range!r}") from None
    cfg = LoadConfig(
        gen_url=args.gen_url, embed_url=args.embed_url, gen_model=args.gen_model,
        embed_model=args.embed_model, gen_concurrency=args.gen_concurrency,
        input_len=args.input_len, output_len=args.output_len,
        embed_concurrency=args.embed_concurrency, embed_batch=args.embed_batch,
        embed_input_len=args.embed_input_len, embed_text=args.embed_text,
        embed_encoding=args.embed_encoding,
        warmup_s=args.warmup, duration_s=args.duration, seed=args.seed, api_key=args.api_key,
        token_id_low=lo, token_id_high=hi, ramp_s=args.ramp, record_chunks=args.record_chunks,
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        names = {"warmup_s": "--warmup", "duration_s": "--duration", "ramp_s": "--ramp",
                 "token_id_low": "--token-id-range"}
        flag = names.get(e.field, "--" + e.field.replace("_", "-"))
        raise SystemExit(f"coserve bench: {flag}: {str(e).split(': ', 1)[1]}") from None


def _fmt_dist(d: dict) -> str:
    if not d or d.get("n", 0) == 0:
        return "-"
    return "  ".join(f"{k} {d[k]:.2f}" for k in ("mean", "p50", "p95", "p99"))


def format_summary(s: dict) -> str:
    lines = []
    state = f" (CUT SHORT: stopped during the {s['stopped_in']})" if s["cut_short"] else ""
    lines.append(f"window {s['duration_s']:g} s after {s['warmup_s']:g} s warm-up{state}")
    g = s.get("gen")
    if g:
        lines.append(f"gen    {g['url']}  model {g['model']}  C={g['concurrency']}")
        lines.append(f"  {g['output_tokens_per_s']:,.1f} output tok/s  "
                     f"{g['requests_per_s']:.2f} req/s  completed {g['completed']}  "
                     f"failed {g['failed']}")
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            lines.append(f"  {name[:-3].upper():5s} ms  {_fmt_dist(g[name])}")
    e = s.get("embed")
    if e:
        lines.append(f"embed  {e['url']}  model {e['model']}  C={e['concurrency']} "
                     f"batch {e['batch']}  {e['encoding']}  dim {e['dim']}")
        lines.append(f"  {e['sequences_per_s']:,.1f} seq/s  {e['requests_per_s']:.2f} req/s  "
                     f"completed {e['completed']}  failed {e['failed']}")
        lines.append(f"  LAT   ms  {_fmt_dist(e['latency_ms'])}")
    for name in ("gen", "embed"):
        ep = s.get(name)
        for err in (ep or {}).get("errors", [])[:5]:
            status = err["status"] if err["status"] is not None else "no answer"
            lines.append(f"  {name} error x{err['count']} [{status}] {err['message']}")
    return "\n".join(lines)


def run(args) -> int:
    import asyncio
    import json
    import signal

    from coserve.bench.loadgen import BenchError, BenchStopped, run_load, run_sync, write_result
    from coserve.bench.progress import LiveProgress

    cfg = _config(args)
    err = sys.stderr
    parts = []
    if cfg.gen_url:
        parts.append(f"gen {cfg.gen_url} C={cfg.gen_concurrency} "
                     f"({cfg.input_len} in / {cfg.output_len} out)")
    if cfg.embed_url:
        parts.append(f"embed {cfg.embed_url} C={cfg.embed_concurrency} "
                     f"(batch {cfg.embed_batch} x {cfg.embed_input_len}, {cfg.embed_encoding})")
    print(f"coserve bench: {'; '.join(parts)}; warm-up {cfg.warmup_s:g} s, "
          f"window {cfg.duration_s:g} s", file=err, flush=True)

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        me = asyncio.current_task()

        def on_signal(signame):
            if stop.is_set():
                print(f"\ncoserve bench: {signame} again, giving up", file=err, flush=True)
                me.cancel()
                return
            print(f"\ncoserve bench: {signame}, stopping; writing what was measured "
                  f"({signame} again to give up)", file=err, flush=True)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            with LiveProgress(cfg.warmup_s, cfg.duration_s,
                              enabled=False if args.quiet else None) as lp:
                return await run_load(cfg, on_progress=lp.update if lp.enabled else None,
                                      stop=stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        result = run_sync(main(), args.loop)
    except BenchError as e:
        print(f"coserve bench: {e}", file=err, flush=True)
        return 130 if isinstance(e, BenchStopped) else 1
    except asyncio.CancelledError:
        return 130
    summary = result.summary()
    if args.out:
        path, rec_path = write_result(result, args.out)
        summary["records_file"] = rec_path
    if not args.quiet:
        print(format_summary(summary), file=err, flush=True)
    if args.out:
        print(f"coserve bench: wrote {path} and {rec_path}", file=err, flush=True)
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    return 130 if result.cut_short else 0
