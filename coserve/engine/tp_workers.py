"""The processes of ranks 1..N-1 of a tensor-parallel engine.

Rank 0 is the engine the server (or the offline benchmark) drives. Building it spawns the
other ranks, each of which builds the same engine on its own device (its shard of every
weight, its kv heads' share of the cache, the same CUDA graphs), then runs whatever rank 0
sends: each step's inputs as host-side ints, pickled once and written to one pipe per worker,
before rank 0 runs the same forward. The collectives inside the forward keep the ranks in
step; only rank 0 samples.

A worker ends when rank 0 says so (`Workers.stop`, also run at exit), when its pipe closes,
or when rank 0 is gone (it checks its parent every second, which also frees a worker stuck
in a collective that will never complete)."""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp

from coserve.engine import parallel
from coserve.engine.types import EngineArgs
from coserve.gpu.strategies import BASE_ENV

log = logging.getLogger("coserve.engine")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU after rank 0's (CPU ranks all share the CPU)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, procs: list, conns: list[Connection]) -> None:
        self.procs, self.conns = procs, conns
        self._stopped = False

    def send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for c in self.conns:
            c.send_bytes(data)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every worker to exit, wait for them, kill those that do not; leave the group."""
        if self._stopped:
            return
        self._stopped = True
        for c in self.conns:
            try:
                c.send_bytes(pickle.dumps(None))
                c.close()
            except OSError:
                pass  # that worker is gone already
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                log.warning("tensor-parallel worker %s did not exit; killing it", p.name)
                p.kill()
                p.join()
        parallel.destroy()


def launch(kind: str, args: EngineArgs, device: torch.device) -> Workers | None:
    """On rank 0 of a TP engine: spawn ranks 1..N-1 and join the group with them. None when
    this engine is not tensor parallel, or is itself a worker."""
    n = args.tensor_parallel_size
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    here = parallel.state()
    if here.rank > 0:
        return None  # a worker's engine: its rank 0 started it
    if here.size > 1:
        raise ValueError("this process already runs a tensor-parallel engine (one per process: "
                         "the ranks' state is process-wide)")
    if n == 1:
        return None
    if device.type == "cuda" and (device.index or 0) + n > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {n} from {device} needs GPUs up to "
                         f"cuda:{(device.index or 0) + n - 1}; {torch.cuda.device_count()} visible")
    # NCCL's NVLink multicast stays off in every process coserve starts (strategies.py says
    # why); the workers inherit it
    os.environ.update(BASE_ENV)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, n):
        recv, send = ctx.Pipe(duplex=False)
        wargs = replace(args, device=str(rank_device(device, rank)))
        p = ctx.Process(target=_worker_main, name=f"coserve-tp-rank{rank}", daemon=True,
                        args=(kind, wargs, rank, init_method, recv, os.getpid()))
        p.start()
        recv.close()
        procs.append(p)
        conns.append(send)
    workers = Workers(procs, conns)
    atexit.register(workers.stop)
    try:
        parallel.init(0, n, init_method, device)
    except BaseException:
        workers.stop(timeout_s=1.0)
        raise
    log.info("tensor parallel: %d ranks (workers %s)", n, [p.pid for p in procs])
    return workers


class LeadsRanks:
    """What both engines share as rank 0 of a tensor-parallel group: start the other ranks
    before building the model (they build theirs alongside), stop them on failure and on
    shutdown. With TP=1 there are no ranks and both are no-ops."""

    workers: Workers | None = None

    def _start_leading(self, kind: str, args: EngineArgs, device: torch.device, start) -> None:
        self.workers = launch(kind, args, device)
        try:
            start()
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the other ranks (tensor parallel); nothing to do otherwise."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="coserve-tp-parent-watch", daemon=True).start()


def _messages(conn: Connection) -> Iterator:
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if msg is None:
            return
        yield msg


def _worker_main(kind: str, args: EngineArgs, rank: int, init_method: str, conn: Connection,
                 parent_pid: int) -> None:
    _watch_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tensor_parallel_size))
    else:
        torch.cuda.set_device(device)
    parallel.init(rank, args.tensor_parallel_size, init_method, device)
    if kind == "gen":
        from coserve.engine.gen_engine import GenEngine

        engine = GenEngine(args)
    else:
        from coserve.engine.embed_engine import EmbedEngine

        engine = EmbedEngine(args)
    for msg in _messages(conn):
        engine.worker_step(msg)
    parallel.destroy()
