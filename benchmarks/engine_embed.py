"""The built-in engine on the embed workload, in one run on one GPU.

    PYTHONPATH=. python3 benchmarks/engine_embed.py                # 30 s warm-up, 60 s window
    PYTHONPATH=. python3 benchmarks/engine_embed.py --warmup 5 --duration 20 \\
        --serve-warmup 5 --serve-duration 20

Builds qwen3-embedding-8b with random weights (bf16) at gpu_memory_utilization 0.30,
max_model_len 512; then C=64 closed loop, 8 inputs of 32 random tokens per request:
    1. offline: the engine stepped in this process (a finished request is replaced at once)
    2. a profile of full forward passes (torch profiler: GPU time per kernel class; CUDA only)
    3. served: `coserve serve embed` (its own process) + `coserve bench` at C=64
and prints sequences (inputs) per second, % of the ~1,600 seq/s bf16 compute bound
(DESIGN.md) and request latency p50/p95/p99. Writes engine_embed.json under $OUT or
--out-dir; the table comes last. `--model tiny-embed --device cpu` runs it on a CPU."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_gen import (  # noqa: E402
    _f,
    _kernel_times,
    device_info,
    dist,
    kernel_fields,
    log,
    power_sampler,
    print_kernel_fields,
    print_window_power,
    serve_and_bench,
    window_means,
)

from coserve.engine.embed_engine import EmbedEngine  # noqa: E402
from coserve.engine.types import EngineArgs  # noqa: E402

BOUND_SEQ_S = 1_600  # DESIGN.md: 8B dense, 32-token inputs, 100 % of bf16 peak
STUDY_SEQ_S = 479  # vLLM 0.15.1, embed alone


def offline(
    engine: EmbedEngine,
    concurrency: int,
    batch: int,
    input_len: int,
    warmup_s: float,
    duration_s: float,
    seed: int = 0,
) -> dict:
    rng = random.Random(seed)
    sent: dict[str, float] = {}
    n = 0

    def submit() -> None:
        nonlocal n
        rid = f"e{n}"
        n += 1
        engine.add_request(
            rid, [[rng.randrange(10, 256) for _ in range(input_len)] for _ in range(batch)]
        )
        sent[rid] = time.perf_counter()

    for _ in range(concurrency):
        submit()
    sampler = power_sampler(engine.device)
    wall0 = time.time()
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s
    seqs, latency, step_ms, steps = 0, [], [], 0
    last = t0
    while True:
        outs = engine.step()
        now = time.perf_counter()
        if start <= now < end:
            steps += 1
            step_ms.append((now - last) * 1e3)
        last = now
        for o in outs:
            if start <= now < end:
                seqs += len(o.embeddings)
                latency.append((now - sent.pop(o.request_id)) * 1e3)
            else:
                sent.pop(o.request_id)
            submit()
        if now >= end:
            break
    res = {
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "sequences_per_s": seqs / duration_s,
        "latency_ms": dist(latency),
        "step_ms": dist(step_ms),
        "steps": steps,
        "telemetry": window_means(sampler, wall0 + warmup_s, wall0 + warmup_s + duration_s),
    }
    log(
        f"offline: {res['sequences_per_s']:,.0f} seq/s, {steps} steps, step p50 "
        f"{_f(res['step_ms']['p50'])} ms"
    )
    return res


def profile_forwards(engine: EmbedEngine, steps: int, input_len: int, seed: int = 0) -> dict:
    """GPU time per kernel class of `steps` full forward passes (as many `input_len`-token
    inputs as one pass takes), with pooling; ms per pass."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(seed)
    n = min(engine.args.max_num_seqs, engine.max_num_batched_tokens // input_len)
    inputs = [[rng.randrange(10, 256) for _ in range(input_len)] for _ in range(n)]
    engine.embed_batch(inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.embed_batch(inputs)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    times = _kernel_times(prof, steps)
    gpu_ms = times[0]
    res = {
        "steps": steps,
        "inputs_per_pass": n,
        "wall_ms_per_pass": wall_ms,
        "gpu_kernel_ms_per_pass": gpu_ms,
        **kernel_fields(times, steps, "pass"),
    }
    log(
        f"profile: {n} inputs x {input_len} tokens per pass, {wall_ms:.2f} ms wall per pass "
        f"(profiled), {gpu_ms:.2f} ms of kernels"
    )
    print_kernel_fields(res, gpu_ms, "pass")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--model", default="qwen3-embedding-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.30)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="inputs per forward pass")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="inputs per request")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--serve-warmup", type=float, default=30.0)
    ap.add_argument("--serve-duration", type=float, default=60.0)
    ap.add_argument("--profile-steps", type=int, default=5, help="forward passes profiled")
    ap.add_argument("--skip", default="", help="comma list of: profile,serve")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res: dict = {"workload": vars(args), "env": device_info(args.device), "errors": {}}

    def save() -> None:
        (out_dir / "engine_embed.json").write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    engine = EmbedEngine(
        EngineArgs(
            model=args.model,
            random_weights=True,
            device=args.device,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
    )
    res["build"] = {
        "seconds": time.perf_counter() - t0,
        "weight_gib": engine.lm.weight_bytes / 2**30,
    }
    log(f"built in {res['build']['seconds']:.0f} s, weights {res['build']['weight_gib']:.1f} GiB")
    try:
        res["offline"] = offline(
            engine, args.concurrency, args.batch, args.input_len, args.warmup, args.duration
        )
    except Exception as e:  # noqa: BLE001 - keep the served figures
        traceback.print_exc()
        res["errors"]["offline"] = repr(e)
    if "profile" not in args.skip.split(",") and args.device.startswith("cuda"):
        try:
            res["profile"] = profile_forwards(engine, args.profile_steps, args.input_len)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["errors"]["profile"] = repr(e)
    save()
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if "serve" not in args.skip.split(","):
        try:
            server = [
                "--model",
                args.model,
                "--random-weights",
                "--device",
                args.device,
                "--gpu-memory-utilization",
                str(args.gpu_memory_utilization),
                "--max-model-len",
                str(args.max_model_len),
                "--max-num-seqs",
                str(args.max_num_seqs),
                "--max-num-batched-tokens",
                str(args.max_num_batched_tokens),
            ]
            bench = [
                "--embed-concurrency",
                str(args.concurrency),
                "--embed-batch",
                str(args.batch),
                "--embed-input-len",
                str(args.input_len),
                "--warmup",
                str(args.serve_warmup),
                "--duration",
                str(args.serve_duration),
            ]
            res["served"] = serve_and_bench("embed", server, bench, out_dir, ready_timeout_s=300)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["errors"]["served"] = repr(e)
        save()

    print(
        f"\n== engine_embed: {args.model} on {res['env'].get('gpu', 'cpu')}, C={args.concurrency}"
        f", {args.batch} inputs x {args.input_len} tokens per request =="
    )
    print(
        f"{'run':<26} {'seq/s':>8} {'% bound':>8} {'vs study':>9} {'lat p50':>8} {'p95':>8} "
        f"{'p99':>8}"
    )
    o = res.get("offline")
    s = (res.get("served") or {}).get("embed")
    for label, r in (("offline", o), ("served (serve + bench)", s)):
        if r:
            v, lat = r["sequences_per_s"], r["latency_ms"]
            print(
                f"{label:<26} {v:8,.0f} {v / BOUND_SEQ_S:8.1%} {v / STUDY_SEQ_S:9.2f} "
                f"{_f(lat['p50'], '.1f'):>8} {_f(lat['p95'], '.1f'):>8} {_f(lat['p99'], '.1f'):>8}"
            )
    print_window_power("offline", o)
    for k, v in res["errors"].items():
        print(f"ERROR in {k}: {v}")


if __name__ == "__main__":
    main()
