"""`coserve serve colocated`: gen and embed engines in ONE engine process (one CUDA context),
each behind its own OpenAI endpoint as `coserve serve gen` and `serve embed` give them, so
`coserve bench` and every client work unchanged.

The engine process builds gen first (its memory budget is measured with nothing else
loaded), then embed, and runs each engine's step loop (engine_core.serve_pipe) in a thread of
its own. On CUDA each thread issues its work on a stream of its own: gen's at the device's
highest priority, embed's at the lowest, so the GPU's scheduler starts decode's kernels ahead
of embed's whenever both wait. With `--embed-sms M`, embed's stream is that of a CUDA green
context of M SMs instead (torch.cuda.green_contexts): embed's kernels stay on those SMs while
gen's may use all; refused, with the reason, where this torch or device has none. With
`--gen-sms N` as well, gen is confined too, to N SMs disjoint from embed's (sm_partition.py,
through the CUDA driver API): the split is made first, before either model loads, and each
engine is built with its own stream current, so gen's CUDA graphs are captured in gen's green
context and keep to its SMs. On CPU there are no streams; the two loops still share one
process (what the CPU tests exercise). The HTTP fronts of both run in one process too.

Stop: SIGTERM/SIGINT drain both fronts, then both loops stop and the engine process exits."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import logging
import multiprocessing
import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Any

from coserve.engine.host_gc import quiet_gc
from coserve.engine.messages import Failed
from coserve.server import engine_core, sm_partition
from coserve.server.engine_build import serve_device
from coserve.server.engine_client import (
    EngineClient,
    EngineStartError,
    _reap,
    read_ready,
    start_holding_signals,
)
from coserve.server.serve_flags import guard_options

log = logging.getLogger("coserve.server")

ROLES = ("gen", "embed")
HIGHEST_PRIORITY = -16  # torch maps a priority outside the device's range to its nearest end


def green_context_problem(device: str) -> str | None:
    """Why `--embed-sms` cannot be given here, or None (this torch has green contexts)."""
    import torch

    if not device.startswith("cuda"):
        return f"--embed-sms: green contexts are a CUDA feature; the device is {device}"
    gc = getattr(torch.cuda, "green_contexts", None)
    if gc is None or not getattr(gc, "SUPPORTED", False):
        return (
            f"--embed-sms: this torch ({torch.__version__}) was not built with CUDA green contexts"
        )
    return None


@dataclass(frozen=True)
class SmFlags:
    """`--embed-sms` and `--gen-sms` (None: not given) and the device whose SMs they share."""

    embed: int | None = None
    gen: int | None = None
    device: str = "cuda"


@dataclass(frozen=True)
class LoopStreams:
    """Each loop's CUDA stream (None on CPU) and, with `--embed-sms`, what owns the green
    context(s) the streams belong to (torch's GreenContext, or an SmPartition): the driver
    destroys a green context once its Python object is collected, and with it every stream
    made from it, so this record holds it while the loops run."""

    streams: dict[str, Any]
    green_context: Any = None


def _streams(
    engines: dict, embed_sms: int | None, partition: sm_partition.SmPartition | None = None
) -> LoopStreams:
    """Gen's stream at the highest priority; embed's at the lowest, or, with `embed_sms`, the
    stream of a green context of that many SMs (gen keeps every SM); with a `partition`
    (`--gen-sms`), its two disjoint green contexts' streams; no streams on CPU.
    Raises ValueError when `embed_sms` does not fit the device."""
    import torch

    if partition is not None:  # sm_partition.split logged the counts and priorities
        return LoopStreams({r: partition.stream(r) for r in ROLES}, partition)
    device = getattr(engines["gen"], "device", None)
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return LoopStreams(dict.fromkeys(ROLES))
    out = {"gen": torch.cuda.Stream(device=device, priority=HIGHEST_PRIORITY)}
    if embed_sms:
        total = torch.cuda.get_device_properties(device).multi_processor_count
        if not 0 < embed_sms < total:
            raise ValueError(
                f"--embed-sms: {embed_sms} is not between 1 and {total - 1} (this GPU has {total} "
                "SMs)"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        green = torch.cuda.green_contexts.GreenContext.create(num_sms=embed_sms, device_id=index)
        # Work runs inside the partition only on the green context's own stream.
        out["embed"] = green.Stream()
        log.info(
            "colocated: gen on a stream of priority %d over all %d SMs, embed on a green context "
            "of %d SMs",
            out["gen"].priority,
            total,
            embed_sms,
        )
        return LoopStreams(out, green)
    out["embed"] = torch.cuda.Stream(device=device, priority=0)
    log.info(
        "colocated: gen on a stream of priority %d, embed on %d (lower runs first)",
        out["gen"].priority,
        out["embed"].priority,
    )
    return LoopStreams(out)


def _serve_on(engine, conn, stream) -> None:
    import torch

    if stream is not None:
        torch.cuda.set_device(stream.device)  # the current device is per thread, as the stream is
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        engine_core.serve_pipe(engine, conn)


def _building_on(partition: sm_partition.SmPartition | None, role: str):
    """With a partition, `role`'s stream current while its engine is built (gen's CUDA graphs
    are captured on it, in its green context); else nothing."""
    if partition is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(partition.stream(role))


def core(factories: dict, conns: dict, log_level: str = "INFO", sms: SmFlags = SmFlags()) -> None:
    """Process entry point: with `sms.gen`, split the SMs first; build gen then embed, then
    serve both pipes, one thread each. A failure to build either, or SM counts that do not
    fit, fails both (each front hears why)."""
    engine_core.start_process(log_level)
    engines = {}
    partition = None

    def fail(message: Failed) -> None:
        for conn in conns.values():
            try:
                engine_core._send(conn, message)
            except OSError:  # the front stops at the first Failed and closes the other pipe
                pass
        for e in engines.values():
            e.shutdown()
        if partition is not None:
            partition.close()

    if sms.gen is not None:
        try:
            partition = sm_partition.split(sms.device, sms.embed, sms.gen)
        except ValueError as e:
            return fail(Failed(str(e), 2))
        except RuntimeError as e:  # the driver refused a step of the split
            log.exception("colocated: no SM split")
            return fail(Failed(f"colocated: cannot split the SMs: {e}", 1))
    for role in ROLES:
        with _building_on(partition, role):
            engine, failed = engine_core.build(factories[role])
        if failed is not None:
            return fail(failed._replace(message=f"{role}: {failed.message}"))
        engines[role] = engine
    try:
        streams = _streams(engines, sms.embed, partition)
    except ValueError as e:
        return fail(Failed(str(e), 2))
    except RuntimeError as e:  # the driver refused the stream or the green context
        log.exception("colocated: no streams")
        return fail(Failed(f"colocated: cannot make the CUDA streams: {e}", 1))
    try:
        for role in ROLES:
            engine_core._send(conns[role], engine_core.ready(engines[role]))
        quiet_gc()
        threads = [
            threading.Thread(
                target=_serve_on,
                args=(engines[r], conns[r], streams.streams[r]),
                name=f"coserve-{r}-loop",
            )
            for r in ROLES
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in engines.values():
            e.shutdown()
        if partition is not None:
            partition.close()


def start_engines(
    factories: dict, log_level: str = "INFO", sms: SmFlags = SmFlags()
) -> dict[str, EngineClient]:
    """Spawn the one engine process, block until both engines are loaded -> role ->
    EngineClient (both on the same process). Raises EngineStartError with the core's message."""
    ctx = multiprocessing.get_context("spawn")
    pipes = {r: ctx.Pipe(duplex=True) for r in ROLES}
    proc = ctx.Process(
        target=core,
        args=(factories, {r: p[1] for r, p in pipes.items()}, log_level, sms),
        name="coserve-engine-core",
        daemon=False,
    )
    deliver = start_holding_signals(proc)
    atexit.register(_reap, proc, 0)
    for _, theirs in pipes.values():
        theirs.close()
    infos = {}
    try:
        deliver()
        for role, (ours, _) in pipes.items():
            infos[role] = read_ready(ours, proc)
    except BaseException as e:
        for ours, _ in pipes.values():
            ours.close()
        # The core said why and is on its way out; a SIGTERM/Ctrl-C abandons the load, and
        # a core left to finish it would die on its `ready` to a closed pipe (a traceback).
        _reap(proc, 5.0 if isinstance(e, EngineStartError) else 0)
        raise
    return {r: EngineClient(proc, pipes[r][0], infos[r]) for r in ROLES}


async def serve_both(engines: dict[str, EngineClient], opts: dict, socks: dict) -> int:
    """Both fronts on their sockets until SIGTERM/SIGINT (exit 0) or until either loop dies
    (exit 1); then both drain together and the engine process stops."""
    from aiohttp import web

    from coserve.server.app import OpenAIServer, end_guard, ready_line, start_guard
    from coserve.server.http_errors import JsonErrorRunner

    loop = asyncio.get_running_loop()
    fronts = []
    for role in ROLES:
        await engines[role].attach()
        server = OpenAIServer(engines[role], opts[role])
        runner = JsonErrorRunner(
            server.make_app(),
            handler_cancellation=True,
            shutdown_timeout=1.0,
            access_log=logging.getLogger("aiohttp.access") if opts[role].access_log else None,
        )
        await runner.setup()
        site = web.SockSite(runner, socks[role], backlog=4096)
        await site.start()
        host, port = socks[role].getsockname()[:2]
        print(
            ready_line(opts[role], engines[role], f"[{host}]" if ":" in host else host, port),
            flush=True,
        )
        fronts.append((server, site, runner))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait())] + [
        asyncio.ensure_future(e.dead.wait()) for e in engines.values()
    ]
    guards = [(server, start_guard(server, stop)) for server, _, _ in fronts]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    for server, task in guards:
        end_guard(server, task)
    rc = 0 if stop.is_set() else 1
    log.info("shutting down (%s)", "signal" if rc == 0 else "an engine loop failed")
    # Together: each front's stop waits for the one process, which ends when both loops have.
    stopped = await asyncio.gather(
        *(server.shutdown(site, runner) for server, site, runner in fronts)
    )
    if not all(stopped):  # the engine process had to be killed: no clean stop
        rc = 1
    log.info("stopped")
    return rc


def engine_args(args) -> dict[str, argparse.Namespace]:
    """role -> the `coserve serve` arguments its engine is built from."""
    embed = {
        "kind": "embed",
        "model": args.embed_model,
        "gpu_memory_utilization": args.embed_gpu_memory_utilization,
        "max_model_len": args.embed_max_model_len,
        "max_num_seqs": args.embed_max_num_seqs,
        "max_num_batched_tokens": args.embed_max_num_batched_tokens,
        "tokens_flag": "--embed-max-num-batched-tokens",
        "enforce_eager": False,
        "shared_process": True,
    }
    return {
        "gen": argparse.Namespace(**{**vars(args), "kind": "gen", "shared_process": True}),
        "embed": argparse.Namespace(**{**vars(args), **embed}),
    }


def problem(args, device: str) -> str | None:
    """Why these arguments cannot make a colocated server on `device` (cpu, cuda, cuda:N), or
    None."""
    if not args.embed_model:
        return "colocated needs --embed-model (the embedding model served beside --model)"
    if args.tensor_parallel_size != 1:
        return "colocated serves one GPU: --tensor-parallel-size must be 1"
    if args.embed_port == args.port != 0:
        return f"--embed-port: {args.port} is --port too; each endpoint needs a port of its own"
    if args.gen_sms is not None:
        return sm_partition.problem(args.embed_sms, device)
    if args.embed_sms is not None:
        return green_context_problem(device)
    return None


def run(args, opts: dict, socks: dict, build_engine) -> int:
    """`coserve serve colocated` once the sockets are bound: start, serve, exit status.
    `build_engine(args)` builds one engine from `coserve serve` arguments (command.py's).
    With --slo-guard-gen-url the embed front runs the SLO guard (its own gen front's URL
    makes the guard hold this process's gen)."""
    factories = {r: functools.partial(build_engine, a) for r, a in engine_args(args).items()}
    try:
        sms = SmFlags(args.embed_sms, args.gen_sms, serve_device(args.device))
        engines = start_engines(factories, args.log_level, sms)
    except EngineStartError as e:
        print(f"coserve serve colocated: {e}", file=sys.stderr)
        return e.exit_code
    # the guard's flags were checked before the start; its token bound needs embed's engine
    embed = replace(opts["embed"], **guard_options(args, engines["embed"].max_model_len))
    return asyncio.run(serve_both(engines, {**opts, "embed": embed}, socks))
