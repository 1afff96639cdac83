"""The engine in a process of its own (vLLM's "engine core"), so the HTTP front's Python never
holds the GIL the engine's step loop needs, and the other way round.

One pipe (a socket pair) between the two; every message is one pickle of the typed records
of engine/messages.py, framed as multiprocessing.Connection frames them (the front reads them
with asyncio). Per engine step, at most one message each way: front -> core a list of `Add`,
`Abort`, `Allow`, `Profile`, `Stop`; core -> front `Ready` or `Failed` first, then a `Step` (its
`GenOutputs` or `EmbedOut`s, and `Ack`s of the adds) or `Dead`.

The core ignores SIGTERM and SIGINT: a signal to the process group reaches it as well, and
in-flight requests must go on during the front's drain. It stops on the front's `Stop`,
when the pipe reaches EOF (the front is gone) or, at the latest, by PR_SET_PDEATHSIG.

Every step is timed here (wall clock around `engine.step()`, which returns host data and so
waits for the GPU); the stats carry the mean and p99 of the last STEP_WINDOW_S of step times, which
the SLO guard of an embed server beside this one reads (slo_guard.py), and for a generation
engine the per-step means of the work those steps did (sequences, prompt tokens, KV tokens
read), which the guard's baseline is a function of. `Allow` is that guard's allowance for an
embed engine: tokens per forward, a pause between forwards, or a hold; waiting requests only
wait."""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from coserve.engine.host_gc import quiet_gc
from coserve.engine.messages import (
    Abort,
    Ack,
    Add,
    AddError,
    Allow,
    Dead,
    EmbedOut,
    Failed,
    GenOutputs,
    Profile,
    Ready,
    Step,
    Stop,
)
from coserve.engine.types import StepWork
from coserve.server.step_profile import StepProfiler

log = logging.getLogger("coserve.server")

IDLE_POLL_S = 0.5
STATS_INTERVAL_S = 0.05
STEP_WINDOW_S = 0.5
HOLD_POLL_S = 0.01
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl here: the pipe EOF still ends the core
            log.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)


def _send(conn, msg) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _outputs(done: list, logprobs: dict) -> GenOutputs | list[EmbedOut]:
    """A step's engine outputs as they cross the pipe ([] for none)."""
    if not done:
        return []
    if getattr(done[0], "embeddings", None) is not None:
        return [
            EmbedOut(o.request_id, np.asarray(o.embeddings, dtype=np.float32), o.prompt_tokens)
            for o in done
        ]
    return GenOutputs(
        [o.request_id for o in done],
        [o.new_token_ids for o in done],
        [o.finished for o in done],
        [o.finish_reason for o in done],
        [logprobs.get(o.request_id) for o in done] if logprobs else [None] * len(done),
    )


def _take_logprobs(engine) -> dict:
    """The logprobs the gen engine's sampler recorded this step (a hook beside the engine's
    outputs, so the engine's step stays as it is); {} for engines without one."""
    sampler = getattr(engine, "sampler", None)
    take = getattr(sampler, "take_logprobs", None)
    return take() if take is not None else {}


def _error(e: BaseException) -> AddError:
    return AddError(
        "value" if isinstance(e, ValueError) else "other",
        str(e) if isinstance(e, ValueError) else repr(e),
    )


def start_process(log_level: str) -> None:
    """What an engine core process does first: die with the front, ignore the group's
    signals (the front drains), log to stderr."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def build(factory) -> tuple[object | None, Failed | None]:
    """(engine, None), or (None, the message that tells the front why not)."""
    try:
        return factory(), None
    except (ValueError, FileNotFoundError) as e:  # a bad model name or directory: the user's to fix
        return None, Failed(str(e), 2)
    except BaseException as e:
        log.exception("the engine failed to start")
        return None, Failed(f"the engine failed to start: {e!r}", 1)


def ready(engine) -> Ready:
    """What the front needs to know of the engine."""
    return Ready(
        engine.model_name,
        int(engine.max_model_len),
        getattr(engine, "dim", None),
        getattr(engine, "tokenizer", None),
        tuple(sorted(getattr(engine, "eos_token_ids", ()))),
        {**engine.stats(), **_clock(engine).stats(time.monotonic())},
    )


def _clock(engine) -> StepClock:
    return StepClock(work=hasattr(engine, "last_step_work"))


def serve_pipe(engine, conn) -> None:
    """Run the step loop until told to stop or the front is gone; a loop that dies says so."""
    try:
        _loop(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("the HTTP front is gone; the engine core exits")
    except BaseException as e:
        log.exception("engine loop died")
        try:
            _send(conn, Dead(repr(e)))
        except OSError:
            pass


def run(factory, conn, log_level: str = "INFO") -> None:
    """Process entry point: build the engine with `factory()`, then serve the pipe."""
    start_process(log_level)
    engine, failed = build(factory)
    if failed is not None:
        _send(conn, failed)
        return
    _send(conn, ready(engine))
    quiet_gc()
    try:
        serve_pipe(engine, conn)
    finally:
        engine.shutdown()  # tensor parallel: the other ranks go with the core
    # Nothing is left to do: skip the interpreter's teardown, which with torch loaded takes
    # 1-2 s of a busy CPU, and every server stop waits for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass(frozen=True, slots=True)
class _Timed:
    end: float  # monotonic seconds
    seconds: float
    work: StepWork | None  # what the step computed (None: the engine does not say)


class StepClock:
    """Wall time of the engine's recent steps, with their work where the engine reports it
    (`work`: a generation engine, whose `last_step_work` says what each step computed), and
    how long the guard held work back."""

    def __init__(self, window_s: float = STEP_WINDOW_S, *, work: bool = False):
        self.window_s = window_s
        self.work = work
        self.steps: deque[_Timed] = deque()
        self.throttled_s = 0.0

    def add(self, end: float, seconds: float, work: StepWork | None = None) -> None:
        self.steps.append(_Timed(end, seconds, work))

    def stats(self, now: float) -> dict:
        """The window's figures; with `work`, also the per-step means of its steps' work
        (over the steps that reported one; 0 for an empty window)."""
        while self.steps and self.steps[0].end < now - self.window_s:
            self.steps.popleft()
        times = [s.seconds for s in self.steps]
        p99 = float(np.percentile(times, 99)) if times else 0.0
        mean = sum(times) / len(times) if times else 0.0
        out = {
            "step_time_mean_s": mean,
            "step_time_p99_s": p99,
            "step_window_steps": len(times),
            "guard_throttled_s": self.throttled_s,
        }
        if self.work:
            work = StepWork.mean([s.work for s in self.steps if s.work is not None])
            out["step_batch_mean"] = work.seqs
            out["step_prefill_tokens_mean"] = work.prefill_tokens
            out["step_kv_tokens_mean"] = work.kv_tokens
        return out


class Pacing:
    """The guard's allowance as the core applies it (no guard: no pause, no hold)."""

    def __init__(self):
        self.pause_s = 0.0
        self.hold = False
        self.last_step_end = 0.0

    def allow(self, engine, tokens: int, pause_s: float, hold: bool) -> None:
        engine.max_num_batched_tokens = int(tokens)
        self.pause_s, self.hold = float(pause_s), bool(hold)
        if hasattr(engine, "overlap"):
            # a pause or hold is meant to leave the GPU idle, not to run the next pass
            engine.overlap = self.pause_s == 0 and not self.hold

    def wait_s(self, now: float) -> float:
        """Seconds until the next step may start (0: now)."""
        if self.hold:
            return HOLD_POLL_S
        return max(0.0, self.last_step_end + self.pause_s - now)  # a new pause counts at once


def _apply(engine, cmds: list, acks: list[Ack], pacing: Pacing, profiler: StepProfiler) -> bool:
    """Apply the front's commands; True when told to stop."""
    for cmd in cmds:
        if isinstance(cmd, Stop):
            return True
        if isinstance(cmd, Allow):
            pacing.allow(engine, cmd.tokens_per_forward, cmd.pause_s, cmd.hold)
        elif isinstance(cmd, Profile):
            profiler.command(cmd)
        elif isinstance(cmd, Abort):
            for rid in cmd.request_ids:
                try:
                    engine.abort(rid)
                except Exception:  # an id the engine already finished or never took
                    log.debug("abort of %s ignored", rid, exc_info=True)
        elif isinstance(cmd, Add):
            acks.append(Ack(cmd.add_id, _add(engine, cmd)))
        else:
            raise TypeError(f"unknown command {cmd!r}")
    return False


def _add(engine, cmd: Add) -> AddError | None:
    """All or none: a request the engine refuses takes back those added before it."""
    added = []
    for new in cmd.requests:
        try:
            engine.add_request(*new)
        except Exception as e:
            for prev in added:
                engine.abort(prev)
            return _error(e)
        added.append(new.request_id)
    return None


def _loop(engine, conn) -> None:
    steps = 0
    stats_at = 0.0
    clock, pacing, profiler = _clock(engine), Pacing(), StepProfiler()
    check_ranks = getattr(engine, "check_ranks", None)  # tensor-parallel engines
    while True:
        acks: list[Ack] = []
        busy = engine.has_unfinished()
        if not busy and check_ranks is not None:
            # a rank that dies while nothing steps fails the engine now, not at the next
            # request (until then the server would answer /health with a dead engine)
            check_ranks()
        wait = pacing.wait_s(time.monotonic()) if busy else IDLE_POLL_S
        waited_from = time.monotonic()
        if not wait or conn.poll(wait):
            while conn.poll(0):
                if _apply(engine, pickle.loads(conn.recv_bytes()), acks, pacing, profiler):
                    return
        outputs = []
        if busy and wait:
            clock.throttled_s += time.monotonic() - waited_from
        if engine.has_unfinished() and not pacing.wait_s(time.monotonic()):
            t0 = time.monotonic()
            done = profiler.run_step(engine) if profiler.capturing else engine.step()
            t1 = time.monotonic()
            clock.add(t1, t1 - t0, getattr(engine, "last_step_work", None))
            pacing.last_step_end = t1
            logprobs = _take_logprobs(engine)
            outputs = _outputs(done, logprobs)
            steps += 1
        elif getattr(engine, "in_flight", False):
            # paced or held: the pass already computed is answered, not kept waiting
            outputs = _outputs(engine.drain(), {})
        if profiler.state != "idle":
            profiler.after_step(engine.has_unfinished())
        now = time.monotonic()
        stats = None
        if now - stats_at >= STATS_INTERVAL_S or (steps and not engine.has_unfinished()):
            stats_at = now
            stats = {**engine.stats(), **clock.stats(now)}
            if profiler.state != "idle":
                stats.update(profiler.stats())
        if outputs or acks or stats is not None:
            _send(conn, Step(outputs, acks, stats, steps))
