"""A controllable OpenAI-compatible server for testing load generators.

It streams completions at a known rate (first token `ttft_ms` after the request arrives,
then one chunk every `itl_ms`), answers embeddings (float or base64) after a known latency,
and can fail on purpose (a non-2xx answer on every Nth request, or a connection dropped
mid-stream). It does no model work at all, so what a client measures against it is the
client's own error.

Run it in its own process so that its event loop does not share a core with the client:

    python3 -m coserve.bench.stream_server --port 8000 --ttft-ms 50 --itl-ms 10

or from Python (tests, benchmarks): ``with spawn(ttft_ms=50, itl_ms=10) as srv: srv.url``.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies, chunked SSE answers) on
a bare asyncio protocol: an aiohttp server tops out at a few tens of thousands of SSE
writes per second on one core, well below what the load generator has to be shown to take.
Chunks leave up to 1 ms late (asyncio's timer granularity), or within some 20 us of their
time with `--precise` (see `_PreciseEpollSelector`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import heapq
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields

__all__ = ["StreamServerConfig", "StreamServer", "spawn", "SpawnedServer", "main"]


@dataclass
class StreamServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "stream-test"
    # Generation: first chunk `ttft_ms` after the request is read, then one chunk every
    # `itl_ms`. `tokens` overrides the request's max_tokens (None: honour max_tokens).
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    tokens: int | None = None
    tokens_per_chunk: int = 1  # tokens carried by each chunk (the last may carry fewer)
    token_ids: bool = False  # put the chunk's new token ids in each chunk ("token_ids")
    usage: bool = True  # answer stream_options.include_usage with a final usage chunk
    # Embeddings: answered `embed_latency_ms` after the request is read.
    embed_latency_ms: float = 20.0
    embed_dim: int = 8
    # Failures. Every `fail_every`-th request (counted per endpoint, 1-based) is answered
    # with `fail_status`; every `drop_every`-th gen request has its connection cut after
    # `drop_after` chunks (embeddings: before any answer).
    fail_every: int = 0
    fail_status: int = 503
    fail_message: str = "injected failure"
    drop_every: int = 0
    drop_after: int = 1
    api_key: str | None = None
    # Spin instead of sleeping when a chunk is due within a millisecond: chunks then leave
    # within ~20 us of their time instead of up to 1 ms late, at the cost of a busy core.
    precise: bool = False
    # Processes sharing the port (SO_REUSEPORT), for rates one core cannot write. Each counts
    # its own requests for fail_every / drop_every.
    workers: int = 1
    # Where each server process writes its counters and chunk lateness when it stops.
    stats_dir: str | None = None


# --------------------------------------------------------------------------- timing


class _PreciseEpollSelector(selectors.EpollSelector):
    """epoll waits in whole milliseconds and Python rounds a timeout *up*, so an asyncio
    timer fires up to 1 ms late. Here a wait is rounded *down* (the loop wakes early, finds
    the timer not due and asks again) and under a millisecond it does not block at all: the
    loop spins until the timer is due. That keeps chunks within some 20 us of their time at
    the price of a busy core while timers are pending (`--precise`; a sleep instead of the
    spin oversleeps by 50-100 us, and under load in a VM by much more)."""

    def select(self, timeout=None):
        if timeout is not None and timeout > 0:
            ms = int(timeout * 1000.0)
            timeout = 0 if ms == 0 else (ms - 0.5) / 1000.0  # rounded up to exactly `ms`
        return super().select(timeout)


def new_event_loop(precise: bool = False) -> asyncio.AbstractEventLoop:
    if precise and hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(_PreciseEpollSelector())
    return asyncio.new_event_loop()


# --------------------------------------------------------------------------- HTTP bits

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _head(status: int, ctype: bytes, length: int | None) -> bytes:
    reason = _REASONS.get(status, "Error").encode()
    h = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n" % (status, reason, ctype)
    if length is None:
        h += b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
    else:
        h += b"Content-Length: %d\r\n" % length
    return h + b"Connection: keep-alive\r\n\r\n"


def _json_response(status: int, obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _head(status, b"application/json", len(body)) + body


def _error(status: int, message: str, etype: str = "invalid_request_error") -> bytes:
    return _json_response(status, {"error": {"message": message, "type": etype,
                                             "param": None, "code": status}})


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024


class _Stream:
    """One streamed completion in flight on a connection."""

    __slots__ = ("conn", "n_tokens", "sent", "chunk_no", "t0", "prefix", "usage", "drop_after",
                 "prompt_tokens", "plain", "due")

    def __init__(self, conn, n_tokens, t0, prefix, usage, drop_after, prompt_tokens, plain):
        self.conn = conn
        self.n_tokens = n_tokens
        self.sent = 0
        self.chunk_no = 0
        self.t0 = t0
        self.prefix = prefix
        self.usage = usage
        self.drop_after = drop_after
        self.prompt_tokens = prompt_tokens
        self.plain = plain  # the framed chunk of a one-token, not-last chunk (None: build it)
        self.due = 0.0  # when its next chunk is due (loop time)


class _Conn(asyncio.Protocol):
    def __init__(self, server: StreamServer):
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.buf = b""
        self.busy = False  # a response is being produced; later requests wait in buf
        self.closed = False
        self.pending = None  # timer handle of the response in progress
        self.stream: _Stream | None = None

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # no Nagle: a chunk must leave when it is written
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(self)

    def connection_lost(self, exc):
        self.closed = True
        self.server.conns.discard(self)
        if self.pending is not None:
            self.pending.cancel()
        self.stream = None  # its next tick finds the connection closed

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self._next_request()

    # request handling
    def _next_request(self):
        while not self.busy and not self.closed and self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._send_and_close(_error(413, "request head too large"))
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, path, _version = lines[0].split(" ", 2)
            except ValueError:
                self._send_and_close(_error(400, "bad request line"))
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._send_and_close(_error(400, "chunked request bodies are not supported"))
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._send_and_close(_error(400, "bad Content-Length"))
                return
            if length > _MAX_BODY:
                self._send_and_close(_error(413, "request body too large"))
                return
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.busy = True
            self.server.handle(self, method, path.split("?", 1)[0], headers, body)

    def finish(self, data: bytes = b""):
        """Write the last bytes of a response and go on to the next request, if any."""
        if self.closed:
            return
        if data:
            self.transport.write(data)
        self.busy = False
        self.pending = None
        self.stream = None
        if self.buf:
            self._next_request()

    def _send_and_close(self, data: bytes):
        if not self.closed:
            self.transport.write(data)
            self.transport.close()
        self.closed = True

    def drop(self):
        if not self.closed:
            self.closed = True
            self.transport.abort()


class StreamServer:
    def __init__(self, cfg: StreamServerConfig, loop: asyncio.AbstractEventLoop | None = None):
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.conns: set[_Conn] = set()
        self.counts = {"completions": 0, "embeddings": 0}
        self.served = {"completions": 0, "embeddings": 0, "failed": 0, "dropped": 0}
        self._server = None
        self._created = int(time.time())
        self._embed_cache: dict[tuple[int, str], bytes] = {}  # (inputs, encoding) -> data
        # How late chunks left, in 10 us bins up to 10 ms (the last bin: later): what the
        # server itself adds to the ITL a client measures.
        self.late_hist = [0] * 1001
        self._due: dict[int, list[_Stream]] = {}  # tick -> streams with a chunk due then
        self._ticks: list[int] = []  # heap of the ticks in _due
        self._armed: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket | None = None) -> int:
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Conn(self), sock=sock,
                                                         backlog=4096)
        else:
            self._server = await self.loop.create_server(
                lambda: _Conn(self), self.cfg.host, self.cfg.port, backlog=4096,
                reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    def stats(self) -> dict:
        return {"served": dict(self.served), "requests": dict(self.counts),
                "chunk_lateness_hist_10us": self.late_hist}

    async def close(self):
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.drop()
        if self._server is not None:
            await self._server.wait_closed()

    # routing
    def handle(self, conn: _Conn, method: str, path: str, headers: dict, body: bytes):
        cfg = self.cfg
        if cfg.api_key is not None and path.startswith("/v1/"):
            if headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                conn.finish(_error(401, "invalid API key", "authentication_error"))
                return
        if path in ("/health", "/ping"):
            conn.finish(_head(200, b"text/plain", 2) + b"ok")
        elif path == "/v1/models":
            conn.finish(_json_response(200, {"object": "list", "data": [
                {"id": cfg.model, "object": "model", "created": self._created,
                 "owned_by": "coserve-stream-server"}]}))
        elif path in ("/v1/completions", "/v1/embeddings"):
            if method != "POST":
                conn.finish(_error(405, f"{path} takes POST"))
                return
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as e:
                conn.finish(_error(400, f"bad JSON body: {e}"))
                return
            kind = "completions" if path == "/v1/completions" else "embeddings"
            self.counts[kind] += 1
            n = self.counts[kind]
            if cfg.fail_every and n % cfg.fail_every == 0:
                self.served["failed"] += 1
                conn.finish(_error(cfg.fail_status, cfg.fail_message, "server_error"))
                return
            drop = bool(cfg.drop_every and n % cfg.drop_every == 0)
            if kind == "completions":
                self._completion(conn, req, drop)
            else:
                self._embedding(conn, req, drop)
        else:
            conn.finish(_error(404, f"no route {method} {path}"))

    # /v1/completions
    def _completion(self, conn: _Conn, req: dict, drop: bool):
        cfg = self.cfg
        t0 = self.loop.time()
        prompt = req.get("prompt", "")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_tokens = len(prompt)
        elif isinstance(prompt, str):
            prompt_tokens = max(1, len(prompt.split()))
        else:
            conn.finish(_error(400, "prompt must be a string or a list of token ids"))
            return
        max_tokens = req.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            conn.finish(_error(400, "max_tokens must be a positive integer"))
            return
        n_tokens = cfg.tokens if cfg.tokens is not None else max_tokens
        model = req.get("model") or cfg.model
        rid = f"cmpl-{id(conn):x}{self.counts['completions']}"
        meta = (f'{{"id":"{rid}","object":"text_completion","created":{self._created},'
                f'"model":{json.dumps(model)},"choices":[').encode()
        if not req.get("stream"):
            def answer():
                body = meta.decode() + json.dumps(
                    {"index": 0, "text": " tok" * n_tokens, "logprobs": None,
                     "finish_reason": "length"}) + (
                    f'],"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":'
                    f'{n_tokens},"total_tokens":{prompt_tokens + n_tokens}}}}}')
                data = body.encode()
                self.served["completions"] += 1
                conn.finish(_head(200, b"application/json", len(data)) + data)
            when = t0 + (cfg.ttft_ms + (n_tokens - 1) * cfg.itl_ms) / 1000.0
            conn.pending = self.loop.call_at(when, answer)
            return
        usage = bool(cfg.usage and (req.get("stream_options") or {}).get("include_usage"))
        prefix = b"data: " + meta
        plain = None
        if cfg.tokens_per_chunk == 1 and not cfg.token_ids:
            plain = _chunk(prefix + b'{"index":0,"text":" tok","logprobs":null,'
                                    b'"finish_reason":null}],"usage":null}\n\n')
        st = _Stream(conn, n_tokens, t0, prefix, usage, cfg.drop_after if drop else -1,
                     prompt_tokens, plain)
        conn.stream = st
        conn.transport.write(_head(200, b"text/event-stream", None))
        self._schedule(st, t0 + cfg.ttft_ms / 1000.0)

    # Chunks are scheduled on a 50 us grid (a chunk moves by at most 25 us) in a heap of
    # plain ints, with one asyncio timer armed for the earliest: asyncio's own timer heap
    # compares handles in Python and would cost more per chunk than the chunk itself.
    _TICK = 50e-6

    def _schedule(self, st: _Stream, when: float) -> None:
        st.due = when
        tick = int(when * 20000.0 + 0.5)  # round(when / _TICK)
        due = self._due.get(tick)
        if due is None:
            self._due[tick] = [st]
            heapq.heappush(self._ticks, tick)
            if self._armed is None or tick < self._armed:
                self._arm(tick)
        else:
            due.append(st)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = tick
        self._timer = self.loop.call_at(tick * self._TICK, self._run_due)

    def _run_due(self) -> None:
        self._timer = self._armed = None
        ticks, due, emit = self._ticks, self._due, self._emit
        now = self.loop.time() * 20000.0 + 0.5
        while ticks and ticks[0] <= now:
            for st in due.pop(heapq.heappop(ticks)):
                emit(st)
        if ticks:
            self._arm(ticks[0])

    def _emit(self, st: _Stream):
        conn = st.conn
        if conn.closed or conn.transport.is_closing():
            return
        late = int((time.monotonic() - st.due) * 1e5)
        self.late_hist[late if 0 <= late < 1000 else (0 if late < 0 else 1000)] += 1
        cfg = self.cfg
        if st.chunk_no == st.drop_after:
            self.served["dropped"] += 1
            conn.drop()
            return
        k = min(cfg.tokens_per_chunk, st.n_tokens - st.sent)
        first = st.sent
        st.sent += k
        st.chunk_no += 1
        last = st.sent >= st.n_tokens
        if st.plain is not None and not last:
            conn.transport.write(st.plain)
            self._schedule(st, st.t0 + (cfg.ttft_ms + st.chunk_no * cfg.itl_ms) / 1000.0)
            return
        tail = b',"token_ids":[%s]' % ",".join(str(first + i) for i in range(k)).encode() \
            if cfg.token_ids else b""
        fin = b'"length"' if last else b"null"
        ev = (st.prefix + b'{"index":0,"text":"' + b" tok" * k +
              b'","logprobs":null,"finish_reason":' + fin + tail + b'}],"usage":null}\n\n')
        if last:
            out = _chunk(ev)
            if st.usage:
                u = st.prefix + (b'],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
                                 b'"total_tokens":%d}}\n\n' % (st.prompt_tokens, st.sent,
                                                              st.prompt_tokens + st.sent))
                out += _chunk(u)
            out += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            self.served["completions"] += 1
            conn.finish(out)
            return
        conn.transport.write(_chunk(ev))
        self._schedule(
            st, st.t0 + (cfg.ttft_ms + st.chunk_no * cfg.tokens_per_chunk * cfg.itl_ms) / 1000.0)

    # /v1/embeddings
    def _embedding(self, conn: _Conn, req: dict, drop: bool):
        cfg = self.cfg
        inp = req.get("input")
        if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = inp
        else:
            conn.finish(_error(400, "input must be a string, a list of strings, token ids, "
                                    "or a list of token-id lists"))
            return
        fmt = req.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            conn.finish(_error(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}"))
            return
        n = len(inputs)
        n_tok = sum(len(x) if isinstance(x, list) else max(1, len(x.split())) for x in inputs)
        if (n, fmt) not in self._embed_cache:
            if fmt == "base64":  # little-endian float32s, as the openai client decodes them
                raw = struct.pack(f"<{cfg.embed_dim}f", *[0.1] * cfg.embed_dim)
                vec = '"' + base64.b64encode(raw).decode() + '"'
            else:
                vec = "[" + ",".join(["0.1"] * cfg.embed_dim) + "]"
            self._embed_cache[n, fmt] = ",".join(
                f'{{"object":"embedding","index":{i},"embedding":{vec}}}' for i in range(n)
            ).encode()
        data = self._embed_cache[n, fmt]
        model = json.dumps(req.get("model") or cfg.model).encode()

        def answer():
            if drop:
                self.served["dropped"] += 1
                conn.drop()
                return
            body = (b'{"object":"list","data":[' + data + b'],"model":' + model
                    + b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (n_tok, n_tok))
            self.served["embeddings"] += 1
            conn.finish(_head(200, b"application/json", len(body)) + body)

        conn.pending = self.loop.call_at(self.loop.time() + cfg.embed_latency_ms / 1000.0, answer)


# --------------------------------------------------------------------------- running it


def _listen_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                          socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if n > 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]  # the others join the port the first one got
        s.listen(4096)
        s.setblocking(False)
        socks.append(s)
    return socks


def _serve_socket(cfg: StreamServerConfig, sock: socket.socket, on_ready=None) -> None:
    loop = new_event_loop(cfg.precise)
    asyncio.set_event_loop(loop)
    server = StreamServer(cfg, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    async def run():
        await server.start(sock)
        gc.collect()  # then keep the collector from pausing chunk timers (see loadgen)
        gc.freeze()
        gc.set_threshold(100_000, 50, 1000)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        await server.close()
        if cfg.stats_dir:
            path = os.path.join(cfg.stats_dir, f"stream-server-{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump(server.stats(), f)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def serve(cfg: StreamServerConfig, ready_file=None) -> None:
    """Run the server in this process (and `cfg.workers - 1` forked ones sharing its port
    through SO_REUSEPORT) until SIGINT/SIGTERM."""
    socks = _listen_sockets(cfg.host, cfg.port, max(1, cfg.workers))
    port = socks[0].getsockname()[1]

    def ready():
        print(f"coserve stream server listening on http://{cfg.host}:{port}", flush=True)
        if ready_file:
            with open(ready_file, "w") as f:
                f.write(str(port))

    if len(socks) == 1:
        _serve_socket(cfg, socks[0], ready)
        return
    pids = []
    for i, sock in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            for j, other in enumerate(socks):
                if j != i:
                    other.close()
            try:
                _serve_socket(cfg, sock)
            finally:
                os._exit(0)
        pids.append(pid)
    for sock in socks:
        sock.close()
    stopping = []

    def forward(sig, _frame):
        stopping.append(sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready()  # the sockets listen already: connections queue until a worker accepts
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m coserve.bench.stream_server",
                                description=__doc__.split("\n\n")[0])
    d = StreamServerConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0: any free port (printed)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--ttft-ms", type=float, default=d.ttft_ms)
    p.add_argument("--itl-ms", type=float, default=d.itl_ms)
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per completion, whatever max_tokens says")
    p.add_argument("--tokens-per-chunk", type=int, default=d.tokens_per_chunk)
    p.add_argument("--token-ids", action="store_true", help="send token_ids in each chunk")
    p.add_argument("--no-usage", dest="usage", action="store_false",
                   help="never send the final usage chunk")
    p.add_argument("--embed-latency-ms", type=float, default=d.embed_latency_ms)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=d.fail_status)
    p.add_argument("--fail-message", default=d.fail_message)
    p.add_argument("--drop-every", type=int, default=0)
    p.add_argument("--drop-after", type=int, default=d.drop_after)
    p.add_argument("--api-key", default=None)
    p.add_argument("--precise", action="store_true",
                   help="spin rather than sleep when a chunk is due within 1 ms "
                        "(exact timing, one busy core)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port, for rates one core cannot write")
    p.add_argument("--stats-dir", default=None,
                   help="on exit, each process writes its counts and chunk lateness here")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    ready_file = args.pop("ready_file")
    serve(StreamServerConfig(**args), ready_file)
    return 0


class SpawnedServer:
    """A stream server in a child process. Use as a context manager; `url` is its base URL."""

    def __init__(self, proc: subprocess.Popen, url: str, cfg: StreamServerConfig):
        self.proc = proc
        self.url = url
        self.cfg = cfg
        self.port = int(url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def spawn(timeout: float = 20.0, **options) -> SpawnedServer:
    """Start `python3 -m coserve.bench.stream_server` with StreamServerConfig `options`
    (port 0 by default: a free port) and wait until it listens."""
    cfg = StreamServerConfig(**options)
    argv = [sys.executable, "-m", "coserve.bench.stream_server"]
    defaults = StreamServerConfig()
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v == getattr(defaults, f.name) and f.name != "port":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("token_ids", "precise"):
            argv += [flag] if v else []
        elif f.name == "usage":
            argv += [] if v else ["--no-usage"]
        elif v is not None:
            argv += [flag, str(v)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on " in line:
            url = line.strip().rsplit(" ", 1)[1]
            return SpawnedServer(proc, url, cfg)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"stream server did not start (exit {proc.returncode}, last line {line!r}; "
                       f"config {asdict(cfg)})")


if __name__ == "__main__":
    raise SystemExit(main())
