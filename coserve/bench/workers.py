"""Sending requests and counting their answers: one gen or embed request, the closed-loop
worker, the open-loop sender, and how a refusing endpoint is backed off from.

Accounting (docs/bench.md, "Requests that do not complete"): a request the *server* failed
(non-2xx, an error event, a dropped or refused connection, a stream without a token, an
unreadable answer) counts nothing but a failure: none of its tokens go into tok/s or the
totals and none of its gaps into ITL. A request the *bench* cut (the window's end, a stop)
was being served normally: its tokens and gaps that arrived inside the window count.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from coserve.bench.arrivals import arrival_offsets, count_arrivals
from coserve.bench.client import consume, error_message, exc_message, join
from coserve.bench.config import LoadConfig
from coserve.bench.embed_answer import BadAnswer, embedding_shape
from coserve.bench.metrics import refused_all
from coserve.bench.records import EndpointRun, RequestRecord
from coserve.bench.sse import GenStream
from coserve.bench.workload import Workload

__all__ = ["DEAD_AFTER_S", "LoadRun", "silent_end_s"]

perf_counter = time.perf_counter

_FAIL_PAUSE_S = 0.010  # after a failed answer, so a failing server is not hit in a spin
_MAX_FAILED_RECORDS = 20_000  # failures past this are only counted
# Refused connections: probe again after 20 ms, doubling to at most 0.5 s, one probe at a
# time per endpoint; an endpoint that has answered nothing but connection errors for
# DEAD_AFTER_S is dead and ends the run.
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.020, 0.5
DEAD_AFTER_S = 1.0
# An endpoint that has answered at least this many requests, every one with the same kind of
# client error (a generative model asked for embeddings, a wrong model name, a prompt over
# its limit), for DEAD_AFTER_S will not start answering: the run ends instead of sending
# hundreds of thousands more until the window closes. 408 and 429 pass (load, not a fault).
REFUSED_AFTER = 100
_TRANSIENT_4XX = (408, 429)
_STREAMS = {"gen": 1, "embed": 2}  # arrival schedule streams (independent per endpoint)
# The open-loop sender hands the event loop back at least every this many arrivals, so that
# a sender that is behind its schedule (or skipping it) does not starve answers and signals.
_YIELD_EVERY = 64


def silent_end_s(cfg: LoadConfig) -> float:
    """How long an endpoint with requests in flight may say nothing at the window's end
    before the run fails: half the window, at least 2 s (a loaded machine's hiccup is not
    a frozen server), at most `stall_s` (which ends the run earlier anyway)."""
    return min(cfg.stall_s, max(2.0, cfg.duration_s / 2))


def _ms(dt: float) -> float:
    return round(dt * 1e3, 4)


def _count(v) -> int | None:
    """A token count from a server's usage, or None where it sent none: anything but a
    non-negative integer (a string, a boolean, Infinity) went into the records as sent, and
    an Infinity made the records file no JSON."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class LoadRun:
    """The state of one run: config, workload, clock (t0, window [ws, we)) and endpoints."""

    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self.workload = Workload(cfg)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self.t0 = self.ws = self.we = float("inf")
        self.gen: EndpointRun | None = None
        self.embed: EndpointRun | None = None
        self.chat = cfg.gen_endpoint == "chat"
        self.requests: set[asyncio.Task] = set()  # open-loop requests in flight
        self._next = {"gen": 0, "embed": 0}
        self._probe = {"gen": asyncio.Lock(), "embed": asyncio.Lock()}
        # stall watch: the endpoint's answer counts when last seen, and since when unchanged
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _begin(self, ep: EndpointRun, kind: str, i: int, w, sched) -> RequestRecord:
        st = perf_counter()
        ep.in_flight += 1
        ep.sent += 1
        if self.ws <= st < self.we:
            ep.sent_window += 1
            if sched is not None and self.t0 + sched < self.ws:
                ep.sent_backlog += 1
        if sched is not None and self.ws <= self.t0 + sched < self.we:
            ep.sent_of_scheduled += 1
        return RequestRecord(kind, i, round(st - self.t0, 6), worker=w, scheduled_s=sched)

    def _fail(
        self, ep: EndpointRun, rec: RequestRecord, status, message: str, connection: bool = False
    ) -> None:
        t = perf_counter()
        ep.failed_total += 1
        ep.errors[(status, message)] += 1
        rec.status, rec.http_status, rec.error = "failed", status, message
        rec.end_s = round(t - self.t0, 6)
        if ep.failed_total <= _MAX_FAILED_RECORDS:
            ep.records.append(rec)
        if connection:  # no answer at all: the endpoint may be gone
            if ep.down_since is None:
                ep.down_since = t
                ep.connection_errors = 0
            ep.connection_errors += 1
            ep.last_connection_error = message
            ep.backoff_s = min(max(2 * ep.backoff_s, _BACKOFF_MIN_S), _BACKOFF_MAX_S)

    @staticmethod
    def _answered(ep: EndpointRun) -> None:
        ep.down_since = None
        ep.backoff_s = 0.0

    def dead(self, now: float) -> str | None:
        """Why the run must end, when an endpoint has answered nothing but connection errors
        for DEAD_AFTER_S; None while every endpoint answers."""
        for ep in (self.gen, self.embed):
            if ep is not None and ep.down_since is not None and now - ep.down_since >= DEAD_AFTER_S:
                return (
                    f"the {ep.kind} server at {ep.url} is not answering: "
                    f"{ep.connection_errors} connection errors and no answer for "
                    f"{now - ep.down_since:.1f} s (last: {ep.last_connection_error})"
                )
            if ep is not None and (refused := self._refused(ep, now)) is not None:
                return refused
            if ep is not None and (silent := self._silent_for(ep, now)) >= self.cfg.stall_s:
                ep.stalled = (
                    f"the {ep.kind} server at {ep.url} answered nothing for {silent:.1f} s "
                    f"with {ep.in_flight} requests in flight (frozen or overwhelmed; "
                    "`stall_s` in [load], --stall in coserve bench, allows longer)"
                )
                return ep.stalled
        return None

    def _refused(self, ep: EndpointRun, now: float) -> str | None:
        """Why `ep` is refusing the load: REFUSED_AFTER or more answers, all client errors
        (4xx but 408 and 429), none a success, the first DEAD_AFTER_S or more ago."""
        if ep.failed_total < REFUSED_AFTER or ep.completed_total or ep.tokens_total:
            return None
        if not all(
            isinstance(status, int) and 400 <= status < 500 and status not in _TRANSIENT_4XX
            for status, _ in ep.errors
        ):
            return None
        first = ep.records[0].end_s  # records are kept as requests end
        if first is None or now - (self.t0 + first) < DEAD_AFTER_S:
            return None
        return (
            f"{refused_all(ep)}; the run stopped {now - self.t0:.1f} s in, as every answer is a "
            "client error (the model, endpoint or request is wrong, not the load)"
        )

    def silent_at_end(self, now: float) -> str | None:
        """Why the run must fail at the window's end: an endpoint with requests in flight
        that said nothing for its last silent_end_s(cfg) seconds."""
        bound = silent_end_s(self.cfg)
        for ep in (self.gen, self.embed):
            if ep is not None and (silent := self._silent_for(ep, now)) >= bound:
                ep.stalled = (
                    f"the {ep.kind} server at {ep.url} answered nothing in the last "
                    f"{silent:.1f} s of the window with {ep.in_flight} requests in flight "
                    f"(frozen or overwhelmed)"
                )
                return ep.stalled
        return None

    def _silent_for(self, ep: EndpointRun, now: float) -> float:
        """Seconds `ep` has had requests in flight and sent no token, answer or failure
        (a stopped process keeps its connections open but says nothing); 0 while it talks.
        Seen as often as it is asked (every 0.1 s by the run's watch)."""
        answers = (ep.tokens_total, ep.completed_total, ep.failed_total)
        seen, since = self._seen.get(ep.kind, (None, now))
        if answers != seen or ep.in_flight == 0:
            self._seen[ep.kind] = (answers, now)
            return 0.0
        return now - since

    def _take(self, kind: str) -> int:
        i = self._next[kind]
        self._next[kind] = i + 1
        return i

    # ------------------------------------------------------------------ gen
    async def gen_request(
        self,
        session: aiohttp.ClientSession,
        ep: EndpointRun,
        i: int,
        w: int | None = None,
        sched: float | None = None,
    ) -> bool:
        body = self.workload.gen_body(ep.model, i)
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        s = GenStream(ep, self.ws, self.we, self.cfg.record_chunks, self.chat)
        rec = self._begin(ep, "gen", i, w, sched)
        st = s.st = self.t0 + rec.start_s
        answered = False
        try:
            async with session.post(join(ep.url, path), data=body, headers=self.headers) as resp:
                answered = True
                self._answered(ep)
                if not 200 <= resp.status < 300:
                    self._fail(ep, rec, resp.status, error_message(await resp.read()))
                    return False
                await consume(resp.content, s)
                if s.error is not None:
                    raise s.error
                if s.error_event is not None:
                    return self._fail_stream(ep, rec, s, 200, f"error in stream: {s.error_event}")
                if s.nchunks == 0:
                    return self._fail_stream(ep, rec, s, 200, "stream ended without a token")
        except asyncio.CancelledError:
            rec.status, rec.end_s = "cancelled", round(perf_counter() - self.t0, 6)
            self._stream_fields(rec, s, st, s.win_tok)
            if s.nchunks:
                rec.ttft_ms = _ms(s.first - st)
            ep.tokens_window += s.win_tok
            ep.itl_window.extend(s.itl)
            ep.records.append(rec)
            raise
        except Exception as e:  # a refused or dropped connection, a bad chunk
            return self._fail_stream(ep, rec, s, None, exc_message(e), connection=not answered)
        finally:
            ep.in_flight -= 1
        # A server that packs several tokens into a chunk without saying so (no token_ids)
        # is corrected from its usage, spreading the difference evenly over its chunks.
        ntok, win_tok, usage = s.ntok, float(s.win_tok), _count(s.usage_tokens)
        out_tok = ntok
        if usage is not None:
            out_tok = usage
            if usage != ntok:
                ep.usage_mismatch += 1
                if ntok:
                    win_tok *= usage / ntok
        ep.tokens_window += win_tok
        ep.itl_window.extend(s.itl)
        ep.completed_total += 1
        rec.status, rec.http_status, rec.end_s = "ok", 200, round(s.last - self.t0, 6)
        rec.ttft_ms, rec.e2e_ms = _ms(s.first - st), _ms(s.last - st)
        rec.tpot_ms = round((s.last - s.first) * 1e3 / (out_tok - 1), 4) if out_tok > 1 else None
        rec.output_tokens, rec.usage_tokens = out_tok, usage
        rec.prompt_tokens = _count(s.prompt_tokens)
        self._stream_fields(rec, s, st, win_tok)
        ep.records.append(rec)
        return True

    @staticmethod
    def _stream_fields(rec: RequestRecord, s: GenStream, st: float, counted: float) -> None:
        rec.chunks, rec.chunk_tokens, rec.tokens_in_window = s.nchunks, s.ntok, counted
        if s.chunk_times is not None:
            rec.chunk_times_s = [round(t - st, 6) for t in s.chunk_times]

    def _fail_stream(
        self,
        ep: EndpointRun,
        rec: RequestRecord,
        s: GenStream,
        status,
        message: str,
        connection: bool = False,
    ) -> bool:
        ep.tokens_total -= s.ntok  # counted live for the progress display; not delivered
        self._stream_fields(rec, s, s.st, 0)
        self._fail(ep, rec, status, message, connection)
        return False

    # ------------------------------------------------------------------ embed
    async def embed_request(
        self,
        session: aiohttp.ClientSession,
        ep: EndpointRun,
        i: int,
        w: int | None = None,
        sched: float | None = None,
    ) -> bool:
        body = self.workload.embed_body(ep.model, i)
        batch = self.cfg.embed_batch
        rec = self._begin(ep, "embed", i, w, sched)
        st = self.t0 + rec.start_s
        answered = False
        try:
            async with session.post(
                join(ep.url, "/v1/embeddings"), data=body, headers=self.headers
            ) as resp:
                answered = True
                self._answered(ep)
                data = await resp.read()
                t = perf_counter()
                if not 200 <= resp.status < 300:
                    self._fail(ep, rec, resp.status, error_message(data))
                    return False
        except asyncio.CancelledError:
            rec.status, rec.end_s = "cancelled", round(perf_counter() - self.t0, 6)
            ep.records.append(rec)
            raise
        except Exception as e:
            self._fail(ep, rec, None, exc_message(e), connection=not answered)
            return False
        finally:
            ep.in_flight -= 1
        try:
            n, dim, encoding = embedding_shape(data)
        except BadAnswer as e:
            self._fail(ep, rec, 200, str(e))
            return False
        if n != batch:
            self._fail(ep, rec, 200, f"{n} embeddings in the answer for {batch} inputs")
            return False
        if ep.dim is None:
            ep.dim = dim
        elif dim != ep.dim:
            self._fail(ep, rec, 200, f"embeddings of dimension {dim} after {ep.dim}")
            return False
        if encoding != self.cfg.embed_encoding:  # still an answer: measured, noted
            ep.encoding_mismatch += 1
            ep.encoding_answered = rec.encoding = encoding
        ep.completed_total += 1
        ep.tokens_total += n
        if self.ws <= t < self.we:
            ep.tokens_window += n
        rec.status, rec.http_status, rec.end_s = "ok", 200, round(t - self.t0, 6)
        rec.latency_ms, rec.sequences, rec.dim = _ms(t - st), n, dim
        ep.records.append(rec)
        return True

    # ------------------------------------------------------------------ the loops
    def _sender(self, ep: EndpointRun, session: aiohttp.ClientSession):
        request = self.gen_request if ep.kind == "gen" else self.embed_request

        def send(i: int, w: int | None = None, sched: float | None = None):
            return request(session, ep, i, w, sched)

        return send

    async def closed_worker(self, ep: EndpointRun, session: aiohttp.ClientSession, w: int) -> None:
        """Send, wait for the end, send again. While the endpoint refuses connections, one
        worker at a time probes it, backing off."""
        send = self._sender(ep, session)
        delay = self.t0 + self.cfg.effective_ramp_s * w / ep.concurrency - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        probe = self._probe[ep.kind]
        while True:
            if ep.down_since is not None:
                async with probe:
                    if ep.down_since is not None:
                        await asyncio.sleep(ep.backoff_s)
                        await send(self._take(ep.kind), w)
                        continue
            if not await send(self._take(ep.kind), w):
                await asyncio.sleep(_FAIL_PAUSE_S)

    async def open_loop(self, ep: EndpointRun, session: aiohttp.ClientSession) -> None:
        """Send request k at t0 + the k-th arrival offset, whatever happened to the earlier
        ones, with at most `ep.concurrency` in flight: an arrival that finds the cap full
        waits for a slot (and is counted in `cap_waits` inside the window). While the
        endpoint refuses connections, arrivals are skipped but for one backed-off probe."""
        cfg, t0 = self.cfg, self.t0
        send = self._sender(ep, session)
        requests = self.requests
        sleep = asyncio.sleep
        cap, in_flight = ep.concurrency, 0
        freed = asyncio.Event()
        skip_until = 0.0

        def done(task: asyncio.Task) -> None:
            nonlocal in_flight
            requests.discard(task)
            in_flight -= 1
            freed.set()

        offsets = arrival_offsets(ep.rate, cfg.arrival, cfg.burstiness, cfg.seed, _STREAMS[ep.kind])
        unyielded = 0
        for i, off in enumerate(offsets):
            due = t0 + off
            now = perf_counter()
            if due > now:
                await sleep(due - now)
                unyielded = 0
            else:
                unyielded += 1
                if unyielded >= _YIELD_EVERY:
                    await sleep(0)
                    unyielded = 0
            if due < skip_until:
                continue
            if ep.down_since is not None:
                await sleep(ep.backoff_s)
                await send(i, None, round(off, 6))
                skip_until = perf_counter()
                continue
            if in_flight >= cap:
                if self.ws <= due < self.we:
                    ep.cap_waits += 1
                held = perf_counter()
                try:
                    while in_flight >= cap:
                        freed.clear()
                        await freed.wait()
                finally:  # also when the run ends with the sender still held
                    end = min(perf_counter(), self.we)
                    ep.cap_wait_s += max(0.0, end - max(held, self.ws))
            in_flight += 1
            task = asyncio.ensure_future(send(i, None, round(off, 6)))
            requests.add(task)
            task.add_done_callback(done)

    def scheduled_in_window(self, ep: EndpointRun, end: float) -> int:
        """Arrivals the schedule put in [window start, end) (perf_counter time)."""
        cfg = self.cfg
        return count_arrivals(
            ep.rate,
            cfg.arrival,
            cfg.burstiness,
            cfg.seed,
            _STREAMS[ep.kind],
            self.ws - self.t0,
            end - self.t0,
        )
