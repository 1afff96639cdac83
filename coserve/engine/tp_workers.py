"""The processes of ranks 1..N-1 of a tensor-parallel engine.

Rank 0 is the engine the server (or the offline benchmark) drives. Building it spawns the
other ranks, each of which builds only the model side of the engine on its own device
(engine/ranks.py: its shard of every weight, its kv heads' share of the cache, the same CUDA
graphs), then runs whatever rank 0 sends (engine/messages.py): each step's inputs as host-side
ints, pickled once and written to one pipe per worker, before rank 0 runs the same forward.
The collectives inside the forward keep the ranks in step; only rank 0 samples. A worker
does not wait for its step to end before it reads the next one: rank 0 may run one step
ahead (async scheduling), and the worker's GPU queue then holds the next step before the
current one ends, as rank 0's does.

A worker ends when rank 0 says so (`Workers.stop`, also run at exit), when its pipe closes,
or when rank 0 is gone (it checks its parent every second, which also frees a worker stuck
in a collective that will never complete); it leaves without a collective (communicators
aborted, not finalised), so no rank waits for another on the way out. Rank 0 watches its
workers: one that dies makes the step in progress (or the next) raise `WorkerDied`; unless
rank 0's engine has shut down within `DEAD_EXIT_S` of the death (stuck in a collective or a
wait on the GPU with the dead rank, or in the shutdown itself), its process writes every
thread's stack to stderr (not while the engine starts: rank 0 then waits in the group's
rendezvous) and exits 1. A step that has not finished after `STEP_TIMEOUT_S`
(a worker stopped with SIGSTOP, a collective that hangs) fails the engine the same way."""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp

from coserve.engine import parallel
from coserve.engine.cpu_threads import apply_cpu_threads
from coserve.engine.messages import Call, Sent, Stop
from coserve.engine.nccl_env import LOOPBACK_SOCKET_ENV, NO_MULTICAST_ENV, SOCKET_IFNAME_VARS
from coserve.engine.presets import hf_config, tp_split_problem
from coserve.engine.types import EngineArgs

log = logging.getLogger("coserve.engine")

DEAD_EXIT_S = 3.0
# A step (not the start-up) that has not finished after this long means a rank is stopped
# (SIGSTOP) or stuck in a collective: the engine is then failed as if a worker had died.
# Generous: a first step may compile Triton kernels for new shapes, seconds each.
STEP_TIMEOUT_S = 120.0
# worker counters, in a shared array rank 0 reads: steps, seconds spent waiting for rank 0's
# messages, seconds from rank 0's send to the worker's receive (sum and max)
_STEPS, _WAIT_S, _LAG_S, _LAG_MAX_S = range(4)


class WorkerDied(RuntimeError):
    """A rank of this tensor-parallel engine is gone; the engine cannot step any more."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU after rank 0's (CPU ranks all share the CPU)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class Workers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, procs: list, conns: list[Connection], counters) -> None:
        self.procs, self.conns = procs, conns
        self._counters = counters
        self._stopped = False
        self._closed = threading.Event()  # stop() has finished: the group is left
        self.dead: str | None = None  # why a worker is gone, once one is
        self._dead_said = None  # the worker whose exit `dead` names (a pipe error names none)
        self.step_started: float | None = None  # monotonic start of the step in progress
        # until the engine is built: rank 0 is then in the group's rendezvous or a start-up
        # collective, where a dead worker leaves it waiting and its stacks tell nothing new
        self.starting = True
        threading.Thread(target=self._watch, name="coserve-tp-watch", daemon=True).start()

    def send(self, msg) -> None:
        data = pickle.dumps(Sent(time.monotonic(), msg), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for c in self.conns:
                c.send_bytes(data)
        except OSError as e:
            # said before the watcher sees the exit, so a shutdown never waits on a GPU step
            # that waits in a collective for the dead rank
            self.dead = self.dead or f"a tensor-parallel worker died (its pipe: {e!r})"
            raise WorkerDied(self.dead) from e

    def counters(self) -> list[dict[str, float]]:
        """Per worker: steps received, seconds waiting for rank 0, send-to-receive lag."""
        out = []
        for i in range(len(self.procs)):
            c = self._counters[i * 4 : (i + 1) * 4]
            out.append(
                {
                    "steps": c[_STEPS],
                    "wait_s": c[_WAIT_S],
                    "lag_s": c[_LAG_S],
                    "lag_max_s": c[_LAG_MAX_S],
                }
            )
        return out

    def check(self, grace_s: float = 0.0) -> None:
        """Raise WorkerDied if a worker is gone (waiting up to grace_s for one that is dying:
        a failed collective can come before the worker's exit is seen)."""
        deadline = time.monotonic() + grace_s
        while self.dead is None:
            gone = [p for p in self.procs if not p.is_alive()]
            if gone:
                self._died(gone[0])
            elif time.monotonic() >= deadline:
                return
            else:
                time.sleep(0.02)
        raise WorkerDied(self.dead)

    def wait_gpu(self, done: torch.cuda.Event) -> None:
        """Wait for `done` as `done.synchronize()` would, but raise WorkerDied as soon as a
        worker is gone: a step's collective with a dead rank never completes, and a blocking
        wait on it could only be ended by the watcher's exit."""
        while not done.query():
            if self.dead is not None:
                raise WorkerDied(self.dead)
            time.sleep(0)  # yields the GIL; the step has ~ms left, a sleep's 60 us would show

    def _died(self, p) -> None:
        p.join(0.1)
        if self.dead is None or self._dead_said is None:
            self._dead_said = p
            self.dead = (
                f"tensor-parallel worker {p.name} (pid {p.pid}) died "
                f"(exit code {p.exitcode}); the engine cannot step any more"
            )
            log.error("%s", self.dead)

    def _stalled(self, for_s: float) -> None:
        self.dead = self.dead or (
            f"no tensor-parallel step finished in {for_s:.0f} s (a rank is stopped or stuck "
            "in a collective); the engine cannot step any more"
        )
        log.error("%s", self.dead)

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: p for p in self.procs}
        while True:
            gone = wait(list(by_sentinel), timeout=1.0)
            if self._stopped:
                return
            if gone:
                self._died(by_sentinel[gone[0]])
                break
            since = self.step_started
            if since is not None and time.monotonic() - since > STEP_TIMEOUT_S:
                self._stalled(time.monotonic() - since)
                break
        # Rank 0 may wait on the GPU for a collective with the dead rank (in a step, or in
        # the shutdown's sync), which nothing ends: past the deadline the process leaves.
        if self._closed.wait(DEAD_EXIT_S):
            return
        if self.starting:
            log.error(
                "the engine failed while starting (rank 0 waits in the group's rendezvous or "
                "a start-up collective for the rank that is gone); exiting"
            )
        else:
            stuck = self.step_started is not None
            where = "stuck in a step" if stuck else "between steps, not stopped"
            log.error(
                "rank 0 has not shut down %.0f s after the engine failed (%s; stacks follow); "
                "exiting",
                DEAD_EXIT_S,
                where,
            )
            faulthandler.dump_traceback(all_threads=True)
        logging.shutdown()
        os._exit(1)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask every worker to exit, wait for them, kill those that do not; leave the group."""
        if self._stopped:
            return
        self._stopped = True
        for c in self.conns:
            try:
                c.send_bytes(pickle.dumps(Sent(time.monotonic(), Stop())))
                c.close()
            except OSError:
                pass  # that worker is gone already
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("tensor-parallel worker %s did not exit; killing it", p.name)
                p.kill()
                p.join()
        parallel.destroy(abandon=self.dead is not None)
        self._closed.set()


def launch(build_rank: Callable, args: EngineArgs, device: torch.device) -> Workers | None:
    """On rank 0 of a TP engine: spawn ranks 1..N-1, each of which builds its rank with
    `build_rank(args, device)` (module-level, so that it pickles: `GenRank.build`,
    `EmbedRank.build`), and join the group with them. None when this engine is not tensor
    parallel."""
    n = args.tensor_parallel_size
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if parallel.state().size > 1:
        raise ValueError(
            "this process already runs a tensor-parallel engine (one per process: "
            "the ranks' state is process-wide)"
        )
    if n == 1:
        return None
    # before any rank starts: a size the heads cannot be split by (99999 started that many
    # processes, each failing alone) is refused once, here
    problem = tp_split_problem(hf_config(args.model), n)
    if problem:
        raise ValueError(problem)
    # rank 0 decides once: a worker, a fresh process, would resolve "auto" on its own
    args = replace(args, tp_all_reduce=parallel.resolve_all_reduce(args.tp_all_reduce, device, n))
    if device.type == "cuda" and (device.index or 0) + n > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {n} from {device} needs GPUs up to "
            f"cuda:{(device.index or 0) + n - 1}; {torch.cuda.device_count()} visible"
        )
    os.environ.update(NO_MULTICAST_ENV)  # the workers inherit both
    for key, value in LOOPBACK_SOCKET_ENV.items():
        os.environ.setdefault(key, value)
    beyond = {k: os.environ[k] for k in SOCKET_IFNAME_VARS if os.environ.get(k, "lo") != "lo"}
    if beyond:
        log.warning(
            "the tensor-parallel ranks' sockets follow %s from the environment, not loopback",
            ", ".join(f"{k}={v}" for k, v in beyond.items()),
        )
    # the group's store listens here, on loopback only (parallel.group_store)
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(n)
    port = listen.getsockname()[1]
    ctx = mp.get_context("spawn")
    counters = ctx.Array("d", 4 * (n - 1), lock=False)
    procs, conns = [], []
    for rank in range(1, n):
        recv, send = ctx.Pipe(duplex=False)
        wargs = replace(args, device=str(rank_device(device, rank)))
        p = ctx.Process(
            target=_worker_main,
            name=f"coserve-tp-rank{rank}",
            daemon=True,
            args=(build_rank, wargs, rank, port, recv, os.getpid(), counters),
        )
        p.start()
        recv.close()
        procs.append(p)
        conns.append(send)
    workers = Workers(procs, conns, counters)
    atexit.register(workers.stop)
    try:
        # a worker that dies before joining leaves this waiting: the watcher's exit ends it
        store = parallel.group_store(0, n, port, listen.detach())  # the store owns it now
        parallel.init(0, n, store, device, args.tp_all_reduce, args.enable_expert_parallel)
    except BaseException:
        workers.stop(timeout_s=1.0)
        raise
    log.info(
        "tensor parallel: %d ranks (workers %s), all-reduce %s%s",
        n,
        [p.pid for p in procs],
        args.tp_all_reduce if device.type == "cuda" else "gloo (the process group)",
        ", expert parallel" if args.enable_expert_parallel else "",
    )
    return workers


class LeadsRanks:
    """What both engines share as rank 0 of a tensor-parallel group: start the other ranks
    before building the model (they build theirs alongside), stop them on failure and on
    shutdown, and fail a step when one is gone. With TP=1 there are no ranks and these are
    no-ops."""

    workers: Workers | None = None

    def _start_leading(
        self, build_rank: Callable, args: EngineArgs, device: torch.device, start
    ) -> None:
        self.workers = launch(build_rank, args, device)
        try:
            with self._ranks_step(timed=False):  # the start-up runs collectives too
                start()
        except BaseException:
            self.shutdown()
            raise
        if self.workers is not None:
            self.workers.starting = False

    @contextmanager
    def _ranks_step(self, timed: bool = True) -> Iterator[None]:
        """Around a step: raises WorkerDied before it, or after it (its results are then
        garbage), when a rank is gone. A `timed` one fails the engine after STEP_TIMEOUT_S."""
        w = self.workers
        if w is None:
            yield
            return
        w.check()
        w.step_started = time.monotonic() if timed else None
        try:
            yield
        except Exception as e:
            # A ValueError is this rank's own refusal (a model TP cannot split): the other
            # ranks died of the same, and saying that instead would hide why.
            if not isinstance(e, WorkerDied | ValueError):
                w.check(grace_s=1.0)  # a collective that failed because a rank died
            raise
        finally:
            w.step_started = None
        w.check()

    def check_ranks(self) -> None:
        """Raise WorkerDied if a rank is gone (between steps; no-op at TP=1)."""
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        """Stop the other ranks (tensor parallel); nothing to do otherwise."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None


def _watch_parent(parent_pid: int) -> None:
    # The kernel kills this worker when rank 0's process goes, even while the worker is
    # stopped (SIGSTOP) or stuck, which the poll below cannot see to; the poll covers a rank 0
    # gone before the prctl.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the poll alone
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="coserve-tp-parent-watch", daemon=True).start()


def _messages(conn: Connection, counters, slot: int) -> Iterator:
    c = counters
    base = slot * 4
    while True:
        t0 = time.monotonic()
        try:
            got: Sent = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if isinstance(got.msg, Stop):
            return
        now = time.monotonic()
        c[base + _STEPS] += 1
        c[base + _WAIT_S] += now - t0
        c[base + _LAG_S] += now - got.at
        c[base + _LAG_MAX_S] = max(c[base + _LAG_MAX_S], now - got.at)
        yield got.msg


def _worker_main(
    build_rank: Callable,
    args: EngineArgs,
    rank: int,
    store_port: int,
    conn: Connection,
    parent_pid: int,
    counters,
) -> None:
    _watch_parent(parent_pid)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    device = torch.device(args.device)
    if device.type == "cpu":
        apply_cpu_threads(args, None)
    else:
        torch.cuda.set_device(device)
    parallel.init(
        rank,
        args.tensor_parallel_size,
        parallel.group_store(rank, args.tensor_parallel_size, store_port),
        device,
        args.tp_all_reduce,
        args.enable_expert_parallel,
    )
    try:
        here = build_rank(args, device)
    except ValueError as e:  # rank 0 refuses the same model and says so; no traceback here
        log.error("%s", e)
        raise SystemExit(1) from None
    for msg in _messages(conn, counters, rank - 1):
        if isinstance(msg, Call):
            msg.fn(here, *msg.args)
        else:
            here.run(msg)
    # leave at once: no collective on the way out (rank 0 may be gone or elsewhere), and
    # nothing here needs Python's teardown (CUDA graphs, communicators)
    logging.shutdown()
    os._exit(0)
