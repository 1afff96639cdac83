"""The gen engine's host (Python) work per decode step at large batch, on a CPU.

    PYTHONPATH=. python3 benchmarks/engine_host.py --concurrency 256 1024 2048 --reps 3
    PYTHONPATH=. python3 benchmarks/engine_host.py --concurrency 2048 --profile 25

Builds the real GenEngine (a tiny preset, random weights, `device="cpu"`, async scheduling,
max_num_seqs = C) with C requests of a short prompt and a long greedy output (ignore_eos), runs
until every one decodes, then measures windows of pure decode steps. Per step it reports rank
0's host phases as benchmarks/engine_tp.py does on the GPU (tp_probes.HostPhases: schedule,
stage, send, launch, postprocess), in us and us per sequence, with three things split out:
the model's forward out of "launch" (`forward`: on a CPU it runs inside the launch; compute,
not host work), the copy of the staged rows out of "stage" (`copy`: a memcpy here, queued
asynchronously on a GPU; `stage_host` is the rest), and the cyclic garbage collector's time
(`gc`). The phases are this thread's CPU time by default (`--clock cpu`: other work on a
shared machine does not inflate it; the host work is one thread's Python, and torch runs on
that thread too, `--threads 1`); `--clock wall` times as on the GPU; `wall_step` is always a
whole step's wall time, forward included. Each point is `--reps` windows; the medians are
printed and written as JSON to `--out`. `--quiet-gc` freezes the heap and raises the
collector's thresholds once the engine is warm, as the engine core process does
(engine/host_gc.py). `--profile N` adds a cProfile of one more window at each C (the top N
host functions by own time).

These are CPU measurements of host phases: they say nothing about GPU throughput."""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tp_probes import HostPhases  # noqa: E402

from coserve.engine.gen_engine import GenEngine  # noqa: E402
from coserve.engine.types import EngineArgs, SamplingParams  # noqa: E402

HOST_PHASES = ("schedule", "stage_host", "send", "launch_host", "postprocess", "other", "gc")


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


class CpuPhases(HostPhases):
    """HostPhases plus the forward (`runner._static`, inside "launch"), the staged rows' copy
    (`runner._copy_staged`, inside "stage") and the garbage collector's time, by `clock`."""

    PARTS = {
        **HostPhases.PARTS,
        "forward": ("runner", "_static"),
        "copy": ("runner", "_copy_staged"),
    }

    def __init__(self, engine, clock) -> None:
        self.clock = clock
        super().__init__(engine)
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc)

    def _wrap(self, phase, fn):
        clock = self.clock

        def timed(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                self.sec[phase] += clock() - t0

        return timed

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = self.clock()
        else:
            self.sec["gc"] += self.clock() - self._gc_t0
            self.sec[f"gc_gen{info['generation']}"] += 1

    def undo(self, engine) -> None:
        gc.callbacks.remove(self._gc)
        super().undo(engine)

    def per_step_us(self, steps: int) -> dict[str, float]:
        us = {k: v * 1e6 / steps for k, v in self.sec.items() if not k.startswith("gc_gen")}
        # one "schedule" phase however the step was scheduled (engines before
        # `schedule_ahead` scheduled the step ahead through `schedule`)
        us["schedule"] = us.get("schedule", 0.0) + us.pop("schedule_ahead", 0.0)
        us["launch_host"] = us.get("launch", 0.0) - us.get("forward", 0.0)
        us["stage_host"] = us.get("stage", 0.0) - us.get("copy", 0.0)
        parts = ("schedule", "stage", "stage_varlen", "send", "launch", "postprocess")
        us["other"] = us.get("step", 0.0) - sum(us.get(k, 0.0) for k in parts)
        us["host_total"] = us.get("step", 0.0) - us.get("forward", 0.0) - us.get("copy", 0.0)
        for k, v in self.sec.items():
            if k.startswith("gc_gen"):
                us[k] = v  # collections in the window, not per step
        return us


def build(args, c: int) -> GenEngine:
    return GenEngine(
        EngineArgs(
            model=args.model,
            random_weights=True,
            device="cpu",
            max_model_len=args.max_model_len,
            max_num_seqs=c,
            cpu_kv_cache_bytes=args.kv_gib << 30,
        )
    )


def fill(engine: GenEngine, c: int, args) -> None:
    """C requests, stepped until all of them decode (the prompts are prefilled)."""
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(c):
        prompt = [10 + (i * 7 + k) % 240 for k in range(args.input_len)]
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    if len(engine.scheduler.running) != c:
        raise RuntimeError(f"{len(engine.scheduler.running)} running, expected {c}")


def window(engine: GenEngine, steps: int, clock) -> dict[str, float]:
    phases = CpuPhases(engine, clock)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    phases.undo(engine)
    out = phases.per_step_us(steps)
    out["wall_step"] = wall * 1e6 / steps
    return out


def profiled(engine: GenEngine, steps: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    buf = io.StringIO()
    # the forward's functions (kernels, models, torch) left out: the host's are the question
    host_only = r"^(?!.*(kernels/|models/|torch)).*"
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(host_only, top)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-dense")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--input-len", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=400)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=5, help="decode steps before the windows")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per window")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="top N of a cProfile; 0: none")
    ap.add_argument("--kv-gib", type=int, default=2, help="CPU KV-cache budget, GiB")
    ap.add_argument(
        "--quiet-gc", action="store_true", help="as the engine core: host_gc.quiet_gc() once warm"
    )
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="phases in this thread's CPU time (default) or wall time",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: 1 (default) keeps the host's copies on the measured thread",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    need = args.warmup + args.steps * (args.reps + (args.profile > 0)) + 2
    if need > args.output_len:
        ap.error(f"--output-len must cover warm-up, windows and profile ({need} tokens)")

    torch.set_num_threads(args.threads)
    results = {}
    for c in args.concurrency:
        engine = build(args, c)
        try:
            fill(engine, c, args)
            if args.quiet_gc:
                from coserve.engine.host_gc import quiet_gc

                quiet_gc()
            reps = [window(engine, args.steps, CLOCKS[args.clock]) for _ in range(args.reps)]
            keys = sorted(set().union(*reps))
            med = {k: statistics.median(r.get(k, 0.0) for r in reps) for k in keys}
            results[c] = {"median_us_per_step": med, "reps": reps}
            print(f"C={c}: per decode step, us ({args.clock}) (us/seq), median of {args.reps}:")
            for k in (*HOST_PHASES, "host_total", "copy", "forward", "wall_step"):
                print(f"  {k:12s} {med.get(k, 0.0):10.0f} ({med.get(k, 0.0) / c:6.2f})")
            gcs = {k: med[k] for k in keys if k.startswith("gc_gen")}
            print(f"  gc collections per window of {args.steps} steps: {gcs}", flush=True)
            if args.profile:
                results[c]["profile"] = profiled(engine, args.steps, args.profile)
                print(results[c]["profile"], flush=True)
        finally:
            engine.shutdown()
            del engine
            if args.quiet_gc:
                from coserve.engine.host_gc import restore_gc

                restore_gc()
            gc.collect()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
