"""Closed-loop load against an OpenAI-compatible generative and embedding endpoint at once.

Each endpoint gets exactly C workers; a worker sends a request, waits for its end, and sends
the next at once (after a failure it pauses 10 ms so a dead server does not turn the loop
into a spin). Both endpoints start together at t0; the measurement window is
[t0 + warmup, t0 + warmup + duration). At the window's end every request still in flight is
cancelled: what it delivered inside the window has already been counted by arrival time.

The streaming hot path does little per chunk: one clock read per socket read, a split on
blank lines, and a few byte searches per event; JSON is parsed only for the final usage
chunk and for errors. A chunk counts 1 token unless it carries `token_ids` (then their
number); a request's completion tokens come from the server's `usage` when it sends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import gc
import json
import math
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from coserve.bench.config import LoadConfig
from coserve.bench.embed_answer import BadAnswer, embedding_shape
from coserve.bench.workload import Workload

__all__ = ["BenchError", "BenchResult", "BenchStopped", "EndpointRun", "loop_factory", "run_load", "run_sync",
           "write_result"]

_FAIL_PAUSE_S = 0.010
_MAX_FAILED_RECORDS = 20_000  # failures past this are only counted (a dead server fails fast)

perf_counter = time.perf_counter


class BenchError(RuntimeError):
    """The run cannot start (endpoint unreachable, no model to pick); the message says why."""


class BenchStopped(BenchError):
    """`stop` was set before any load was sent: nothing was measured."""


@dataclass(repr=False)
class EndpointRun:
    """Everything measured on one endpoint. Times are perf_counter seconds."""

    kind: str  # "gen" | "embed"
    url: str
    model: str
    concurrency: int
    records: list[dict] = field(default_factory=list)
    # gen: gaps between token-bearing chunks whose arrival lies inside the window (seconds)
    itl_window: array = field(default_factory=lambda: array("d"))
    tokens_window: float = 0.0  # gen tokens / embed sequences that arrived inside the window
    tokens_total: int = 0  # gen tokens / embed sequences that arrived at any time
    in_flight: int = 0
    sent: int = 0
    completed_total: int = 0
    failed_total: int = 0
    usage_mismatch: int = 0  # requests whose usage disagreed with the chunks counted
    dim: int | None = None  # embed: the dimension of the first vectors answered
    errors: Counter = field(default_factory=Counter)  # (status, message) -> count

    def __repr__(self) -> str:  # short: asyncio and debuggers repr results freely
        return (f"EndpointRun({self.kind} {self.url} model={self.model!r} "
                f"C={self.concurrency} records={len(self.records)})")


@dataclass(repr=False)
class BenchResult:
    config: LoadConfig
    started_at: str  # ISO 8601, wall clock, when load began (t0)
    t0: float
    window_start: float
    window_end: float  # planned end of the window
    stopped_at: float  # when load stopped
    cut_short: bool
    gen: EndpointRun | None
    embed: EndpointRun | None

    def __repr__(self) -> str:
        return (f"BenchResult(started_at={self.started_at!r}, cut_short={self.cut_short}, "
                f"gen={self.gen!r}, embed={self.embed!r})")

    @property
    def measured_s(self) -> float:
        """Length of the window actually measured (shorter than planned when cut short)."""
        return max(0.0, min(self.stopped_at, self.window_end) - self.window_start)

    @property
    def records(self) -> list[dict]:
        out = []
        for ep in (self.gen, self.embed):
            if ep is not None:
                out.extend(ep.records)
        return out

    def summary(self) -> dict:
        from coserve.bench.metrics import summarize

        return summarize(self)


def write_result(result: BenchResult, path) -> tuple[str, str]:
    """Write FILE.json (the summary) and FILE.records.jsonl (one line per request); both
    atomically (temporary file + rename). Returns the two paths."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    rec_path = path.with_name(stem + ".records.jsonl")
    summary = result.summary()
    summary["records_file"] = rec_path.name
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in result.records:
            f.write(json.dumps(r, separators=(",", ":")))
            f.write("\n")
    os.replace(tmp, rec_path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return str(path), str(rec_path)


# --------------------------------------------------------------------------- helpers


def _join(base: str, path: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + path


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if obj.get("message"):
            return str(obj["message"])[:500]
        if obj.get("detail"):
            return str(obj["detail"])[:500]
    return text[:500]


def _exc_message(e: BaseException) -> str:
    msg = str(e) or e.__class__.__name__
    if isinstance(e, TimeoutError):
        msg = "timed out"
    return f"{e.__class__.__name__}: {msg}"[:500]


async def _resolve_model(session: aiohttp.ClientSession, kind: str, url: str,
                         model: str | None, timeout: float, headers: dict) -> str:
    """Fail at once, with a clear message, when the endpoint cannot be reached; pick the
    first model the server lists when none is given."""
    flag = "--gen-model" if kind == "gen" else "--embed-model"
    try:
        async with session.get(_join(url, "/v1/models"), headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise BenchError(f"cannot reach the {kind} server at {url}: {_exc_message(e)}") from None
    if model:
        return model  # reachable; a server without /v1/models is fine when a model is given
    if status in (401, 403):
        raise BenchError(f"{kind} server at {url}: GET /v1/models answered {status} "
                         f"({_error_message(body)}); check --api-key")
    if status != 200:
        raise BenchError(f"{kind} server at {url}: GET /v1/models answered {status} "
                         f"({_error_message(body)}); pass {flag}")
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{kind} server at {url}: /v1/models lists no model; "
                         f"pass {flag}") from None


# --------------------------------------------------------------------------- the runner


class _Run:
    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self.workload = Workload(cfg)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self.t0 = self.ws = self.we = math.inf
        self.gen: EndpointRun | None = None
        self.embed: EndpointRun | None = None
        self.next_index = {"gen": 0, "embed": 0}

    # bookkeeping shared by both kinds
    def _fail(self, ep: EndpointRun, rec: dict, status, message: str, t: float) -> None:
        ep.failed_total += 1
        ep.errors[(status, message)] += 1
        rec.update(status="failed", http_status=status, error=message,
                   end_s=round(t - self.t0, 6))
        if ep.failed_total <= _MAX_FAILED_RECORDS:
            ep.records.append(rec)

    async def _ramp(self, w: int, c: int) -> None:
        delay = self.t0 + self.cfg.effective_ramp_s * w / c - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    def _take_index(self, kind: str) -> int:
        i = self.next_index[kind]
        self.next_index[kind] = i + 1
        return i

    # ------------------------------------------------------------------ gen
    async def gen_worker(self, session: aiohttp.ClientSession, w: int) -> None:
        ep = self.gen
        url = _join(ep.url, "/v1/completions")
        await self._ramp(w, ep.concurrency)
        while True:
            i = self._take_index("gen")
            ok = await self.gen_request(session, url, ep, i, w)
            if not ok:
                await asyncio.sleep(_FAIL_PAUSE_S)

    async def gen_request(self, session, url, ep: EndpointRun, i: int, w: int) -> bool:
        body = self.workload.gen_body(ep.model, i)
        t0 = self.t0
        s = _GenStream(ep, self.ws, self.we, self.cfg.record_chunks)
        ep.in_flight += 1
        ep.sent += 1
        st = s.st = perf_counter()
        rec = {"endpoint": "gen", "i": i, "worker": w, "start_s": round(st - t0, 6)}
        try:
            async with session.post(url, data=body, headers=self.headers) as resp:
                if not 200 <= resp.status < 300:
                    msg = _error_message(await resp.read())
                    self._fail(ep, rec, resp.status, msg, perf_counter())
                    return False
                await _consume(resp.content, s)
                if s.error is not None:
                    raise s.error
                if s.error_event is not None:
                    self._fail(ep, rec, 200, f"error in stream: {s.error_event}", perf_counter())
                    return False
                if s.nchunks == 0:
                    self._fail(ep, rec, 200, "stream ended without a token", perf_counter())
                    return False
        except asyncio.CancelledError:
            rec.update(status="cancelled", end_s=round(perf_counter() - t0, 6),
                       chunks=s.nchunks, chunk_tokens=s.ntok, tokens_in_window=s.win_tok)
            if s.nchunks:
                rec["ttft_ms"] = round((s.first - st) * 1e3, 4)
            if s.chunk_times is not None:
                rec["chunk_times_s"] = [round(t - st, 6) for t in s.chunk_times]
            ep.records.append(rec)
            raise
        except Exception as e:  # a refused or dropped connection, a bad chunk
            rec.update(chunks=s.nchunks, chunk_tokens=s.ntok, tokens_in_window=s.win_tok)
            self._fail(ep, rec, None, _exc_message(e), perf_counter())
            return False
        finally:
            ep.in_flight -= 1
            ep.tokens_window += s.win_tok
        # A server that packs several tokens into a chunk without saying so (no token_ids)
        # is corrected from its usage, spreading the difference evenly over its chunks.
        ntok, win_tok, usage_tokens = s.ntok, s.win_tok, s.usage_tokens
        out_tok = ntok
        if isinstance(usage_tokens, int) and usage_tokens >= 0:
            out_tok = usage_tokens
            if usage_tokens != ntok:
                ep.usage_mismatch += 1
                if ntok and win_tok:
                    ep.tokens_window += win_tok * (usage_tokens / ntok - 1.0)
        ep.completed_total += 1
        first, last = s.first, s.last
        rec.update(
            status="ok", http_status=200, end_s=round(last - t0, 6),
            ttft_ms=round((first - st) * 1e3, 4), e2e_ms=round((last - st) * 1e3, 4),
            tpot_ms=round((last - first) * 1e3 / (out_tok - 1), 4) if out_tok > 1 else None,
            output_tokens=out_tok, usage_tokens=usage_tokens, prompt_tokens=s.prompt_tokens,
            chunks=s.nchunks, chunk_tokens=ntok, tokens_in_window=win_tok,
        )
        if s.chunk_times is not None:
            rec["chunk_times_s"] = [round(t - st, 6) for t in s.chunk_times]
        ep.records.append(rec)
        return True

    # ------------------------------------------------------------------ embed
    async def embed_worker(self, session: aiohttp.ClientSession, w: int) -> None:
        ep = self.embed
        url = _join(ep.url, "/v1/embeddings")
        await self._ramp(w, ep.concurrency)
        while True:
            i = self._take_index("embed")
            ok = await self.embed_request(session, url, ep, i, w)
            if not ok:
                await asyncio.sleep(_FAIL_PAUSE_S)

    async def embed_request(self, session, url, ep: EndpointRun, i: int, w: int) -> bool:
        body = self.workload.embed_body(ep.model, i)
        batch = self.cfg.embed_batch
        ep.in_flight += 1
        ep.sent += 1
        st = perf_counter()
        rec = {"endpoint": "embed", "i": i, "worker": w, "start_s": round(st - self.t0, 6)}
        try:
            async with session.post(url, data=body, headers=self.headers) as resp:
                data = await resp.read()
                t = perf_counter()
                if not 200 <= resp.status < 300:
                    self._fail(ep, rec, resp.status, _error_message(data), t)
                    return False
        except asyncio.CancelledError:
            rec.update(status="cancelled", end_s=round(perf_counter() - self.t0, 6))
            ep.records.append(rec)
            raise
        except Exception as e:
            self._fail(ep, rec, None, _exc_message(e), perf_counter())
            return False
        finally:
            ep.in_flight -= 1
        try:
            n, dim = embedding_shape(data, self.cfg.embed_encoding)
        except BadAnswer as e:
            self._fail(ep, rec, 200, str(e), t)
            return False
        if n != batch:
            self._fail(ep, rec, 200, f"{n} embeddings in the answer for {batch} inputs", t)
            return False
        if ep.dim is None:
            ep.dim = dim
        elif dim != ep.dim:
            self._fail(ep, rec, 200, f"embeddings of dimension {dim} after {ep.dim}", t)
            return False
        ep.completed_total += 1
        ep.tokens_total += n
        if self.ws <= t < self.we:
            ep.tokens_window += n
        rec.update(status="ok", http_status=200, end_s=round(t - self.t0, 6),
                   latency_ms=round((t - st) * 1e3, 4), sequences=n, dim=dim)
        ep.records.append(rec)
        return True


def _choice_tokens(choices) -> int:
    """Tokens in a parsed chunk's choices (the first one: n = 1 requests)."""
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return 0
    c = choices[0]
    ids = c.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if c.get("text") == "" and c.get("finish_reason") is not None:
        return 0
    return 1


def _slow_data(ev: bytes) -> bytes | None:
    """The data of an SSE event written in any legal way (several lines, comments, no
    space after the colon); None when it has no data."""
    parts = []
    for line in ev.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v.startswith(b" ") else v)
    if not parts:
        return None
    return b"\n".join(parts).strip()


class _GenStream:
    """Counts one streamed completion as its bytes arrive. `feed` runs once per piece of
    body the HTTP parser hands over (usually one SSE event), stamped with the time it was
    read from the socket."""

    __slots__ = ("ep", "ws", "we", "itl_append", "buf", "st", "first", "last", "nchunks",
                 "ntok", "win_tok", "usage_tokens", "prompt_tokens", "error", "error_event",
                 "chunk_times", "fut", "fast_prefix", "fast_suffix", "fast_len")

    def __init__(self, ep: EndpointRun, ws: float, we: float, record_chunks: bool):
        self.ep = ep
        self.ws = ws
        self.we = we
        self.itl_append = ep.itl_window.append
        self.buf = b""
        self.st = self.first = self.last = 0.0
        self.nchunks = self.ntok = self.win_tok = 0
        self.usage_tokens = self.prompt_tokens = None
        self.error: BaseException | None = None
        self.error_event: str | None = None
        self.chunk_times: list[float] | None = [] if record_chunks else None
        self.fut: asyncio.Future | None = None
        # The shape of this stream's plain one-token chunks once one has been seen: all but
        # the text are the same bytes from chunk to chunk (see _learn_shape).
        self.fast_prefix: bytes | None = None
        self.fast_suffix = b""
        self.fast_len = 0

    def feed(self, data: bytes, t: float) -> None:
        p = self.fast_prefix
        if (p is not None and not self.buf and data.startswith(p)
                and data.endswith(self.fast_suffix)
                and data.find(b"\n\n", self.fast_len) == len(data) - 2):
            # the usual case, one whole one-token chunk of the known shape: no search for
            # fields, no split, no slice
            if self.ws <= t < self.we:
                self.itl_append(t - self.last)
                self.win_tok += 1
            self.last = t
            self.nchunks += 1
            self.ntok += 1
            self.ep.tokens_total += 1
            if self.chunk_times is not None:
                self.chunk_times.append(t)
            return
        if self.buf:
            data = self.buf + data
        if self.error is not None:
            return
        try:
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            events = data.split(b"\n\n")
            self.buf = events.pop()
            got = 0
            for ev in events:
                if not ev.startswith(b"data: {"):
                    ev = _slow_data(ev)
                    if ev is None or ev == b"[DONE]":
                        continue
                obj = None
                j = ev.find(b'"choices":[{')
                if j >= 0:  # compact JSON with a choice: it carries tokens
                    k = ev.find(b'"token_ids":[', j)
                    if k >= 0:
                        seg = ev[k + 13:ev.find(b"]", k)]
                        n = seg.count(b",") + 1 if seg.strip() else 0
                    elif b'"text":""' in ev and b'"finish_reason":null' not in ev:
                        n = 0  # an empty closing chunk: no token in it
                    else:
                        n = 1
                        if p is None and not self.nchunks:
                            self._learn_shape(ev, j)
                elif b'"choices"' in ev and b'"choices":[]' not in ev:
                    # JSON written with spaces (or keys in another order): parse it
                    obj = json.loads(ev[ev.find(b"{"):])
                    n = _choice_tokens(obj.get("choices"))
                else:
                    n = 0
                if n:
                    if self.nchunks:
                        if self.ws <= t < self.we:
                            self.itl_append(t - self.last)
                    else:
                        self.first = t
                    self.last = t
                    self.nchunks += 1
                    got += n
                    if self.chunk_times is not None:
                        self.chunk_times.append(t)
                if obj is None:
                    if b'"error"' not in ev and (b'"usage"' not in ev
                                                 or b'"usage":null' in ev):
                        continue
                    obj = json.loads(ev[ev.find(b"{"):])
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    self.usage_tokens = usage.get("completion_tokens")
                    self.prompt_tokens = usage.get("prompt_tokens")
                err = obj.get("error") or (obj if obj.get("object") == "error" else None)
                if err:
                    self.error_event = _error_message(json.dumps({"error": err}).encode())
            if got:
                self.ntok += got
                self.ep.tokens_total += got
                if self.ws <= t < self.we:
                    self.win_tok += got
        except Exception as e:  # never let a bad chunk escape into aiohttp's protocol
            self.fail(e)

    def _learn_shape(self, ev: bytes, j: int) -> None:
        """From the first plain chunk (one choice, a text, no token_ids, no usage), keep
        the bytes before its text and after it: later chunks that start and end with
        exactly those, with one event in between, are one-token chunks."""
        i = ev.find(b'"text":"', j)
        if i < 0:
            return
        i += 8
        k = i
        while True:  # the closing quote: one not escaped by an odd run of backslashes
            k = ev.find(b'"', k)
            if k < 0:
                return
            b = k - 1
            while ev[b] == 0x5C:  # backslash
                b -= 1
            if (k - 1 - b) % 2 == 0:
                break
            k += 1
        suffix = ev[k:]
        if b"token_ids" in suffix or b'"usage":{' in suffix or b"\n" in suffix:
            return
        self.fast_prefix = ev[:i]
        self.fast_suffix = suffix + b"\n\n"
        self.fast_len = i

    def eof(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


# Streams being counted, by id() of their aiohttp StreamReader.
_HOOKED: dict[int, _GenStream] = {}


class _HookedReader(aiohttp.StreamReader):
    """aiohttp's StreamReader, but body bytes go straight to a `_GenStream` inside the
    protocol's data_received, timed as they are read from the socket, instead of into a
    buffer that a task wakes up to drain. That takes a task wake-up and a future off every
    token, and event-loop lag off every timestamp. An instance's class is switched to
    this one once the response head has arrived (same memory layout: no new slots)."""

    __slots__ = ()

    def feed_data(self, data, *args, **kwargs):
        s = _HOOKED.get(id(self))
        if s is not None:
            s.feed(data, perf_counter())
        return False

    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_eof(self) -> None:
        super().feed_eof()
        s = _HOOKED.get(id(self))
        if s is not None:
            s.eof()

    def set_exception(self, exc, *args, **kwargs) -> None:
        super().set_exception(exc, *args, **kwargs)
        s = _HOOKED.get(id(self))
        if s is not None:
            s.fail(exc)


def _can_hook(content) -> bool:
    return type(content) is aiohttp.StreamReader


async def _consume(content, s: _GenStream) -> None:
    """Feed a response body to `s` until its end; errors end up in `s.error`."""
    if _can_hook(content):
        s.fut = asyncio.get_running_loop().create_future()
        pending = content.read_nowait()  # what came with the head; raises a stored error
        eof = content.is_eof()
        key = id(content)
        content.__class__ = _HookedReader
        _HOOKED[key] = s
        try:
            if pending:
                s.feed(pending, perf_counter())
            if eof:
                s.eof()
            await s.fut
        finally:
            _HOOKED.pop(key, None)
    else:  # not the reader we know how to hook: read it the ordinary way
        async for data in content.iter_any():
            s.feed(data, perf_counter())
            if s.error is not None:
                break


# --------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """A snapshot handed to `on_progress` about every `interval` seconds."""

    phase: str  # "warmup" | "measure" | "done"
    elapsed_s: float
    total_s: float
    gen_tok_s: float | None  # over the last interval
    embed_seq_s: float | None
    gen_in_flight: int
    embed_in_flight: int
    gen_completed: int
    embed_completed: int
    gen_failed: int
    embed_failed: int


async def _progress_loop(run: _Run, on_progress: Callable[[Progress], None], interval: float):
    last_t = perf_counter()
    last_g = run.gen.tokens_total if run.gen else 0
    last_e = run.embed.tokens_total if run.embed else 0
    total = run.we - run.t0
    while True:
        await asyncio.sleep(interval)
        t = perf_counter()
        g = run.gen.tokens_total if run.gen else 0
        e = run.embed.tokens_total if run.embed else 0
        dt = max(t - last_t, 1e-9)
        on_progress(Progress(
            phase="warmup" if t < run.ws else ("measure" if t < run.we else "done"),
            elapsed_s=t - run.t0, total_s=total,
            gen_tok_s=(g - last_g) / dt if run.gen else None,
            embed_seq_s=(e - last_e) / dt if run.embed else None,
            gen_in_flight=run.gen.in_flight if run.gen else 0,
            embed_in_flight=run.embed.in_flight if run.embed else 0,
            gen_completed=run.gen.completed_total if run.gen else 0,
            embed_completed=run.embed.completed_total if run.embed else 0,
            gen_failed=run.gen.failed_total if run.gen else 0,
            embed_failed=run.embed.failed_total if run.embed else 0,
        ))
        last_t, last_g, last_e = t, g, e


# --------------------------------------------------------------------------- event loops


def loop_factory(kind: str = "auto"):
    """A new-event-loop function: uvloop's when `kind` is "uvloop", or "auto" and uvloop is
    installed (it takes about a quarter off the generator's cost per streamed chunk),
    else asyncio's own. For `asyncio.Runner(loop_factory=...)`."""
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


# --------------------------------------------------------------------------- entry point


async def run_load(cfg: LoadConfig, on_progress: Callable[[Progress], None] | None = None,
                   stop: asyncio.Event | None = None,
                   progress_interval_s: float = 0.5) -> BenchResult:
    """Drive the configured endpoints for warm-up + window and return what was measured.

    Setting `stop` ends the run early: the result is then marked `cut_short` and its window
    is what was measured of it. Raises `BenchError` when an endpoint cannot be reached or
    has no model to pick, before any load is sent."""
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


async def _run_load(cfg: LoadConfig, on_progress, stop, progress_interval_s) -> BenchResult:
    run = _Run(cfg)
    connector_args = dict(limit=0, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=cfg.connect_timeout_s,
                                    sock_read=None)
    sessions: list[aiohttp.ClientSession] = []
    tasks: list[asyncio.Task] = []
    try:
        gen_s = embed_s = None
        if cfg.gen_url:
            gen_s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector_args),
                                          timeout=timeout, auto_decompress=False)
            sessions.append(gen_s)
        if cfg.embed_url:
            embed_s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector_args),
                                            timeout=timeout, auto_decompress=False)
            sessions.append(embed_s)
        checks = []
        if gen_s:
            checks.append(_resolve_model(gen_s, "gen", cfg.gen_url, cfg.gen_model,
                                         cfg.connect_timeout_s, run.headers))
        if embed_s:
            checks.append(_resolve_model(embed_s, "embed", cfg.embed_url, cfg.embed_model,
                                         cfg.connect_timeout_s, run.headers))
        models = await asyncio.gather(*checks)
        if gen_s:
            run.gen = EndpointRun("gen", cfg.gen_url, models[0], cfg.gen_concurrency)
        if embed_s:
            run.embed = EndpointRun("embed", cfg.embed_url, models[-1], cfg.embed_concurrency)
        if stop is not None and stop.is_set():
            raise BenchStopped("stopped before the load started; nothing was measured")

        started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        run.t0 = perf_counter()
        run.ws = run.t0 + cfg.warmup_s
        run.we = run.ws + cfg.duration_s
        if run.gen:
            tasks += [asyncio.create_task(run.gen_worker(gen_s, w))
                      for w in range(cfg.gen_concurrency)]
        if run.embed:
            tasks += [asyncio.create_task(run.embed_worker(embed_s, w))
                      for w in range(cfg.embed_concurrency)]
        if on_progress is not None:
            tasks.append(asyncio.create_task(
                _progress_loop(run, on_progress, progress_interval_s)))

        waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            remaining = run.we - perf_counter()
            if waiter is not None:
                await asyncio.wait([waiter], timeout=max(0.0, remaining))
            else:
                await asyncio.sleep(max(0.0, remaining))
            # asyncio timers may fire up to a millisecond early or late; the window is
            # defined by the clock, so make sure it has passed before stopping.
            while (waiter is None or not waiter.done()) and perf_counter() < run.we:
                await asyncio.sleep(run.we - perf_counter())
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()
        stopped_at = perf_counter()
        cut_short = stopped_at < run.we
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close()
    return BenchResult(config=cfg, started_at=started_at, t0=run.t0, window_start=run.ws,
                       window_end=run.we, stopped_at=stopped_at, cut_short=cut_short,
                       gen=run.gen, embed=run.embed)
