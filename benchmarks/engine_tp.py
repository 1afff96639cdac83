"""Tensor parallelism on the study's gen load: TP=1 and TP=2 measured in one run, and where a
TP=2 decode step's time goes.

    PYTHONPATH=. python3 benchmarks/engine_tp.py --warmup 6 --duration 10
    PYTHONPATH=. python3 benchmarks/engine_tp.py --model tiny-moe --device cpu --warmup 1 \\
        --duration 2 --max-model-len 512 --concurrency 8 --output-len 32    # the code, on a CPU

For each tensor-parallel size (and all-reduce, `--tp-all-reduce`) it builds qwen3-30b-a3b
with random weights (as engine_gen.py: gpu_memory_utilization 0.50, max_model_len 4096) and
runs the C=512 closed loop (30 in / 512 out, greedy, ignore_eos) offline for a short window,
with async scheduling and (`--sync-too`) without. Per decode step it reports rank 0's host
time by phase (schedule, stage, send to the workers, launch, postprocess; the rest of the
step is rank 0 waiting for the GPU), each worker's wait for rank 0's message and its
send-to-receive lag, each GPU's time inside steps and idle between them (CUDA events around
every step's launch, on every rank), GPU time per kernel class on every rank (torch profiler
over a few pure decode steps, all-reduces and the all-gather included), GPM SM activity per
GPU, and a micro-benchmark of the collectives at decode sizes (`--comm`). `--embed` adds
qwen3-embedding-8b at TP=1 and TP=2 (C=64, 8 inputs of 32 tokens). Writes engine_tp.json and
tp-scaling.json under $OUT (or --out-dir); a short table comes last. The measuring code is
tp_probes.py. $COSERVE_COMMIT, if set, names the commit in tp-scaling.json.

The symm-mem all-reduce serves one engine per process: run each configuration in its own
process (`--tag NAME` writes engine_tp_NAME.json), then `--merge FILES` writes
tp-scaling.json and the table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_gen import ClosedLoop, _f, device_info, log, release_cuda_memory  # noqa: E402
from tp_probes import (  # noqa: E402
    HostPhases,
    StepTimer,
    _from_workers,
    _per_rank,
    _worker_timer_start,
    _worker_timer_stop,
    comm_bench,
    profile_decode,
)

from coserve.engine.gen_engine import GenEngine  # noqa: E402
from coserve.engine.host_gc import quiet_gc, restore_gc  # noqa: E402
from coserve.engine.messages import Call  # noqa: E402
from coserve.engine.types import EngineArgs  # noqa: E402


# ----------------------------------------------------------------------------- one config
def run_gen(args, tp: int, config: str, tmp: Path) -> dict:
    """config: the all-reduce ("nccl", "symm-mem"), "+ep" for expert parallelism."""
    from coserve.gpu.telemetry import TelemetrySampler

    all_reduce, _, ep = config.partition("+")
    res: dict = {"tp": tp, "all_reduce": config}
    t0 = time.perf_counter()
    max_seqs = max(args.max_num_seqs, max(args.concurrency)) if tp > 1 else args.max_num_seqs
    engine = GenEngine(
        EngineArgs(
            model=args.model,
            random_weights=True,
            device=args.device,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_seqs=max_seqs,
            tensor_parallel_size=tp,
            tp_all_reduce=all_reduce,
            enable_expert_parallel=ep == "ep",
        )
    )
    res["build_s"] = time.perf_counter() - t0
    if args.quiet_gc:  # as the engine core process does once its engine is built
        quiet_gc()
    res["quiet_gc"] = args.quiet_gc
    res["kv_capacity_tokens"] = engine.kv_capacity_tokens
    log(
        f"TP={tp} ({config}) built in {res['build_s']:.0f} s, KV {engine.kv_capacity_tokens:,} "
        "tokens"
    )
    cuda = args.device.startswith("cuda")
    devices = [str(i) for i in range(tp)] if cuda else []
    try:
        if args.comm and cuda and tp > 1:
            engine.workers.send(Call(_per_rank, (comm_bench, [str(tmp / "comm_rank1.json")], ())))
            res["comm"] = comm_bench(engine)
            log(
                "collectives (us): "
                + ", ".join(
                    f"{k} {v if not isinstance(v, dict) else v.get('graph_us')}"
                    for k, v in res["comm"].items()
                    if "error" not in k
                )
            )
        concurrencies = args.concurrency if tp > 1 else [min(args.concurrency)]
        for c in concurrencies:
            modes = [True, False] if args.sync_too and c == min(concurrencies) else [True]
            for async_on in modes:
                _drain(engine)  # every window starts from the same state: C fresh requests
                loop = ClosedLoop(engine, c, args.input_len, args.output_len)
                engine.async_scheduling = async_on
                label = f"TP={tp} {config} C={c} {'async' if async_on else 'sync'}"
                phases = HostPhases(engine)
                counters0 = engine.workers.counters() if engine.workers else []
                if cuda:
                    timer = StepTimer(engine)
                    if engine.workers is not None:
                        engine.workers.send(Call(_worker_timer_start))
                tel = TelemetrySampler(devices, interval_s=0.5).start()
                r = loop.run(args.warmup, args.duration, label)
                r["telemetry"] = tel.stop()
                if cuda:  # unwrap in the reverse order of wrapping
                    r["gpu_steps"] = {"rank0": timer.stop()}
                    for i, w in enumerate(
                        _from_workers(engine, _worker_timer_stop, (), tmp, "timer")
                    ):
                        r["gpu_steps"][f"rank{i + 1}"] = w
                r["host_ms_per_step_whole_run"] = phases.per_step_ms(
                    sum(r["step_kinds"].values()) or r["steps"]
                )
                phases.undo(engine)
                if engine.workers is not None:
                    cnt = engine.workers.counters()
                    r["workers"] = [
                        {k: (b[k] - a[k]) if k != "lag_max_s" else b[k] for k in b}
                        for a, b in zip(counters0, cnt, strict=True)
                    ]
                res[f"C{c}_{'async' if async_on else 'sync'}"] = r
                _print_run(label, r)
        engine.async_scheduling = True
        if cuda and args.profile_steps:
            _drain(engine)
            loop = ClosedLoop(engine, min(args.concurrency), args.input_len, args.output_len)
            loop.run(min(args.warmup, 4.0), 0.5, "profile warm-up")
            res["profile"] = profile_decode(loop, args.profile_steps, tmp)
            p = res["profile"]
            log(
                f"profile: wall {p['wall_ms_per_step']:.2f} ms/step; "
                + "; ".join(
                    f"{k}: busy {v.get('busy_ms_per_step', 0):.2f} idle "
                    f"{v.get('idle_ms_per_step', 0):.2f}"
                    for k, v in p.items()
                    if k.startswith("rank")
                )
            )
    finally:
        if args.quiet_gc:
            restore_gc()
        engine.shutdown()
        engine.runner.graphs.clear()
        engine.runner.graph_outputs.clear()
        del engine
        if cuda:
            release_cuda_memory()
    return res


def _drain(engine) -> None:
    """Abort whatever an earlier window left running, and collect a step launched ahead."""
    for rid in list(engine._seqs):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()


def _print_run(label: str, r: dict) -> None:
    h = r["host_ms_per_step_whole_run"]
    line = (
        f"  {label}: {r['output_tokens_per_s']:,.0f} tok/s, TPOT p50 {_f(r['tpot_ms']['p50'])}, "
        f"host/step " + ", ".join(f"{k} {v:.2f}" for k, v in h.items())
    )
    g = r.get("gpu_steps", {})
    for k, v in g.items():
        in_step = v.get("in_step_ms_mean", 0)
        idle = v.get("idle_between_steps_ms_mean", 0)
        line += f"; {k} in-step {in_step:.2f} idle {idle:.2f}"
    for i, w in enumerate(r.get("workers", [])):
        n = max(1, w["steps"])
        line += (
            f"; worker{i + 1} wait {w['wait_s'] * 1e3 / n:.2f} lag {w['lag_s'] * 1e3 / n:.3f} ms"
        )
    sm = r["telemetry"].get("sm_active")
    if sm:
        line += f"; SM active {sm['mean']:.2f}"
    print(line, flush=True)


def run_embed(args, tp: int) -> dict:
    from engine_embed import offline

    from coserve.engine.embed_engine import EmbedEngine

    t0 = time.perf_counter()
    engine = EmbedEngine(
        EngineArgs(
            model=args.embed_model,
            random_weights=True,
            device=args.device,
            gpu_memory_utilization=0.30,
            max_model_len=512,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            tensor_parallel_size=tp,
        )
    )
    try:
        r = offline(engine, 64, 8, 32, args.embed_warmup, args.embed_duration)
        r["build_s"] = time.perf_counter() - t0
        return r
    finally:
        engine.shutdown()
        del engine
        release_cuda_memory()


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--embed-model", default="qwen3-embedding-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.50)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--concurrency", default="512", help="comma list; TP=1 runs the smallest")
    ap.add_argument("--input-len", type=int, default=30)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--tp", default="1,2", help="comma list of tensor-parallel sizes")
    ap.add_argument(
        "--tp-all-reduce",
        default="nccl",
        help="comma list: nccl, symm-mem, each optionally +ep (expert parallel); "
        "symm-mem serves one engine per process",
    )
    ap.add_argument(
        "--sync-too", action="store_true", help="also a window without async scheduling"
    )
    ap.add_argument("--comm", action="store_true", help="micro-benchmark the collectives")
    ap.add_argument(
        "--quiet-gc",
        action="store_true",
        help="freeze the built engine out of the cyclic GC, as the engine core (host_gc.py)",
    )
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--embed", action="store_true")
    ap.add_argument("--embed-warmup", type=float, default=5.0)
    ap.add_argument("--embed-duration", type=float, default=10.0)
    ap.add_argument("--tag", default="", help="write engine_tp_TAG.json")
    ap.add_argument(
        "--merge",
        nargs="*",
        default=None,
        help="only merge these engine_tp*.json files into tp-scaling.json",
    )
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.merge is not None:
        merge([Path(f) for f in args.merge], Path(args.out_dir))
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"engine_tp_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res: dict = {
        "workload": {k: v for k, v in vars(args).items()},
        "env": device_info(args.device),
        "runs": [],
        "errors": {},
    }
    if args.device.startswith("cuda"):
        res["env"]["gpus"] = torch.cuda.device_count()
        res["env"]["peer_access_0_1"] = (
            torch.cuda.device_count() > 1 and torch.cuda.can_device_access_peer(0, 1)
        )
        try:
            res["env"]["topology"] = subprocess.run(
                ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            res["env"]["topology"] = repr(e)
        print(res["env"]["topology"], flush=True)
        res["env"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))

    def save() -> None:
        name = f"engine_tp_{args.tag}.json" if args.tag else "engine_tp.json"
        (out / name).write_text(json.dumps(res, indent=1, default=str))

    for tp in [int(t) for t in args.tp.split(",") if t]:
        for ar in args.tp_all_reduce.split(",") if tp > 1 else ["nccl"]:
            try:
                res["runs"].append(run_gen(args, tp, ar, tmp))
            except Exception as e:  # noqa: BLE001 - keep the other configurations' figures
                traceback.print_exc()
                res["errors"][f"gen TP={tp} {ar}"] = repr(e)
            save()
    if args.embed:
        for tp in (1, 2):
            try:
                res[f"embed_tp{tp}"] = run_embed(args, tp)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res["errors"][f"embed TP={tp}"] = repr(e)
            save()
    save()
    if not args.tag:
        (out / "tp-scaling.json").write_text(json.dumps(scaling(res), indent=1))
    print_table(res)


def merge(files: list[Path], out: Path) -> None:
    """Runs of several invocations (one engine per process) as one result."""
    parts = [json.loads(f.read_text()) for f in files]
    res = {"workload": parts[0]["workload"], "env": parts[0]["env"], "runs": [], "errors": {}}
    res["workload"]["concurrency"] = sorted(
        {c for p in parts for c in p["workload"]["concurrency"]}
    )
    res["env"]["argv"] = [" ; ".join(" ".join(p["env"]["argv"]) for p in parts)]
    for p in parts:
        res["runs"] += p["runs"]
        res["errors"].update(p["errors"])
        for k in ("embed_tp1", "embed_tp2"):
            if k in p:
                res[k] = p[k]
    (out / "tp-scaling.json").write_text(json.dumps(scaling(res), indent=1))
    print_table(res)


def scaling(res: dict) -> dict:
    """The issue's record: TP=1 and the best TP=2 at the study's C, and TP=2's best C."""
    c0 = min(res["workload"]["concurrency"])
    tp1 = [r for r in res["runs"] if r["tp"] == 1]
    argv = res["env"]["argv"]
    tp2 = [r for r in res["runs"] if r["tp"] == 2]

    def at(r, key):
        x = r.get(key)
        if not x:
            return None
        if "sm_active" in x["telemetry"] and not any("/" in k for k in x["telemetry"]):
            return {
                "tok_s": x["output_tokens_per_s"],
                "tpot_p50_ms": x["tpot_ms"]["p50"],
                "tpot_p99_ms": x["tpot_ms"]["p99"],
                "sm_active": [x["telemetry"]["sm_active"]["mean"]],
                "all_reduce": r["all_reduce"],
            }
        sm = [v["mean"] for k, v in x["telemetry"].items() if k.startswith("sm_active/")]
        return {
            "tok_s": x["output_tokens_per_s"],
            "tpot_p50_ms": x["tpot_ms"]["p50"],
            "tpot_p99_ms": x["tpot_ms"]["p99"],
            "sm_active": sm or None,
            "all_reduce": r["all_reduce"],
        }

    t1 = at(tp1[0], f"C{c0}_async") if tp1 else None
    t2s = [at(r, f"C{c0}_async") for r in tp2]
    t2 = max((t for t in t2s if t), key=lambda t: t["tok_s"], default=None)
    best = None
    for r in tp2:
        for c in res["workload"]["concurrency"]:
            x = at(r, f"C{c}_async")
            if x and (best is None or x["tok_s"] > best["tok_s"]):
                best = {"concurrency": c, **x}
    e1, e2 = res.get("embed_tp1"), res.get("embed_tp2")
    return {
        "device": res["env"].get("gpu"),
        "gpus": res["env"].get("gpus"),
        "date": res["env"]["date"],
        "commit": os.environ.get("COSERVE_COMMIT"),
        "command": " ".join(argv),
        "tp1": t1,
        "tp2": t2,
        "tp2_over_tp1": (t2["tok_s"] / t1["tok_s"]) if t1 and t2 and t1["tok_s"] else None,
        "tp2_best": best,
        "embed_tp1_seq_s": e1 and e1["sequences_per_s"],
        "embed_tp2_seq_s": e2 and e2["sequences_per_s"],
    }


def print_table(res: dict) -> None:
    print(
        f"\n== engine_tp: {res['workload']['model']} on {res['env'].get('gpus', 0)} x "
        f"{res['env'].get('gpu', 'cpu')} =="
    )
    print(
        f"{'run':<32} {'tok/s':>9} {'TPOT p50':>9} {'p99':>7} {'host':>6} {'wait':>6} "
        f"{'GPU idle':>9} {'SM act':>7}"
    )
    for r in res["runs"]:
        for k, x in r.items():
            if not (k.startswith("C") and isinstance(x, dict)):
                continue
            h = x["host_ms_per_step_whole_run"]
            idle = x.get("gpu_steps", {}).get("rank0", {}).get("idle_between_steps_ms_mean")
            sm = x["telemetry"].get("sm_active", {}).get("mean")
            name = f"TP={r['tp']} {r['all_reduce']} {k}"
            print(
                f"{name:<32} "
                f"{x['output_tokens_per_s']:9,.0f} {_f(x['tpot_ms']['p50']):>9} "
                f"{_f(x['tpot_ms']['p99']):>7} "
                f"{h.get('step', 0) - h.get('waiting_for_gpu', 0):6.2f} "
                f"{h.get('waiting_for_gpu', 0):6.2f} {_f(idle):>9} {_f(sm):>7}"
            )
    s = scaling(res)
    if s["tp2_over_tp1"]:
        print(f"TP=2 / TP=1 at C={min(res['workload']['concurrency'])}: {s['tp2_over_tp1']:.3f}x")
    if s["embed_tp1_seq_s"] and s["embed_tp2_seq_s"] is not None:
        print(
            f"embed seq/s: TP=1 {s['embed_tp1_seq_s']:,.0f}, TP=2 {s['embed_tp2_seq_s']:,.0f} "
            f"({s['embed_tp2_seq_s'] / s['embed_tp1_seq_s']:.3f}x)"
        )
    for k, v in res["errors"].items():
        print(f"ERROR in {k}: {v}")


if __name__ == "__main__":
    main()
