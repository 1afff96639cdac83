"""The HTTP front's side of the engine core (engine_core.py): starts the process, waits for
it to load the model, then talks to it over the pipe from the event loop.

Commands issued during one turn of the event loop go out as one message; each message
from the core carries the outputs of one whole step, handed to the RequestStream of the HTTP
request that owns each output. Only the event loop touches the streams."""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

from coserve.engine.messages import (
    Abort,
    Add,
    Allow,
    EmbedOut,
    Failed,
    GenOutputs,
    NewEmbed,
    NewGen,
    Profile,
    Ready,
    Step,
    Stop,
)
from coserve.server import engine_core
from coserve.server.errors import Aborted, ApiError

log = logging.getLogger("coserve.server")


class EngineStartError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RequestStream:
    """Engine outputs for one HTTP request (one or more engine requests), in arrival order."""

    __slots__ = ("items", "waiter", "error")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.error: ApiError | None = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def push(self, output) -> None:
        self.items.append(output)
        self._wake()

    def fail(self, error: ApiError) -> None:
        self.error = error
        self._wake()

    async def next_batch(self) -> list:
        """Every output that arrived since the last call (waits for at least one). Raises the
        stream's error once its outputs are all taken."""
        while not self.items and self.error is None:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if not self.items:
            raise self.error
        items, self.items = self.items, []
        return items


HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def start_holding_signals(proc) -> Callable[[], None]:
    """`proc.start()` with SIGTERM and SIGINT held until it returns, and a function that
    delivers a held one to its handler (call it where the caller cleans up after a signal).

    A spawned process reads its start-up data from the parent inside `start()`: a handler
    that raised in the middle (SystemExit from `coserve serve`'s SIGTERM) left the child an
    "EOFError: Ran out of input" traceback. Off the main thread, where handlers cannot be
    set, it only starts."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return lambda: None
    held: list[int] = []
    handlers = {s: signal.signal(s, lambda n, _f: held.append(n)) for s in HELD_SIGNALS}
    try:
        proc.start()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    def deliver() -> None:
        if held and callable(handlers[held[0]]):
            handlers[held[0]](held[0], None)
        elif held:  # SIG_DFL or SIG_IGN: the disposition itself, as if it had come now
            signal.raise_signal(held[0])

    return deliver


def start_engine(factory, log_level: str = "INFO") -> EngineClient:
    """Spawn the engine core (CUDA needs `spawn`), block until it has loaded the model.
    Raises EngineStartError with the core's message; the core is gone by then."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=engine_core.run,
        args=(factory, theirs, log_level),
        name="coserve-engine-core",
        # Not daemonic: with tensor parallelism the core starts the other ranks, and daemonic
        # processes may not have children. It still dies with us (PDEATHSIG, pipe EOF), and
        # the atexit hook keeps multiprocessing's exit-time join from waiting on it.
        daemon=False,
    )
    deliver = start_holding_signals(proc)
    atexit.register(_reap, proc, 0)
    theirs.close()
    try:
        deliver()
        msg = read_ready(ours, proc)
    except EngineStartError:  # the core said why and is on its way out
        ours.close()
        _reap(proc)
        raise
    except BaseException:  # SIGTERM/Ctrl-C while loading: the load is abandoned
        ours.close()
        _reap(proc, 0)
        raise
    return EngineClient(proc, ours, msg)


def read_ready(conn, proc) -> Ready:
    """The core's first message on `conn`: its `Ready`. Raises EngineStartError with the
    core's `Failed` message, or with its exit code when it died without one."""
    try:
        msg = pickle.loads(conn.recv_bytes())
    except EOFError:
        proc.join(5)
        raise EngineStartError(
            f"the engine process exited with code {proc.exitcode} while loading", 1
        ) from None
    if isinstance(msg, Failed):
        raise EngineStartError(msg.message, msg.exit_code)
    return msg


def _reap(proc, timeout_s: float = 5.0) -> None:
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


class EngineClient:
    def __init__(self, proc, conn, ready: Ready):
        self._proc = proc
        self._conn = conn
        self.model_name = ready.model_name
        self.max_model_len = ready.max_model_len
        self.dim = ready.dim
        self.tokenizer = ready.tokenizer
        self.eos_token_ids = ready.eos_token_ids
        self.stats = ready.stats  # latest snapshot from the core
        self.steps = 0
        self.error: str | None = None
        self.dead = asyncio.Event()
        self._streams: dict[str, RequestStream] = {}
        self._adding: dict[int, asyncio.Future] = {}  # adds the core has not answered yet
        self._next_add = 0
        self._outbox: list = []
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------
    async def attach(self) -> None:
        """Start talking to the core from the running event loop."""
        sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        reader, self._writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        self._reader_task = asyncio.ensure_future(self._read(reader))

    @property
    def alive(self) -> bool:
        return self.error is None and not self.dead.is_set()

    async def stop(self, timeout_s: float = 30.0) -> bool:
        """Ask the core to finish its step and exit; True when it has (else it is killed)."""
        self._stopping = True
        if self._writer is not None and not self._writer.is_closing():
            self._outbox.append(Stop())
            self._flush()
        elif self._writer is None:  # never attached: no event-loop writer to send it with
            try:
                self._conn.send_bytes(pickle.dumps([Stop()]))
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        while self._proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stopped = not self._proc.is_alive()
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._conn.close()
        _reap(self._proc, 0 if not stopped else 5)
        return stopped

    # ---- requests ------------------------------------------------------------------------
    async def add(
        self,
        requests: list[NewGen] | list[NewEmbed],
        stream: RequestStream,
        param: str | None = None,
    ) -> None:
        """Add engine requests as one unit: all or none.
        The engine's ValueError (input it cannot serve, e.g. a token id out of the
        vocabulary) becomes a 400 naming `param`, the request field the input came from."""
        if not self.alive:
            raise ApiError("the engine is not running", status=503)
        for r in requests:
            self._streams[r.request_id] = stream
        add_id = self._next_add
        self._next_add += 1
        done = asyncio.get_running_loop().create_future()
        self._adding[add_id] = done
        self._send(Add(add_id, requests))
        ids = [r.request_id for r in requests]
        try:
            err = await done
        except asyncio.CancelledError:  # client gone: the add may still land, so abort after it
            self.abort(ids)
            raise
        finally:
            self._adding.pop(add_id, None)
        if err is not None:
            self.abort(ids)
            if err.kind == "value":
                raise ApiError(err.message, param=param)
            raise ApiError(f"the engine could not take the request: {err.message}", status=500)

    def abort(self, request_ids) -> None:
        ids = list(request_ids)
        for rid in ids:
            self._streams.pop(rid, None)
        if ids and self.alive:
            self._send(Abort(ids))

    def allow(self, allowance) -> None:
        """Hand the SLO guard's Allowance (slo_guard.py) to the embed engine core."""
        if self.alive:
            self._send(Allow(allowance.tokens_per_forward, allowance.pause_s, allowance.hold))

    def control(self, cmd: Profile) -> None:
        """Send the core a control message (engine/messages.py), e.g. `Profile("stop")`."""
        if self.alive:
            self._send(cmd)

    def abort_all(self, error: ApiError | None = None) -> int:
        """End every request in flight (server shutting down), those whose add the core has
        not acknowledged yet too (a core stuck in a step); returns how many streams."""
        failure = error or Aborted()
        for fut in self._adding.values():
            if not fut.done():
                fut.set_exception(failure)
        streams = set(self._streams.values())
        self.abort(list(self._streams))
        for s in streams:
            s.fail(failure)
        return len(streams)

    # ---- the pipe ------------------------------------------------------------------------
    def _send(self, cmd: Add | Abort | Allow) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(cmd)

    def _flush(self) -> None:
        if not self._outbox or self._writer is None or self._writer.is_closing():
            return
        payload = pickle.dumps(self._outbox, protocol=pickle.HIGHEST_PROTOCOL)
        self._outbox = []
        self._writer.write(_frame(payload))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                n = struct.unpack("!i", await reader.readexactly(4))[0]
                if n == -1:
                    n = struct.unpack("!Q", await reader.readexactly(8))[0]
                msg = pickle.loads(await reader.readexactly(n))
                if isinstance(msg, Step):
                    self._on_step(msg)
                else:
                    self._on_death(f"the engine failed: {msg.message}")
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self._stopping:
                self._proc.join(1)
                self._on_death(f"the engine process exited (code {self._proc.exitcode})")

    def _on_step(self, step: Step) -> None:
        self.steps = step.steps
        if step.stats is not None:
            self.stats = step.stats
        adding = self._adding
        for ack in step.acks:
            fut = adding.get(ack.add_id)
            if fut is not None and not fut.done():
                fut.set_result(ack.error)
        streams = self._streams
        outputs = step.outputs
        for out in outputs.rows() if isinstance(outputs, GenOutputs) else outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if isinstance(out, EmbedOut) or out.finished:
                del streams[out.request_id]
            stream.push(out)

    def _on_death(self, message: str) -> None:
        log.error("%s", message)
        self.error = message
        self.abort_all(ApiError(message, status=500))
        self.dead.set()


def _frame(payload: bytes) -> bytes:
    """multiprocessing.Connection's framing, which the core reads with recv_bytes."""
    n = len(payload)
    if n > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, n) + payload
    return struct.pack("!i", n) + payload
