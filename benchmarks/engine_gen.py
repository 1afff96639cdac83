"""The built-in engine on the study's gen workload, in one run on one GPU.

    PYTHONPATH=. python3 benchmarks/engine_gen.py                  # the study's settings
    PYTHONPATH=. python3 benchmarks/engine_gen.py --warmup 10 --duration 30 \\
        --eager-warmup 5 --eager-duration 20 --serve-warmup 15 --serve-duration 30

Builds qwen3-30b-a3b with random weights (FP8 block-quantised, as the checkpoint) at
gpu_memory_utilization 0.50, max_model_len 4096, max_num_seqs 512 and reports the KV
capacity; then the study's gen load (C=512 closed loop: 30 random input tokens, 512 output
tokens, ignore_eos, greedy; a request that finishes is replaced at once):
    1. offline, CUDA graphs: the engine stepped in this process (warm-up, then a timed window)
    2. a per-step profile (torch profiler over decode steps: GPU time per kernel class)
    3. offline, eager (the same engine with its graphs switched off)
    4. served: `coserve serve gen` (its own process, graphs) + `coserve bench` at C=512
and prints output tok/s, TPOT p50/p95/p99 and % of the ~49,000 tok/s bandwidth bound
(DESIGN.md). Offline TPOT is per request over its decode tokens inside the window
((last - first token time) / (tokens - 1), tokens after its first); served TPOT is
`coserve bench`'s (vllm bench's definition). Writes engine_gen.json (and the server's log)
under $OUT or --out-dir; the table comes last. `--model tiny-moe --device cpu` runs the same
code on a CPU in seconds."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coserve.engine.gen_engine import GenEngine  # noqa: E402
from coserve.engine.types import EngineArgs, SamplingParams  # noqa: E402
from coserve.procs import free_port, tail  # noqa: E402

BOUND_TOK_S = 49_000  # DESIGN.md: ~45 GB read per decode step at C=512 on an H200
STUDY_TOK_S = 24_363  # vLLM 0.15.1, the study's gen-only figure


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def dist(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        **{f"p{q}": pct(values, q) for q in (50, 95, 99)},
    }


def device_info(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1)
        )
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


# ----------------------------------------------------------------------------- offline load
class ClosedLoop:
    """Keeps `concurrency` requests in the engine; a finished one is replaced at once."""

    def __init__(
        self, engine: GenEngine, concurrency: int, input_len: int, output_len: int, seed: int = 0
    ) -> None:
        self.engine, self.concurrency = engine, concurrency
        self.input_len = input_len
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.rng = random.Random(seed)
        self.next_id = 0
        self.times: dict[str, list[float]] = {}  # request id -> token arrival times
        self.finished: list[list[float]] = []
        self.refill = True

    def _submit(self) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.engine.add_request(
            rid, [self.rng.randrange(10, 256) for _ in range(self.input_len)], self.params
        )
        self.times[rid] = []

    def step(self) -> tuple[int, bool]:
        """One engine step; (tokens it produced, whether it was a pure decode step)."""
        while self.refill and len(self.times) < self.concurrency:
            self._submit()
        decode_only = not self.engine.scheduler.waiting
        outs = self.engine.step()
        now = time.perf_counter()
        for o in outs:
            self.times[o.request_id].append(now)
            if o.finished:
                self.finished.append(self.times.pop(o.request_id))
        return len(outs), decode_only

    def run(self, warmup_s: float, duration_s: float, label: str) -> dict:
        self.finished: list[list[float]] = []
        kinds0 = dict(self.engine.runner.steps)
        sampler = power_sampler(self.engine.runner.device)
        wall0 = time.time()
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + duration_s
        tokens, steps, step_ms, full_step_ms = 0, 0, [], []
        last = t0
        while True:
            n, decode_only = self.step()
            now = time.perf_counter()
            if start <= now < end:
                tokens += n
                steps += 1
                step_ms.append((now - last) * 1e3)
                if decode_only and n >= self.concurrency * 0.95:
                    full_step_ms.append((now - last) * 1e3)
            last = now
            if now >= end:
                break
        window = [t for t in (self.finished + list(self.times.values()))]
        tpot = []
        for times in window:
            inside = [t for t in times[1:] if start <= t < end]
            if len(inside) >= 2:
                tpot.append((inside[-1] - inside[0]) / (len(inside) - 1) * 1e3)
        res = {
            "label": label,
            "warmup_s": warmup_s,
            "duration_s": duration_s,
            "output_tokens_per_s": tokens / duration_s,
            "steps": steps,
            "tpot_ms": dist(tpot),
            "step_ms": dist(step_ms),
            "full_decode_step_ms": dist(full_step_ms),
            "completed_in_window": sum(1 for t in self.finished if start <= t[-1] < end),
            "step_kinds": {k: v - kinds0[k] for k, v in self.engine.runner.steps.items()},
            "telemetry": window_means(sampler, wall0 + warmup_s, wall0 + warmup_s + duration_s),
        }
        log(
            f"{label}: {res['output_tokens_per_s']:,.0f} tok/s, {steps} steps, TPOT p50 "
            f"{_f(res['tpot_ms']['p50'])} ms, full decode step p50 "
            f"{_f(res['full_decode_step_ms']['p50'])} ms"
        )
        return res


# The window's GPU figures that say whether a step is bound by the card's power budget: at
# the power cap the clocks drop, and a faster kernel can buy less than its bytes promise.
WINDOW_METRICS = ("power_w", "sm_clock_mhz", "power_capped", "sm_active", "dram_active")


def power_sampler(device: torch.device):
    """NVML telemetry of an engine's GPU every 0.5 s (None on a CPU or without NVML)."""
    if device.type != "cuda":
        return None
    from coserve.gpu.telemetry import TelemetrySampler

    index = device.index
    device = str(torch.cuda.current_device() if index is None else index)
    sampler = TelemetrySampler([device], interval_s=0.5).start()
    return sampler if sampler.available else None


def window_means(sampler, start: float, end: float) -> dict:
    """Means of WINDOW_METRICS over the samples inside [start, end] (wall clock), with the
    card's power limit; {} without a sampler."""
    from coserve.experiment.rep import telemetry_means

    if sampler is None:
        return {}
    sampler.stop()
    means = telemetry_means(sampler.rows, start, end)
    out = {"power_limit_w": next(iter(sampler.at_start.values()), {}).get("power_limit_w")}
    return out | {m: means[m]["mean"] if m in means else None for m in WINDOW_METRICS}


def print_window_power(label: str, run: dict | None) -> None:
    """One line of a run's window telemetry (nothing when none was sampled)."""
    w = (run or {}).get("telemetry") or {}
    if w.get("power_w") is not None:
        print(
            f"{label}: {w['power_w']:.0f} W of {_f(w.get('power_limit_w'), '.0f')} W, "
            f"power-capped {_f(w.get('power_capped'), '.0%')} of samples, SM clock "
            f"{_f(w.get('sm_clock_mhz'), '.0f')} MHz, GPM SM active "
            f"{_f(w.get('sm_active'))}, DRAM active {_f(w.get('dram_active'))}"
        )


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


# ----------------------------------------------------------------------------- profile
_CLASSES = [  # (class, kernel-name pattern), first match wins
    ("attention (paged decode)", r"paged_decode|merge_splits"),
    ("attention (dense, SDPA)", r"fmha|flash|efficient_attention|attention"),
    ("MoE GEMMs (Triton FP8)", r"moe_gemm"),
    ("MoE align/permute", r"moe_align|moe_count|moe_scatter"),
    ("MoE combine (sum over top-k)", r"moe_sum|reduce_kernel.*func_wrapper"),
    ("MoE router top-k", r"topk_softmax"),
    ("FP8 activation quant", r"quant_rows|per_token_group"),
    ("FP8 dense GEMM (Triton)", r"block_fp8_gemm"),
    ("qk norm + rope + KV store", r"qk_norm_rope"),
    ("RMSNorm (+ residual add)", r"rms_norm"),
    ("SiLU and mul", r"silu"),
    (
        "cuBLAS/CUTLASS GEMM (FP8 blockwise, bf16 router, lm_head)",
        r"gemm|nvjet|cutlass|sm90_xmma|cublas|splitKreduce",
    ),
    ("sampling (argmax, softmax)", r"argmax|argmin|softmax|reduce_kernel"),
    ("memcpy / memset", r"^Memcpy|^Memset|memcpy|memset"),
    ("other elementwise (sum, copies, index)", r"."),
]


def classify(name: str) -> str:
    for cls, pat in _CLASSES:
        if re.search(pat, name, re.IGNORECASE):
            return cls
    return "other"


def _mean_context(engine: GenEngine) -> float:
    running = engine.scheduler.running
    return sum(len(s.token_ids) for s in running) / max(1, len(running))


def profile_decode(loop: ClosedLoop, steps: int, context: float) -> dict:
    """GPU time per kernel class per pure decode step (no refills during it, so no prompts),
    taken when the batch is full and its mean context is near `context` (the workload's
    time average: attention time grows with it)."""
    from torch.profiler import ProfilerActivity, profile

    e = loop.engine
    for _ in range(1500):
        if (
            not e.scheduler.waiting
            and len(e.scheduler.running) == loop.concurrency
            and abs(_mean_context(e) - context) < 20
        ):
            break
        loop.step()
    loop.refill = False
    torch.cuda.synchronize()
    batch = len(e.scheduler.running)
    mean_ctx = _mean_context(e)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            loop.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    loop.refill = True
    res = _kernel_times(prof, steps)
    mode = "graphs"
    if res[0] < 0.3 * wall_ms and not e.runner.enforce_eager:
        # the profiler saw few kernels inside the graph replays: take them from eager steps
        # (the same kernels at the same padded shapes; only the gaps between them differ)
        log(
            f"profile: only {res[0]:.2f} of {wall_ms:.2f} ms traced under graphs; "
            "profiling eager steps instead"
        )
        e.runner.enforce_eager = True
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                loop.step()
            torch.cuda.synchronize()
        e.runner.enforce_eager = False
        res = _kernel_times(prof, steps)
        mode = "eager (graph replays not traced)"
    gpu_ms = res[0]
    replay_ms = _replay_ms(loop)
    out = {
        "steps": steps,
        "batch": batch,
        "mean_context": mean_ctx,
        "traced": mode,
        "wall_ms_per_step": wall_ms,
        "gpu_kernel_ms_per_step": gpu_ms,
        "graph_replay_ms": replay_ms,
        **kernel_fields(res, steps, "step"),
    }
    log(
        f"profile ({mode}): batch {batch}, mean context {mean_ctx:.0f}, "
        f"{wall_ms:.2f} ms wall per profiled step, "
        f"{gpu_ms:.2f} ms of kernels; one graph replay (the forward, no logits) "
        f"{_f(replay_ms)} ms by CUDA events"
    )
    print_kernel_fields(out, gpu_ms, "step")
    return out


def _replay_ms(loop: ClosedLoop, reps: int = 20) -> float | None:
    """GPU time of one replay of the graph the last decode step used (its inputs are still
    staged: the replay rewrites the same cache slots with the same values)."""
    r = loop.engine.runner
    loop.refill = False
    rows = r.bucket_for(max(1, len(loop.engine.scheduler.running)))
    loop.step()
    loop.refill = True
    graph = r.graphs.get(rows)
    if graph is None:
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_fields(times, steps: int, per: str) -> dict:
    """_kernel_times' result as a profile's fields, per `per` (a step, a pass): ms per kernel
    class, longest first, and the 20 longest kernels with their launches."""
    _, per_class, per_kernel, calls = times
    return {
        f"classes_ms_per_{per}": {
            k: v / 1e3 for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {"name": k[:120], f"ms_per_{per}": v / 1e3, f"calls_per_{per}": calls[k] / steps}
            for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:20]
        ],
    }


def print_kernel_fields(res: dict, gpu_ms: float, per: str) -> None:
    """kernel_fields' classes (ms and share of `gpu_ms`) and the 12 longest kernels."""
    for k, v in res[f"classes_ms_per_{per}"].items():
        print(f"    {k:<58} {v:7.3f} ms  {v / max(gpu_ms, 1e-9):5.1%}")
    print("    top kernels:")
    for k in res["top_kernels"][:12]:
        print(
            f"      {k[f'ms_per_{per}']:7.3f} ms  x{k[f'calls_per_{per}']:<5.0f} {k['name'][:90]}"
        )


def _kernel_times(prof, steps: int):
    """(kernel ms per step, us per step by class, us per step by kernel, launches by kernel)"""
    per_class: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.time_range.elapsed_us()
        per_class[classify(ev.name)] += us / steps
        per_kernel[ev.name] += us / steps
        calls[ev.name] += 1
    return sum(per_class.values()) / 1e3, per_class, per_kernel, calls


# ----------------------------------------------------------------------------- served
def serve_and_bench(
    role: str,
    server_args: list[str],
    bench_args: list[str],
    out_dir: Path,
    ready_timeout_s: float,
    switch_interval_s: float | None = None,
    tag: str = "",
) -> dict:
    """Start `coserve serve ROLE` (own process), run `coserve bench` against it, stop it;
    returns the bench summary with the server's start-up time. switch_interval_s: the
    server's interpreter switches threads this often (sys.setswitchinterval; Python's
    default is 5 ms), to see what GIL hand-offs between its engine thread and its HTTP
    thread cost."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = out_dir / f"serve_{role}{tag}.log"
    prefix = [sys.executable, "-m", "coserve"]
    if switch_interval_s is not None:
        prefix = [
            sys.executable,
            "-c",
            f"import sys, runpy; sys.setswitchinterval({switch_interval_s}); "
            "sys.argv[0] = 'coserve'; runpy.run_module('coserve', run_name='__main__')",
        ]
    cmd = [*prefix, "serve", role, "--host", "127.0.0.1", "--port", str(port), *server_args]
    log("starting: " + " ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(
            cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n" + tail(log_path, 30))
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > ready_timeout_s:
                raise RuntimeError("server not ready in time:\n" + tail(log_path, 30))
            time.sleep(1.0)
        ready_s = time.perf_counter() - t0
        log(f"server ready in {ready_s:.0f} s")
        out_json = out_dir / f"bench_{role}{tag}.json"
        bench = [
            sys.executable,
            "-m",
            "coserve",
            "bench",
            f"--{role}-url",
            url,
            "--out",
            str(out_json),
            "--quiet",
            *bench_args,
        ]
        log("running: " + " ".join(bench))
        subprocess.run(bench, check=True, env=env)
        summary = json.loads(out_json.read_text())
        summary["server_ready_s"] = ready_s
        summary["server_log_tail"] = tail(log_path, 15)
        rec = out_json.with_suffix(".records.jsonl")
        if rec.exists():
            rec.unlink()  # large; the summary is what the report needs
        return summary
    finally:
        if proc.poll() is None:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def release_cuda_memory() -> None:
    """Hand what this process's dropped engine held back to the device (the server started
    next needs its own share of it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        log(
            f"after release: {torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved, "
            f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free on the device"
        )


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.50)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=30)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--warmup", type=float, default=30.0, help="offline, graphs")
    ap.add_argument("--duration", type=float, default=60.0, help="offline, graphs")
    ap.add_argument("--eager-warmup", type=float, default=10.0)
    ap.add_argument("--eager-duration", type=float, default=30.0)
    ap.add_argument("--serve-warmup", type=float, default=30.0)
    ap.add_argument("--serve-duration", type=float, default=60.0)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument(
        "--serve-switch-interval",
        type=float,
        default=None,
        help="also serve with this sys.setswitchinterval (seconds) in the server",
    )
    ap.add_argument("--skip", default="", help="comma list of: eager,profile,serve")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res: dict = {"workload": vars(args), "env": device_info(args.device), "errors": {}}

    def save() -> None:
        (out_dir / "engine_gen.json").write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    engine = GenEngine(
        EngineArgs(
            model=args.model,
            random_weights=True,
            device=args.device,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
        )
    )
    res["build"] = {
        "seconds": time.perf_counter() - t0,
        "kv_capacity_tokens": engine.kv_capacity_tokens,
        "kv_bytes_per_token": engine.kv_bytes_per_token,
        "graphs": len(engine.runner.graphs),
        "weight_gib": engine.lm.weight_bytes / 2**30,
    }
    if args.device.startswith("cuda"):
        res["build"]["gpu_mem_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    log(
        f"built in {res['build']['seconds']:.0f} s: KV capacity {engine.kv_capacity_tokens:,} "
        f"tokens, {len(engine.runner.graphs)} decode graphs, weights "
        f"{res['build']['weight_gib']:.1f} GiB"
    )
    save()

    loop = ClosedLoop(engine, args.concurrency, args.input_len, args.output_len)
    try:
        res["offline_graphs"] = loop.run(
            args.warmup,
            args.duration,
            "offline, CUDA graphs"
            if engine.runner.graphs
            else "offline, static shapes (no graphs)",
        )
    except Exception as e:  # noqa: BLE001 - keep the other phases' figures
        traceback.print_exc()
        res["errors"]["offline_graphs"] = repr(e)
    save()
    if "profile" not in skip and args.device.startswith("cuda"):
        try:
            res["profile"] = profile_decode(
                loop, args.profile_steps, args.input_len + args.output_len / 2
            )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["errors"]["profile"] = repr(e)
        save()
    if "eager" not in skip:
        try:
            engine.runner.enforce_eager = True
            res["offline_eager"] = loop.run(
                args.eager_warmup, args.eager_duration, "offline, eager"
            )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["errors"]["offline_eager"] = repr(e)
        save()
    engine.runner.graphs.clear()
    engine.runner.graph_outputs.clear()
    del engine, loop
    release_cuda_memory()

    if "serve" not in skip:
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
            ]
            bench = [
                "--gen-concurrency",
                str(args.concurrency),
                "--input-len",
                str(args.input_len),
                "--output-len",
                str(args.output_len),
                "--warmup",
                str(args.serve_warmup),
                "--duration",
                str(args.serve_duration),
            ]
            res["served"] = serve_and_bench("gen", server, bench, out_dir, ready_timeout_s=420)
            if args.serve_switch_interval is not None:
                res["served_switch"] = serve_and_bench(
                    "gen",
                    server,
                    bench,
                    out_dir,
                    ready_timeout_s=420,
                    switch_interval_s=args.serve_switch_interval,
                    tag="_switch",
                )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["errors"]["served"] = repr(e)
        save()
    print_table(res)


def print_table(res: dict) -> None:
    b = res.get("build", {})
    print(
        f"\n== engine_gen: {res['workload']['model']} on {res['env'].get('gpu', 'cpu')}, "
        f"KV capacity {b.get('kv_capacity_tokens', 0):,} tokens, "
        f"C={res['workload']['concurrency']}, {res['workload']['input_len']} in / "
        f"{res['workload']['output_len']} out =="
    )
    print(
        f"{'run':<26} {'tok/s':>9} {'% bound':>8} {'vs study':>9} {'TPOT p50':>9} "
        f"{'p95':>7} {'p99':>7} {'step p50':>9}"
    )
    rows = [
        ("offline, graphs", res.get("offline_graphs")),
        ("offline, eager", res.get("offline_eager")),
    ]
    for label, r in rows:
        if r:
            t, s = r["tpot_ms"], r["full_decode_step_ms"]
            tok = r["output_tokens_per_s"]
            print(
                f"{label:<26} {tok:9,.0f} {tok / BOUND_TOK_S:8.1%} {tok / STUDY_TOK_S:9.2f} "
                f"{_f(t['p50']):>9} {_f(t['p95']):>7} {_f(t['p99']):>7} {_f(s['p50']):>9}"
            )
    switch = res["workload"].get("serve_switch_interval")
    for key, label in (
        ("served", "served (serve + bench)"),
        ("served_switch", f"served, switch {switch} s"),
    ):
        g = (res.get(key) or {}).get("gen")
        if g:
            t, tok = g["tpot_ms"], g["output_tokens_per_s"]
            print(
                f"{label:<26} {tok:9,.0f} {tok / BOUND_TOK_S:8.1%} {tok / STUDY_TOK_S:9.2f} "
                f"{_f(t['p50']):>9} {_f(t['p95']):>7} {_f(t['p99']):>7} "
                f"{'':>9}  failed {g.get('failed')}"
            )
    for label, r in rows:
        print_window_power(label, r)
    p = res.get("profile")
    if p:
        print(
            f"profile: {p['gpu_kernel_ms_per_step']:.2f} ms of kernels per decode step "
            f"(batch {p['batch']}, mean context {p['mean_context']:.0f}), graph replay "
            f"{_f(p.get('graph_replay_ms'))} ms; "
            + ", ".join(
                f"{k.split(' (')[0]} {v:.2f}" for k, v in list(p["classes_ms_per_step"].items())[:5]
            )
        )
    for k, v in res.get("errors", {}).items():
        print(f"ERROR in {k}: {v}")


if __name__ == "__main__":
    main()
