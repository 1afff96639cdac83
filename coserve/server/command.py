"""`coserve serve gen|embed`: one model behind the OpenAI API, one process per model.

Prints `coserve serve KIND: ready at http://HOST:PORT (...)` on stdout once it is serving
(`--port 0` picks a free port; the line says which). SIGTERM or Ctrl-C: stop accepting,
let in-flight requests finish for `--shutdown-timeout` seconds, abort the rest, exit 0."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading

from coserve.engine.cpu_threads import cpu_threads_problem
from coserve.engine.types import ALL_REDUCES, EngineArgs
from coserve.server.engine_build import build_engine, serve_device
from coserve.server.fields import RequestLimits
from coserve.server.serve_flags import (
    Given,
    all_reduce_problem,
    batched_tokens_problem,
    fraction,
    guard_config,
    guard_options,
    misplaced,
    parse_bytes,
    positive_int,
    seconds,
    tcp_port,
    tokens_flag,
)
from coserve.server.serve_groups import add_flag_groups
from coserve.text_flags import api_key, device, nonempty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind",
        choices=["gen", "embed", "colocated"],
        help="generation (/v1/completions), embedding (/v1/embeddings), or both engines in one "
        "process (--model and --embed-model, two ports)",
    )
    parser.add_argument(
        "--model",
        metavar="PRESET_OR_DIR",
        required=True,
        help="a preset name (tiny-dense, tiny-moe, tiny-embed, all-minilm-l6-v2, qwen3-30b-a3b, "
        "qwen3-embedding-8b) or an HF model directory",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="initialise the preset's architecture with random weights",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        type=nonempty,
        default=None,
        metavar="NAME",
        help="name(s) the API answers to (default: the --model value)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        type=device,
        help="cpu, cuda, cuda:N or auto (cuda when available; the default)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="weights/activations dtype (default: the engine's choice for the device)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0: every "
        "interface, set --api-key then)",
    )
    parser.add_argument(
        "--port",
        metavar="N",
        type=tcp_port,
        default=8000,
        help="0 picks a free port (default %(default)s)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        metavar="F",
        type=fraction,
        default=0.9,
        help="fraction of the whole GPU this process may use, as in vLLM (default %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-bytes",
        metavar="BYTES",
        type=parse_bytes,
        default=256 << 20,
        help="KV-cache budget on CPU, in bytes or with a K/M/G suffix (default 256M)",
    )
    parser.add_argument(
        "--cpu-threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="torch intra-op threads of each engine process on the CPU, at most its cores; "
        "ignored on a GPU (default: 1 for gen, whose decode steps are many tiny ops that a "
        "second thread slows down; an even share of the cores per tensor-parallel rank; "
        "torch's own, every core, for embed and for colocated's one process)",
    )
    # serve colocated builds both engines in one process (colocated.engine_args sets it)
    parser.set_defaults(shared_process=False)
    parser.add_argument(
        "--max-model-len",
        metavar="N",
        type=positive_int,
        default=None,
        help="longest prompt + completion in tokens (default: the model's own limit)",
    )
    parser.add_argument(
        "--max-num-seqs",
        metavar="N",
        type=positive_int,
        default=256,
        help="most sequences in one batch (default %(default)s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        action=Given,
        metavar="N",
        type=positive_int,
        default=8192,
        help="most tokens in one step (prefill chunk / embedding batch) (default %(default)s)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="gen only: no CUDA graphs (the embed engine has no graph path, so serve embed refuses "
        "it)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        metavar="N",
        type=positive_int,
        default=1,
        help="ranks the model is split across: one process each, on one GPU each from "
        "--device on (on the CPU they share its cores) (default %(default)s)",
    )
    parser.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="tensor parallel MoE: each rank holds whole experts instead of a slice of every "
        "expert",
    )
    parser.add_argument(
        "--tp-all-reduce",
        choices=ALL_REDUCES,
        default=EngineArgs.tp_all_reduce,
        help="tensor parallel, how ranks sum: symm-mem, a one-shot all-reduce over torch "
        "symmetric memory for small tensors (no multicast; CUDA GPUs and TP 2 or more only); "
        "nccl, the process group (NCCL on GPUs, gloo on the CPU); auto (the default): "
        "symm-mem on GPUs, the process group on the CPU",
    )
    parser.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="gen: read each step's tokens back before launching the next",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="seed of random weights and of unseeded sampling (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        type=api_key,
        default=os.environ.get("COSERVE_API_KEY") or None,  # set but empty reads as unset
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $COSERVE_API_KEY)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=seconds,
        default=5.0,
        metavar="S",
        help="on SIGTERM or Ctrl-C, seconds in-flight requests get to finish before they are "
        "aborted (default %(default)s)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log message written to stderr (default %(default)s)",
    )
    add_flag_groups(parser)


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def run(args) -> int:
    given = tokens_flag(args) if args.kind != "gen" else None
    why = misplaced(args, args.flag_kinds) or (given and batched_tokens_problem(*given))
    if why:
        print(f"coserve serve {args.kind}: {why}", file=sys.stderr)
        return 2
    why = cpu_threads_problem(args.cpu_threads)
    if why:
        print(f"coserve serve {args.kind}: {why}", file=sys.stderr)
        return 2
    if args.kind == "embed" and args.enforce_eager:
        print(
            "coserve serve embed: --enforce-eager does nothing for the embed engine (it has no "
            "CUDA-graph "
            "path and always runs eagerly); leave it out",
            file=sys.stderr,
        )
        return 2
    try:
        guard_config(args, 1)
    except ValueError as e:
        print(f"coserve serve {args.kind}: {e}", file=sys.stderr)
        return 2
    why = all_reduce_problem(
        args.tp_all_reduce, args.tensor_parallel_size, serve_device(args.device)
    )
    if why:
        print(f"coserve serve {args.kind}: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import asyncio

    from coserve.memcheck import serve_problem
    from coserve.server.app import bind_socket, serve
    from coserve.server.engine_client import EngineStartError, start_engine

    if args.kind == "colocated":
        return _run_colocated(args)
    too_big = serve_problem(
        args.model,
        serve_device(args.device),
        args.gpu_memory_utilization,
        args.tensor_parallel_size,
        args.dtype,
    )
    if too_big:  # before anything is allocated
        print(f"coserve serve: {too_big}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"coserve serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    # A SIGTERM while the model loads ends the process quietly (exit 0), as one while serving
    # does; start_engine takes the engine process down with it.
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        engine = start_engine(functools.partial(build_engine, args), args.log_level)
    except EngineStartError as e:
        print(f"coserve serve: {e}", file=sys.stderr)
        return e.exit_code

    opts = dataclasses.replace(
        _options(args, args.kind, args.served_model_name or [args.model], args.port),
        **guard_options(args, engine.max_model_len),
        profile_dir=args.profile_dir or "",
        profile_steps=args.profile_steps,
        profile_min_s=args.profile_min_seconds,
    )
    rc = asyncio.run(serve(engine, opts, sock))
    return _exit(rc)


def _options(args, kind: str, names: list[str], port: int):
    from coserve.server.app import ServeOptions

    return ServeOptions(
        kind=kind,
        served_names=names,
        host=args.host,
        port=port,
        api_key=args.api_key,
        shutdown_timeout_s=args.shutdown_timeout,
        access_log=args.access_log,
        limits=RequestLimits(
            max_embed_inputs=args.max_embed_inputs,
            max_gen_choices=args.max_gen_choices,
            max_body_bytes=args.max_request_bytes,
            max_prompt_chars=args.max_prompt_chars,
        ),
    )


def _run_colocated(args) -> int:
    from coserve.memcheck import serve_problem
    from coserve.server import colocated
    from coserve.server.app import bind_socket

    why = (
        colocated.problem(args, serve_device(args.device))
        or serve_problem(
            args.model, serve_device(args.device), args.gpu_memory_utilization, 1, args.dtype
        )
        or serve_problem(
            args.embed_model,
            serve_device(args.device),
            args.embed_gpu_memory_utilization,
            1,
            args.dtype,
        )
    )
    if why:
        print(f"coserve serve colocated: {why}", file=sys.stderr)
        return 2
    socks = {}
    for role, port in (("gen", args.port), ("embed", args.embed_port)):
        try:
            socks[role] = bind_socket(args.host, port)
        except OSError as e:
            print(
                f"coserve serve colocated: cannot listen on {args.host}:{port} ({role}): {e}",
                file=sys.stderr,
            )
            return 1
    signal.signal(signal.SIGTERM, _exit_quietly)
    opts = {
        "gen": _options(args, "gen", args.served_model_name or [args.model], args.port),
        "embed": _options(args, "embed", [args.embed_model], args.embed_port),
    }
    return _exit(colocated.run(args, opts, socks, build_engine))


def _exit(rc: int) -> int:
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if left:
        logging.getLogger("coserve.server").warning(
            "threads still running at exit: %s", ", ".join(left)
        )
    else:
        logging.getLogger("coserve.server").info("exiting with %d; no threads left", rc)
    return rc
