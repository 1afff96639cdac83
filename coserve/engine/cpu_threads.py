"""How many torch intra-op threads an engine process computes with on the CPU.

A generation engine's decode step on the CPU is hundreds of tiny ops; handing each to a second
thread costs more than the thread shares (the launcher makes OpenMP's idle threads sleep, so
two servers on the same cores do not starve each other, and every hand-off wakes one). On a
2-core machine, 2026-12-02, `coserve serve gen --model tiny-moe` with the demo's load (C=8, 16
in / 32 out) did 600 tok/s with two threads and 2,513 with one; all-minilm-l6-v2's embed
server (C=4, batches of 8 x 32 tokens) did 235 seq/s with two and 165 with one.

Hence, unless `EngineArgs.cpu_threads` names a count (for every process of the engine): one
thread for a generation engine in a process of its own; tensor-parallel ranks an even share of
the cores each (they compute at once); otherwise torch's own choice (every core), as for
embeddings, or for both engines of `serve colocated`, which share one process."""

from __future__ import annotations

import os

from coserve.engine.types import EngineArgs

GEN_CPU_THREADS = 1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads_problem(threads: int | None) -> str | None:
    """Why `threads` (the --cpu-threads flag, None when not given) cannot be used here, or
    None: each thread is an OS thread of every engine process, so more than the cores only
    adds hand-offs, and far more exhausts the process limit while the model loads."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        return (
            f"--cpu-threads: {threads} is more than the {cores} CPU cores this machine lets it use"
        )
    return None


def engine_cpu_threads(args: EngineArgs, kind: str | None, own_process: bool = True) -> int | None:
    """Threads for a process of an engine of `kind` ("gen", "embed"; None for a TP worker,
    whose kind does not change its share) built from `args`, `own_process` False when another
    engine shares the process: the count to set, or None to leave torch's (a GPU engine too)."""
    if args.device != "cpu":
        return None
    if args.cpu_threads is not None:
        return args.cpu_threads
    if args.tensor_parallel_size > 1:
        return max(1, usable_cores() // args.tensor_parallel_size)
    if kind == "gen" and own_process:
        return GEN_CPU_THREADS
    return None


def apply_cpu_threads(args: EngineArgs, kind: str | None, own_process: bool = True) -> int:
    """Set this process's intra-op threads (`engine_cpu_threads`); returns the count it
    computes with. Call it in the engine's own process, before the engine is built."""
    import torch  # not at import: `coserve serve` checks the flag before torch is needed

    threads = engine_cpu_threads(args, kind, own_process)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
