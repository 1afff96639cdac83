"""`coserve bench`: load against a generative and an embedding endpoint at once, each
closed-loop (C in flight) or open-loop (a request rate, C the cap in flight).

    coserve bench --gen-url http://127.0.0.1:8000 --embed-url http://127.0.0.1:8001 \\
        --gen-concurrency 512 --input-len 30 --output-len 512 \\
        --embed-rate 61 --embed-concurrency 64 --embed-batch 8 --embed-input-len 32 \\
        --goodput ttft:1000 tpot:50 --embed-slo 200 \\
        --warmup 30 --duration 60 --seed 0 --out runs/bench.json

Writes FILE.json (the summary: DESIGN.md's contract and more) and FILE.records.jsonl (one
line per request). Ctrl-C (or SIGTERM) stops the load and still writes what was measured,
marked `"cut_short": true`; a second Ctrl-C gives up at once. An endpoint that stops
answering ends the run with its reason (written as `"aborted"`) and exit status 1; so does
one whose every request failed (named with its commonest error).
"""

from __future__ import annotations

import argparse
import sys

from coserve.bench.arrivals import ARRIVALS, MAX_BURSTINESS, MAX_RATE, MIN_BURSTINESS
from coserve.bench.config import (
    GEN_ENDPOINTS,
    MAX_LEN,
    MAX_SECONDS,
    WATCH_S,
    ConfigError,
    LoadConfig,
)
from coserve.bench.embed_answer import ENCODINGS
from coserve.bench.output import check_out
from coserve.text_flags import api_key, nonempty

_GOODPUT = {"ttft": "goodput_ttft_ms", "tpot": "goodput_tpot_ms", "e2el": "goodput_e2el_ms"}

_D = LoadConfig()  # the defaults: declared once, in LoadConfig


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for flags without one (None, False) or whose help says it."""

    def _get_help_string(self, action):
        # `is`, not `in (None, False)`: 0 == False, and --seed's default 0 was hidden
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _Help
    g = p.add_argument_group("endpoints (give one or both)")
    g.add_argument(
        "--gen-url",
        help="OpenAI-compatible server for /v1/completions "
        "(or /v1/chat/completions, see --gen-endpoint)",
    )
    g.add_argument(
        "--gen-endpoint",
        choices=GEN_ENDPOINTS,
        default=_D.gen_endpoint,
        help="drive /v1/completions or /v1/chat/completions (streamed either way)",
    )
    g.add_argument("--embed-url", help="OpenAI-compatible server for /v1/embeddings")
    g.add_argument("--gen-model", help="model name (default: first of the server's /v1/models)")
    g.add_argument("--embed-model", help="model name (default: first of the server's /v1/models)")
    g.add_argument("--api-key", type=api_key, help="sent as 'Authorization: Bearer KEY'")
    w = p.add_argument_group("workload")
    w.add_argument(
        "--gen-concurrency",
        type=int,
        default=_D.gen_concurrency,
        help="gen requests kept in flight (closed loop); with --gen-rate, the "
        "cap on requests in flight",
    )
    w.add_argument(
        "--gen-rate",
        type=float,
        default=None,
        metavar="R",
        help=f"send gen requests at R per second, at most {MAX_RATE:,.0f} "
        "(open loop; default: closed)",
    )
    w.add_argument(
        "--input-len",
        type=int,
        default=_D.input_len,
        help=f"prompt length in tokens (random token ids), 1 to {MAX_LEN:,}",
    )
    w.add_argument(
        "--output-len",
        type=int,
        default=_D.output_len,
        help=f"max_tokens of each gen request (sent with ignore_eos), 1 to {MAX_LEN:,}",
    )
    w.add_argument(
        "--embed-concurrency",
        type=int,
        default=_D.embed_concurrency,
        help="embed requests kept in flight (closed loop); with --embed-rate, "
        "the cap on requests in flight",
    )
    w.add_argument(
        "--embed-rate",
        type=float,
        default=None,
        metavar="R",
        help="send embed requests (of --embed-batch inputs) at R per second",
    )
    # default None: a flag given without any rate must be told from one left out
    w.add_argument(
        "--arrival",
        choices=ARRIVALS,
        default=None,
        help=f"arrival process of the rates, seeded by --seed (default {_D.arrival})",
    )
    w.add_argument(
        "--burstiness",
        type=float,
        default=None,
        metavar="K",
        help="gamma shape of poisson gaps: 1 Poisson, <1 burstier, >1 smoother "
        f"(default {_D.burstiness:g}; {MIN_BURSTINESS:g} to {MAX_BURSTINESS:g})",
    )
    w.add_argument(
        "--embed-batch", type=int, default=_D.embed_batch, help="inputs per embed request"
    )
    w.add_argument(
        "--embed-input-len",
        type=int,
        default=_D.embed_input_len,
        help=f"tokens (or words, with --embed-text) per embed input, 1 to {MAX_LEN:,}",
    )
    w.add_argument(
        "--embed-text",
        action="store_true",
        help="send embed inputs as text (random common words), not token ids",
    )
    w.add_argument(
        "--embed-encoding",
        choices=ENCODINGS,
        default=_D.embed_encoding,
        help="encoding_format asked of /v1/embeddings (base64: what the openai "
        "client asks for by default)",
    )
    w.add_argument(
        "--token-id-range",
        default="10:256",
        metavar="LO:HI",
        help="random prompt token ids are drawn from [LO, HI)",
    )
    w.add_argument("--seed", type=int, default=_D.seed, help="workload seed")
    s = p.add_argument_group("service-level objectives (goodput)")
    s.add_argument(
        "--goodput",
        nargs="+",
        metavar="METRIC:MS",
        default=None,
        help="gen goodput counts requests meeting every bound given: ttft, tpot, "
        "e2el in ms (e.g. ttft:1000 tpot:50)",
    )
    s.add_argument(
        "--embed-slo",
        type=float,
        default=None,
        metavar="MS",
        help="embed goodput counts requests answered within MS",
    )
    t = p.add_argument_group("timing and output")
    t.add_argument(
        "--warmup",
        type=float,
        default=_D.warmup_s,
        help=f"seconds of load before the window (at most {MAX_SECONDS:,.0f})",
    )
    t.add_argument(
        "--duration",
        type=float,
        default=_D.duration_s,
        help=f"seconds of the measurement window (at most {MAX_SECONDS:,.0f})",
    )
    t.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="seconds over which the first requests are spread (default min(1, warm-up/4))",
    )
    t.add_argument(
        "--stall",
        metavar="S",
        type=float,
        default=_D.stall_s,
        help="seconds an endpoint with requests in flight may say nothing (no token, answer "
        f"or failure) before the run ends as frozen, {WATCH_S:g} to {MAX_SECONDS:,.0f}",
    )
    t.add_argument(
        "--out",
        metavar="FILE.json",
        type=nonempty,
        help="write the summary here and the per-request records to FILE.records.jsonl",
    )
    t.add_argument(
        "--record-chunks",
        action="store_true",
        help="keep each chunk's arrival time in the records (large)",
    )
    t.add_argument("--json", action="store_true", help="print the summary JSON on stdout")
    t.add_argument("--quiet", action="store_true", help="no live progress, no summary table")
    t.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )


def _config(args):
    try:
        lo, hi = (int(x) for x in args.token_id_range.split(":"))
    except ValueError:
        _refuse(f"--token-id-range: expected LO:HI, got {args.token_id_range!r}")
    bounds = _goodput(args.goodput)
    _unused_flags(args)
    cfg = LoadConfig(
        gen_url=args.gen_url,
        embed_url=args.embed_url,
        gen_model=args.gen_model,
        embed_model=args.embed_model,
        gen_concurrency=args.gen_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        embed_concurrency=args.embed_concurrency,
        embed_batch=args.embed_batch,
        embed_input_len=args.embed_input_len,
        embed_text=args.embed_text,
        embed_encoding=args.embed_encoding,
        warmup_s=args.warmup,
        duration_s=args.duration,
        seed=args.seed,
        api_key=args.api_key,
        token_id_low=lo,
        token_id_high=hi,
        ramp_s=args.ramp,
        stall_s=args.stall,
        record_chunks=args.record_chunks,
        gen_rate=args.gen_rate,
        embed_rate=args.embed_rate,
        arrival=_D.arrival if args.arrival is None else args.arrival,
        burstiness=_D.burstiness if args.burstiness is None else args.burstiness,
        embed_slo_ms=args.embed_slo,
        gen_endpoint=args.gen_endpoint,
        **bounds,
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        names = {
            "warmup_s": "--warmup",
            "duration_s": "--duration",
            "ramp_s": "--ramp",
            "stall_s": "--stall",
            "token_id_low": "--token-id-range",
            "embed_slo_ms": "--embed-slo",
            **{v: "--goodput" for v in _GOODPUT.values()},
        }
        flag = names.get(e.field, "--" + e.field.replace("_", "-"))
        _refuse(f"{flag}: {str(e).split(': ', 1)[1]}")


def _unused_flags(args) -> None:
    """Refuse a flag that would change nothing, naming it: SystemExit (status 2)."""
    rate = args.gen_rate is not None or args.embed_rate is not None
    want_rate = "give --gen-rate or --embed-rate"
    unused = [
        ("--arrival", args.arrival is not None and not rate, want_rate),
        ("--burstiness", args.burstiness is not None and not rate, want_rate),
        ("--gen-rate", args.gen_rate is not None and not args.gen_url, "give --gen-url"),
        ("--goodput", bool(args.goodput) and not args.gen_url, "give --gen-url"),
        ("--embed-rate", args.embed_rate is not None and not args.embed_url, "give --embed-url"),
        ("--embed-slo", args.embed_slo is not None and not args.embed_url, "give --embed-url"),
    ]
    for flag, idle, fix in unused:
        if idle:
            _refuse(f"{flag}: does nothing here ({fix})")


def _refuse(message: str):
    print(f"coserve bench: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _goodput(items: list[str] | None) -> dict:
    """`--goodput ttft:MS tpot:MS e2el:MS` -> LoadConfig's goodput_*_ms fields."""
    out = {}
    for item in items or []:
        name, _, ms = item.partition(":")
        if name not in _GOODPUT:
            _refuse(
                f"--goodput: {item!r}: the metric must be one of "
                f"{', '.join(_GOODPUT)} (as in ttft:1000)"
            )
        if _GOODPUT[name] in out:
            _refuse(f"--goodput: {name} given twice ({item!r})")
        try:
            out[_GOODPUT[name]] = float(ms)
        except ValueError:
            _refuse(f"--goodput: {item!r}: expected {name}:MS with MS a number of milliseconds")
    return out


def run(args) -> int:
    import asyncio
    import json
    import signal

    from coserve.bench.console import format_summary
    from coserve.bench.loadgen import (
        BenchError,
        BenchStopped,
        EndpointDead,
        run_load,
        run_sync,
        write_result,
    )
    from coserve.bench.metrics import refused_all
    from coserve.bench.progress import LiveProgress

    cfg = _config(args)
    if args.out:
        try:
            check_out(args.out)
        except ValueError as e:
            _refuse(f"--out: {e}")
    err = sys.stderr
    parts = []
    if cfg.gen_url:
        load = (
            f"C={cfg.gen_concurrency}"
            if cfg.gen_rate is None
            else f"{cfg.gen_rate:g} req/s {cfg.arrival} (cap {cfg.gen_concurrency})"
        )
        parts.append(
            f"gen {cfg.gen_url} {cfg.gen_endpoint} {load} "
            f"({cfg.input_len} in / {cfg.output_len} out)"
        )
    if cfg.embed_url:
        load = (
            f"C={cfg.embed_concurrency}"
            if cfg.embed_rate is None
            else f"{cfg.embed_rate:g} req/s {cfg.arrival} (cap {cfg.embed_concurrency})"
        )
        parts.append(
            f"embed {cfg.embed_url} {load} "
            f"(batch {cfg.embed_batch} x {cfg.embed_input_len}, {cfg.embed_encoding})"
        )
    print(
        f"coserve bench: {'; '.join(parts)}; warm-up {cfg.warmup_s:g} s, "
        f"window {cfg.duration_s:g} s",
        file=err,
        flush=True,
    )

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        me = asyncio.current_task()

        def on_signal(signame):
            if stop.is_set():
                print(f"\ncoserve bench: {signame} again, giving up", file=err, flush=True)
                me.cancel()
                return
            print(
                f"\ncoserve bench: {signame}, stopping; writing what was measured "
                f"({signame} again to give up)",
                file=err,
                flush=True,
            )
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            with LiveProgress(
                cfg.warmup_s, cfg.duration_s, enabled=False if args.quiet else None
            ) as lp:
                return await run_load(cfg, on_progress=lp.update if lp.enabled else None, stop=stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        result = run_sync(main(), args.loop)
    except EndpointDead as e:
        result = e.result
        print(f"coserve bench: {e}", file=err, flush=True)
    except BenchError as e:
        print(f"coserve bench: {e}", file=err, flush=True)
        return 130 if isinstance(e, BenchStopped) else 1
    except asyncio.CancelledError:
        return 130
    summary = result.summary()
    path = rec_path = None
    if args.out:
        try:
            path, rec_path = write_result(result, args.out)
            summary["records_file"] = rec_path
        except (OSError, ValueError) as e:
            print(f"coserve bench: --out: cannot write {args.out!r}: {e}", file=err, flush=True)
    if not args.quiet:
        print(format_summary(summary), file=err, flush=True)
    if path:
        print(f"coserve bench: wrote {path} and {rec_path}", file=err, flush=True)
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    refused = [why for ep in (result.gen, result.embed) if ep and (why := refused_all(ep))]
    for why in refused:
        if why not in (result.aborted or ""):  # the run's end already said it
            print(f"coserve bench: {why}", file=err, flush=True)
    if result.aborted or (args.out and not path) or refused:
        return 1
    return 130 if result.cut_short else 0
