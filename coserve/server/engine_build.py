"""The engine a `coserve serve` command line asks for, built in the engine process.

`start_engine` pickles `functools.partial(build_engine, args)` into a spawned process, which
imports this module to unpickle it: it imports no more than the engines need (command.py,
with the HTTP stack, stays in the front process)."""

from __future__ import annotations

import argparse
import logging

from coserve.server.serve_flags import batched_tokens_problem, tokens_flag


def serve_device(name: str) -> str:
    """'cuda' or 'cpu' for `auto` (torch's view of this machine), else `name` as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(args: argparse.Namespace):
    """A GenEngine (kind gen) or an EmbedEngine from `coserve serve` arguments; the model is
    loaded on return. Raises ValueError when the embed engine's tokens per forward (a flag)
    is less than the model's own max_model_len."""
    from coserve.engine.types import EngineArgs

    engine_args = EngineArgs(
        model=args.model,
        random_weights=args.random_weights,
        device=serve_device(args.device),
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cpu_kv_cache_bytes=args.kv_cache_bytes,
        cpu_threads=args.cpu_threads,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        tp_all_reduce=args.tp_all_reduce,
        enable_expert_parallel=args.enable_expert_parallel,
        async_scheduling=not args.no_async_scheduling,
    )
    from coserve.engine.cpu_threads import apply_cpu_threads

    if engine_args.device == "cpu":
        threads = apply_cpu_threads(engine_args, args.kind, own_process=not args.shared_process)
        logging.getLogger("coserve.server").info(
            "%s engine on the CPU: %d intra-op thread%s", args.kind, threads, "s"[: threads > 1]
        )
    if args.kind == "gen":
        from coserve.engine.gen_engine import GenEngine

        return GenEngine(engine_args)
    from coserve.engine.embed_engine import EmbedEngine

    engine = EmbedEngine(engine_args)
    given = tokens_flag(args)
    why = given and batched_tokens_problem(given[0], given[1], engine.max_model_len)
    if why:  # the model's own max_model_len, known only once it is loaded
        raise ValueError(why)
    return engine
