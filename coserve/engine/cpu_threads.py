"""How many torch intra-op threads an engine process computes with on the CPU.

A generation engine's decode step on the CPU is hundreds of tiny ops; handing each to a second
thread costs more than the thread shares (the launcher makes OpenMP's idle threads sleep, so
two servers on the same cores do not starve each other, and every hand-off wakes one). On a
2-core machine, 2026-12-02, `coserve serve gen --model tiny-moe` with the demo's load (C=8, 16
in / 32 out) did 600 tok/s with two threads and 2,513 with one; all-minilm-l6-v2's embed
server (C=4, batches of 8 x 32 tokens) did 235 seq/s with two and 165 with one. Hence one
thread for generation and torch's own choice (every core) for embeddings, unless
`EngineArgs.cpu_threads` says otherwise. TP ranks on the CPU set their own share
(tp_workers.py)."""

from __future__ import annotations

import torch

from coserve.engine.types import EngineArgs

GEN_CPU_THREADS = 1


def engine_cpu_threads(args: EngineArgs, kind: str) -> int | None:
    """Threads for an engine of `kind` ("gen" or "embed") built from `args`: the number to
    set, or None to leave torch's default (a GPU engine, or embeddings without a choice)."""
    if args.device != "cpu":
        return None
    if args.cpu_threads is not None:
        return args.cpu_threads
    return GEN_CPU_THREADS if kind == "gen" else None


def apply_cpu_threads(args: EngineArgs, kind: str) -> int:
    """Set this process's intra-op threads for an engine of `kind`; returns the count it
    computes with. Call it in the engine's own process, before the engine is built."""
    threads = engine_cpu_threads(args, kind)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
