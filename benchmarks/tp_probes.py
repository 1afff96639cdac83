"""What benchmarks/engine_tp.py measures inside a (tensor-parallel) engine, on every rank:
CUDA events around each step, rank 0's host time by phase, the torch profiler's kernels by
class with the GPU's busy and idle time, and the collectives at decode sizes. Functions a
worker runs are module-level, sent as `messages.Call` messages (each answers by writing a
JSON file that rank 0 reads)."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from engine_gen import ClosedLoop, classify

from coserve.engine import parallel
from coserve.engine.messages import Call


# ----------------------------------------------------------------------------- per-step timing
class StepTimer:
    """CUDA events around each `runner.execute` (the step's forward and head, as launched):
    per step, the GPU time from its first kernel to its last (waits inside collectives
    included) and the GPU idle time before it (since the previous step's end)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._orig = engine.runner.execute

        def timed(step):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = self._orig(step)
            b.record()
            self.pairs.append((a, b))
            return out

        engine.runner.execute = timed

    def stop(self) -> dict:
        self.engine.runner.execute = self._orig
        torch.cuda.synchronize()
        inside = [a.elapsed_time(b) for a, b in self.pairs]
        idle = [
            self.pairs[i - 1][1].elapsed_time(self.pairs[i][0]) for i in range(1, len(self.pairs))
        ]
        span = self.pairs[0][0].elapsed_time(self.pairs[-1][1]) if self.pairs else 0.0
        return {
            "steps": len(inside),
            "gpu_span_ms": span,
            "in_step_ms_mean": sum(inside) / max(1, len(inside)),
            "idle_between_steps_ms_mean": sum(idle) / max(1, len(idle)),
            "idle_fraction": sum(idle) / span if span else None,
        }


def _worker_timer_start(engine) -> None:
    engine._bench_timer = StepTimer(engine)


def _worker_timer_stop(engine, path: str) -> None:
    Path(path).write_text(json.dumps(engine._bench_timer.stop()))


class HostPhases:
    """Rank 0's host seconds per phase of `GenEngine.step`, by wrapping its parts."""

    PARTS = {
        "schedule": ("scheduler", "schedule"),
        # the decode step scheduled while the one before runs (async scheduling)
        "schedule_ahead": ("scheduler", "schedule_ahead"),
        "stage": ("runner", "_prepare_static"),
        "stage_varlen": ("runner", "_prepare_varlen"),
        "send": ("runner", "_staged"),
        "launch": ("runner", "execute"),
        "postprocess": ("engine", "_finish"),
        "step": ("engine", "_step"),
    }

    def __init__(self, engine) -> None:
        self.sec: dict[str, float] = defaultdict(float)
        self._undo = []
        for phase, (owner, name) in self.PARTS.items():
            obj = engine if owner == "engine" else getattr(engine, owner)
            orig = getattr(obj, name, None)
            if orig is None:  # an engine from before the part existed
                continue
            obj.__dict__[name] = self._wrap(phase, orig)
            self._undo.append((obj, name))
        if engine.runner.broadcast is not None:
            send = engine.runner.broadcast
            engine.runner.broadcast = self._wrap("send", send)

    def undo(self, engine) -> None:
        for obj, name in self._undo:
            obj.__dict__.pop(name, None)
        if engine.workers is not None:
            engine.runner.broadcast = engine.workers.send

    def _wrap(self, phase, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.sec[phase] += time.perf_counter() - t0

        return timed

    def per_step_ms(self, steps: int) -> dict[str, float]:
        out = {k: v * 1e3 / max(1, steps) for k, v in self.sec.items()}
        busy = sum(v for k, v in out.items() if k != "step")
        out["waiting_for_gpu"] = out.get("step", 0.0) - busy
        return out


# ----------------------------------------------------------------------------- profile
_TP_CLASSES = [
    ("NCCL all-reduce", r"AllReduce"),
    ("NCCL all-gather", r"AllGather"),
    ("symm-mem all-reduce", r"one_shot|two_shot|symm"),
]


def _classify(name: str) -> str:
    for cls, pat in _TP_CLASSES:
        if re.search(pat, name, re.IGNORECASE):
            return cls
    return classify(name)


def summarize_profile(prof, steps: int) -> dict:
    """Kernel time per class per step, and the GPU's busy (union of kernels) vs idle time."""
    spans, per_class = [], defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = ev.time_range
        spans.append((r.start, r.end))
        per_class[_classify(ev.name)] += r.elapsed_us() / steps
    spans.sort()
    busy, gaps, end = 0.0, [], None
    for s, e in spans:
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    window = (end - spans[0][0]) if spans else 0.0
    return {
        "kernels": len(spans),
        "window_ms_per_step": window / 1e3 / steps,
        "busy_ms_per_step": busy / 1e3 / steps,
        "idle_ms_per_step": sum(gaps) / 1e3 / steps,
        "gaps_over_20us_per_step": sum(1 for g in gaps if g > 20) / steps,
        "largest_gaps_us": sorted(gaps, reverse=True)[:8],
        "classes_ms_per_step": {
            k: v / 1e3 for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])
        },
    }


def _worker_prof_start(engine, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    engine._bench_prof = profile(activities=[ProfilerActivity.CUDA])
    engine._bench_prof.__enter__()
    Path(path).write_text("{}")  # started: rank 0 starts its own now


def _worker_prof_stop(engine, path: str, steps: int) -> None:
    torch.cuda.synchronize()
    engine._bench_prof.__exit__(None, None, None)
    Path(path).write_text(json.dumps(summarize_profile(engine._bench_prof, steps)))


def _from_workers(engine, fn, make_args, tmp: Path, tag: str) -> list[dict]:
    """Run fn on every worker (writing one JSON file each) and read what they wrote."""
    w = engine.workers
    if w is None:
        return []
    paths = [tmp / f"{tag}_rank{r + 1}.json" for r in range(len(w.procs))]
    for p in paths:
        p.unlink(missing_ok=True)
    # every worker gets the same message; each writes the path of its own rank
    w.send(Call(_per_rank, (fn, [str(p) for p in paths], make_args)))
    out = []
    for p in paths:
        deadline = time.monotonic() + 60
        while not p.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.05)
        out.append(json.loads(p.read_text()) if p.exists() else {"error": "no answer"})
    return out


def _per_rank(engine, fn, paths: list[str], extra: tuple) -> None:
    fn(engine, paths[parallel.state().rank - 1], *extra)


def profile_decode(loop: ClosedLoop, steps: int, tmp: Path) -> dict:
    """Both ranks' kernels over `steps` pure decode steps (no refills during them)."""
    from torch.profiler import ProfilerActivity, profile

    e = loop.engine
    loop.refill = False
    # the workers' profilers first (starting one takes a while, which rank 0 would otherwise
    # spend waiting in its first collective)
    _from_workers(e, _worker_prof_start, (), tmp, "profstart")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    res = {
        "wall_ms_per_step": wall,
        "batch": len(e.scheduler.running),
        "rank0": summarize_profile(prof, steps),
    }
    for i, r in enumerate(_from_workers(e, _worker_prof_stop, (steps,), tmp, "prof")):
        res[f"rank{i + 1}"] = r
    loop.refill = True
    return res


# ----------------------------------------------------------------------------- collectives
def comm_bench(engine, path: str | None = None, rows_list=(1, 64, 512, 1024)) -> dict:
    """All-reduce of [rows, hidden] bf16 at decode sizes, eager and as 48 in one CUDA graph
    (NCCL; and the symmetric-memory one-shot, if it builds here); the greedy pair all-gather
    and the full logits all-gather of a 512-row step. Every rank runs it (rank 0 directly,
    workers through a Call); times are rank 0's, in microseconds per collective."""
    import torch.distributed as dist

    dev = engine.device
    hidden = engine.config.hidden_size
    out: dict = {}
    try:
        symm = parallel.SymmAllReduce(dev)
    except Exception as e:  # noqa: BLE001 - reported, NCCL still measured
        symm, out["symm_mem_error"] = None, repr(e)
    s = torch.cuda.current_stream()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def timed(fn, iters):
        fn()
        torch.cuda.synchronize()
        ev[0].record(s)
        for _ in range(iters):
            fn()
        ev[1].record(s)
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) * 1e3 / iters

    for rows in rows_list:
        x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
        impls = {"nccl": lambda x=x: dist.all_reduce(x)}
        if symm is not None:
            impls["symm_mem"] = lambda x=x: symm(x)
        for name, fn in impls.items():
            r = {"eager_us": timed(fn, 50)}
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(48):
                    fn()
            r["graph_us"] = timed(g.replay, 5) / 48
            out[f"{name}_allreduce_{rows}x{hidden}"] = r
    vocab = engine.config.vocab_size
    per = -(-vocab // parallel.state().size)
    logits = torch.randn(512, per, device=dev, dtype=torch.bfloat16)
    out["logits_allgather_512_us"] = timed(lambda: parallel.gather_last_dim(logits, vocab), 10)
    out["greedy_pair_gather_512_us"] = timed(
        lambda: parallel.argmax_last_dim(logits, parallel.state().rank * per, vocab), 20
    )
    if path is not None:
        Path(path).write_text(json.dumps(out))
    return out
