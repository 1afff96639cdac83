"""Load against an OpenAI-compatible generative and embedding endpoint at once.

Each endpoint runs closed-loop (C workers, each sending its next request when the last one
ends) or open-loop (requests sent at a rate on a seeded schedule, at most C in flight); see
workers.py. Both endpoints start together at t0; the measurement window is
[t0 + warmup, t0 + warmup + duration). At the window's end every request still in flight is
cancelled: what it delivered inside the window has already been counted by arrival time.
An endpoint that answers nothing but connection errors for a second, or nothing at all
for `stall_s` while requests are in flight, ends the run (`EndpointDead`); the run also
fails at the window's end for one silent over its last `silent_end_s` seconds (half the
window, 2 to stall_s), or that answered nothing inside the window although requests were sent to it.

The module's parts: records.py (result types), output.py (files), client.py (HTTP), sse.py
(the streamed-answer counter), arrivals.py (schedules), workers.py (requests and loops),
metrics.py (records -> summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import gc
import time
from collections.abc import Callable

import aiohttp

from coserve.bench.client import BenchError, resolve_model
from coserve.bench.config import WATCH_S, LoadConfig
from coserve.bench.metrics import nothing_answered
from coserve.bench.output import write_result
from coserve.bench.records import BenchResult, EndpointRun, Progress
from coserve.bench.workers import LoadRun

__all__ = [
    "BenchError",
    "BenchResult",
    "BenchStopped",
    "EndpointDead",
    "EndpointRun",
    "Progress",
    "loop_factory",
    "run_load",
    "run_sync",
    "write_result",
]

perf_counter = time.perf_counter


class BenchStopped(BenchError):
    """`stop` was set before any load was sent: nothing was measured."""


class EndpointDead(BenchError):
    """An endpoint answered nothing but connection errors for a second, or nothing at all
    for `stall_s` or inside the whole window: the run failed. `result` holds what was
    measured until then (marked `aborted`)."""

    def __init__(self, message: str, result: BenchResult):
        super().__init__(message)
        self.result = result


async def _progress_loop(run: LoadRun, on_progress: Callable[[Progress], None], interval: float):
    gen, embed = run.gen, run.embed
    last_t = perf_counter()
    last_g = gen.tokens_total if gen else 0
    last_e = embed.tokens_total if embed else 0
    total = run.we - run.t0
    while True:
        await asyncio.sleep(interval)
        t = perf_counter()
        g = gen.tokens_total if gen else 0
        e = embed.tokens_total if embed else 0
        dt = max(t - last_t, 1e-9)
        on_progress(
            Progress(
                phase="warmup" if t < run.ws else ("measure" if t < run.we else "done"),
                elapsed_s=t - run.t0,
                total_s=total,
                gen_tok_s=(g - last_g) / dt if gen else None,
                embed_seq_s=(e - last_e) / dt if embed else None,
                gen_in_flight=gen.in_flight if gen else 0,
                embed_in_flight=embed.in_flight if embed else 0,
                gen_completed=gen.completed_total if gen else 0,
                embed_completed=embed.completed_total if embed else 0,
                gen_failed=gen.failed_total if gen else 0,
                embed_failed=embed.failed_total if embed else 0,
            )
        )
        last_t, last_g, last_e = t, g, e


def loop_factory(kind: str = "auto"):
    """A new-event-loop function: uvloop's when `kind` is "uvloop", or "auto" and uvloop is
    installed (it takes about a quarter off the generator's cost per streamed chunk),
    else asyncio's own. For `asyncio.Runner(loop_factory=...)`. Raises ValueError for an
    unknown kind, ImportError for "uvloop" without uvloop."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"event loop {kind!r}: expected auto, uvloop or asyncio")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_sync(coro, loop: str = "auto"):
    """Run `coro` to completion on a fresh event loop of `loop` kind (see loop_factory)."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(coro)


async def run_load(
    cfg: LoadConfig,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
    progress_interval_s: float = 0.5,
) -> BenchResult:
    """Drive the configured endpoints for warm-up + window and return what was measured.

    Setting `stop` ends the run early: the result is then marked `cut_short` and its window
    is what was measured of it. Raises `BenchError` when an endpoint cannot be reached or
    has no model to pick, before any load is sent; `EndpointDead` (with the partial result)
    when an endpoint stops answering during the run."""
    cfg.validate()
    with _quiet_gc():
        return await _run_load(cfg, on_progress, stop, progress_interval_s)


@contextlib.contextmanager
def _quiet_gc():
    """Keep Python's cyclic garbage collector from pausing the event loop mid-stream (a
    full collection over a few hundred thousand objects stops every stream for 10-20 ms,
    which lands in the ITL tail): objects alive at the start are frozen out of it and
    collections become rare. Restored afterwards."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


async def _watch(run: LoadRun, stop: asyncio.Event | None) -> str | None:
    """Wait until the window's end, `stop`, or a dead endpoint; the reason for the last."""
    while True:
        now = perf_counter()
        if now >= run.we or (stop is not None and stop.is_set()):
            return None
        reason = run.dead(now)
        if reason is not None:
            return reason
        delay = min(WATCH_S, run.we - now)
        if stop is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        else:
            await asyncio.sleep(delay)


def _session(cfg: LoadConfig) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=cfg.connect_timeout_s, sock_read=None
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None),
        timeout=timeout,
        auto_decompress=False,
    )


async def _run_load(cfg: LoadConfig, on_progress, stop, progress_interval_s) -> BenchResult:
    run = LoadRun(cfg)
    sessions: dict[str, aiohttp.ClientSession] = {}
    tasks: list[asyncio.Task] = []
    endpoints = [
        (k, url, model, c, rate)
        for k, url, model, c, rate in (
            ("gen", cfg.gen_url, cfg.gen_model, cfg.gen_concurrency, cfg.gen_rate),
            ("embed", cfg.embed_url, cfg.embed_model, cfg.embed_concurrency, cfg.embed_rate),
        )
        if url
    ]
    aborted = None
    try:
        for kind, *_ in endpoints:
            sessions[kind] = _session(cfg)
        models = await asyncio.gather(
            *(
                resolve_model(sessions[k], k, url, model, cfg.connect_timeout_s, run.headers)
                for k, url, model, _, _ in endpoints
            )
        )
        for (kind, url, _, c, rate), model in zip(endpoints, models, strict=True):
            setattr(run, kind, EndpointRun(kind, url, model, c, rate))
        if stop is not None and stop.is_set():
            raise BenchStopped("stopped before the load started; nothing was measured")

        started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        run.t0 = perf_counter()
        run.ws = run.t0 + cfg.warmup_s
        run.we = run.ws + cfg.duration_s
        for ep in (run.gen, run.embed):
            if ep is None:
                continue
            session = sessions[ep.kind]
            if ep.rate is not None:
                tasks.append(asyncio.create_task(run.open_loop(ep, session)))
            else:
                tasks += [
                    asyncio.create_task(run.closed_worker(ep, session, w))
                    for w in range(ep.concurrency)
                ]
        if on_progress is not None:
            tasks.append(asyncio.create_task(_progress_loop(run, on_progress, progress_interval_s)))
        aborted = await _watch(run, stop)
        stopped_at = perf_counter()
        cut_short = stopped_at < run.we
        silent_end = None if aborted or cut_short else run.silent_at_end(stopped_at)
    finally:
        tasks += run.requests
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions.values():
            await s.close()
    for ep in (run.gen, run.embed):
        if ep is not None and ep.rate is not None:
            ep.scheduled_window = run.scheduled_in_window(ep, min(stopped_at, run.we))
    result = BenchResult(
        config=cfg,
        started_at=started_at,
        t0=run.t0,
        window_start=run.ws,
        window_end=run.we,
        stopped_at=stopped_at,
        cut_short=cut_short,
        gen=run.gen,
        embed=run.embed,
        aborted=aborted,
    )
    if aborted is None and not cut_short:
        # a window without any answer says more than its silent end does
        reasons = [nothing_answered(result, ep) for ep in (run.gen, run.embed) if ep is not None]
        result.aborted = aborted = "; ".join(filter(None, reasons)) or silent_end
    if aborted is not None:
        raise EndpointDead(aborted, result)
    return result
