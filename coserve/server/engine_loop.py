"""The engine's step loop in a thread of its own, so HTTP work never starves it.

Requests go in through a thread-safe queue, drained between steps; the outputs of a whole
step come back to the event loop in one `call_soon_threadsafe`, which hands each output to
the RequestStream of the HTTP request that owns it. Only the engine thread touches the
engine (engines are single-threaded); only the event loop touches the streams."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from coserve.server.errors import Aborted, ApiError

log = logging.getLogger("coserve.server")


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


class EngineLoop:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop, idle_poll_s: float = 0.5,
                 stats_interval_s: float = 0.05):
        self.engine = engine
        self._loop = loop
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._adding: set[asyncio.Future] = set()  # adds the engine thread has not answered yet
        self._idle_poll_s = idle_poll_s
        self._stats_interval_s = stats_interval_s
        self._stats_at = 0.0
        self.stats: dict = dict(engine.stats())  # latest snapshot, replaced whole by the engine thread
        self.steps = 0
        self.error: BaseException | None = None
        self.dead = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="coserve-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def add(self, requests: list[tuple], stream: RequestStream) -> None:
        """Add engine requests `(request_id, *add_request_args)` as one unit: all or none.
        The engine's ValueError (input it cannot serve) becomes a 400."""
        if not self.alive:
            raise ApiError("the engine is not running", status=503)
        for r in requests:
            self._streams[r[0]] = stream
        done = self._loop.create_future()
        self._adding.add(done)
        self._cmds.put(("add", requests, done))
        ids = [r[0] for r in requests]
        try:
            await done
        except asyncio.CancelledError:  # client gone: the add may still land, so abort after it
            self.abort(ids)
            raise
        except ValueError as e:
            self.abort(ids)
            raise ApiError(str(e)) from e
        except ApiError:
            raise
        except Exception as e:
            self.abort(ids)
            raise ApiError(f"the engine could not take the request: {e!r}", status=500) from e
        finally:
            self._adding.discard(done)

    def abort(self, request_ids) -> None:
        ids = list(request_ids)
        for rid in ids:
            self._streams.pop(rid, None)
        if ids:
            self._cmds.put(("abort", ids, None))

    def abort_all(self, error: ApiError | None = None) -> int:
        """End every request in flight (server shutting down); returns how many streams."""
        streams = set(self._streams.values())
        self.abort(list(self._streams))
        for s in streams:
            s.fail(error or Aborted())
        return len(streams)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Ask the thread to finish its step and exit; True when it has."""
        self._cmds.put(("stop", None, None))
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _deliver(self, outputs: list) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if getattr(out, "finished", True):
                del streams[out.request_id]
            stream.push(out)

    def _resolve(self, acks: list) -> None:
        for fut, err in acks:
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def _on_death(self, error: BaseException) -> None:
        failure = ApiError(f"the engine failed: {error!r}", status=500)
        for fut in self._adding:
            if not fut.done():
                fut.set_exception(failure)
        self.abort_all(failure)
        self.dead.set()

    # ---- engine thread ---------------------------------------------------------------------
    def _post(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # event loop already closed: nobody is listening any more
            pass

    def _apply(self, cmds: list) -> bool:
        """Apply queued commands; True when told to stop."""
        engine = self.engine
        acks = []
        for kind, arg, done in cmds:
            if kind == "stop":
                return True
            if kind == "abort":
                for rid in arg:
                    try:
                        engine.abort(rid)
                    except Exception:  # an id the engine already finished or never took
                        log.debug("abort of %s ignored", rid, exc_info=True)
                continue
            err = None
            added = []
            for rid, *args in arg:
                try:
                    engine.add_request(rid, *args)
                except Exception as e:  # all or none: take back what went in
                    err = e
                    for prev in added:
                        engine.abort(prev)
                    break
                added.append(rid)
            acks.append((done, err))
        if acks:
            self._post(self._resolve, acks)
        return False

    def _run(self) -> None:
        engine = self.engine
        cmds = self._cmds
        try:
            while True:
                batch = []
                if not engine.has_unfinished():
                    try:
                        batch.append(cmds.get(timeout=self._idle_poll_s))
                    except queue.Empty:
                        pass
                while True:
                    try:
                        batch.append(cmds.get_nowait())
                    except queue.Empty:
                        break
                if batch and self._apply(batch):
                    return
                if engine.has_unfinished():
                    outputs = engine.step()
                    self.steps += 1
                    if outputs:
                        self._post(self._deliver, outputs)
                now = time.monotonic()
                if now - self._stats_at >= self._stats_interval_s or not engine.has_unfinished():
                    self._stats_at = now
                    self.stats = dict(engine.stats())
        except BaseException as e:
            log.exception("engine loop died")
            self.error = e
            self._post(self._on_death, e)
