"""The stream test server's model-free answers (see stream_server.py): completions and chat
completions streamed at a known rate, embeddings after a known latency, failures on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import json
import socket
import struct
import time

from coserve.bench.stream_config import StreamServerConfig
from coserve.bench.stream_http import Conn, chunk, error, head, json_response

__all__ = ["StreamServer"]


_ROUTES = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
}
# The bytes of a streamed choice around its text, up to the finish reason's value.
_TEXT = (b'{"index":0,"text":"', b'","logprobs":null,"finish_reason":')
_CHAT = (b'{"index":0,"delta":{"content":"', b'"},"logprobs":null,"finish_reason":')


def _prompt_tokens(req: dict, chat: bool) -> int | str:
    """The prompt's length in tokens (words for text), or the error message."""
    if chat:
        msgs = req.get("messages")
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)
        ):
            return "messages must be a non-empty list of {role, content} objects"
        return max(1, sum(len(m["content"].split()) for m in msgs))
    prompt = req.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    return "prompt must be a string or a list of token ids"


class _Stream:
    """One streamed completion (or chat completion) in flight on a connection."""

    __slots__ = (
        "conn",
        "n_tokens",
        "sent",
        "chunk_no",
        "t0",
        "prefix",
        "usage",
        "drop_after",
        "prompt_tokens",
        "plain",
        "due",
        "open",
        "close",
        "first",
        "kind",
    )

    def __init__(self, conn, n_tokens, t0, prefix, usage, drop_after, prompt_tokens, chat):
        self.conn = conn
        self.n_tokens = n_tokens
        self.sent = 0
        self.chunk_no = 0
        self.t0 = t0
        self.prefix = prefix
        self.usage = usage
        self.drop_after = drop_after
        self.prompt_tokens = prompt_tokens
        self.plain = None  # the framed chunk of a one-token, not-last chunk (None: build it)
        self.due = 0.0  # when its next chunk is due (loop time)
        self.kind = "chat" if chat else "completions"
        # the choice around a chunk's text, and what goes before the first chunk
        self.open, self.close = _CHAT if chat else _TEXT
        self.first = (
            (
                prefix + b'{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
            )
            if chat
            else b""
        )


class StreamServer:
    def __init__(self, cfg: StreamServerConfig, loop: asyncio.AbstractEventLoop | None = None):
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.conns: set[Conn] = set()
        self.counts = {"completions": 0, "chat": 0, "embeddings": 0}
        self.served = {"completions": 0, "chat": 0, "embeddings": 0, "failed": 0, "dropped": 0}
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
            self._server = await self.loop.create_server(
                lambda: Conn(self), sock=sock, backlog=4096
            )
        else:
            self._server = await self.loop.create_server(
                lambda: Conn(self), self.cfg.host, self.cfg.port, backlog=4096, reuse_address=True
            )
        return self._server.sockets[0].getsockname()[1]

    def stats(self) -> dict:
        return {
            "served": dict(self.served),
            "requests": dict(self.counts),
            "chunk_lateness_hist_10us": self.late_hist,
        }

    async def close(self):
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.drop()
        if self._server is not None:
            await self._server.wait_closed()

    # routing
    def handle(self, conn: Conn, method: str, path: str, headers: dict, body: bytes):
        cfg = self.cfg
        if cfg.api_key is not None and path.startswith("/v1/"):
            if headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                conn.finish(error(401, "invalid API key", "authentication_error"))
                return
        if path in ("/health", "/ping"):
            conn.finish(head(200, b"text/plain", 2) + b"ok")
        elif path == "/v1/models":
            conn.finish(
                json_response(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": cfg.model,
                                "object": "model",
                                "created": self._created,
                                "owned_by": "coserve-stream-server",
                            }
                        ],
                    },
                )
            )
        elif path in _ROUTES:
            if method != "POST":
                conn.finish(error(405, f"{path} takes POST"))
                return
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as e:
                conn.finish(error(400, f"bad JSON body: {e}"))
                return
            kind = _ROUTES[path]
            self.counts[kind] += 1
            n = self.counts[kind]
            if cfg.fail_every and n % cfg.fail_every == 0:
                self.served["failed"] += 1
                conn.finish(error(cfg.fail_status, cfg.fail_message, "server_error"))
                return
            drop = bool(cfg.drop_every and n % cfg.drop_every == 0)
            delay = cfg.slow_ms / 1000.0 if cfg.slow_every and n % cfg.slow_every == 0 else 0.0
            if kind == "embeddings":
                self._embedding(conn, req, drop, delay)
            else:
                self._completion(conn, req, drop, delay, kind == "chat")
        else:
            conn.finish(error(404, f"no route {method} {path}"))

    # /v1/completions and /v1/chat/completions
    def _completion(self, conn: Conn, req: dict, drop: bool, delay: float, chat: bool):
        cfg = self.cfg
        t0 = self.loop.time() + delay
        prompt_tokens = _prompt_tokens(req, chat)
        if isinstance(prompt_tokens, str):
            conn.finish(error(400, prompt_tokens))
            return
        key = "max_completion_tokens" if chat and "max_completion_tokens" in req else "max_tokens"
        max_tokens = req.get(key, 16)
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            conn.finish(error(400, f"{key} must be a positive integer"))
            return
        n_tokens = cfg.tokens if cfg.tokens is not None else max_tokens
        model = req.get("model") or cfg.model
        kind = "chat" if chat else "completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{id(conn):x}{self.counts[kind]}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        if not req.get("stream"):

            def answer():
                text = " tok" * n_tokens
                choice = (
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length",
                    }
                    if chat
                    else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
                )
                data = json.dumps(
                    {
                        "id": rid,
                        "object": "chat.completion" if chat else "text_completion",
                        "created": self._created,
                        "model": model,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": n_tokens,
                            "total_tokens": prompt_tokens + n_tokens,
                        },
                    },
                    separators=(",", ":"),
                ).encode()
                self.served[kind] += 1
                conn.finish(head(200, b"application/json", len(data)) + data)

            when = t0 + (cfg.ttft_ms + (n_tokens - 1) * cfg.itl_ms) / 1000.0
            conn.pending = self.loop.call_at(when, answer)
            return
        usage = bool(cfg.usage and (req.get("stream_options") or {}).get("include_usage"))
        prefix = (
            f'data: {{"id":"{rid}","object":"{obj}","created":{self._created},'
            f'"model":{json.dumps(model)},"choices":['
        ).encode()
        st = _Stream(
            conn, n_tokens, t0, prefix, usage, cfg.drop_after if drop else -1, prompt_tokens, chat
        )
        if cfg.tokens_per_chunk == 1 and not cfg.token_ids:
            st.plain = chunk(prefix + st.open + b" tok" + st.close + b'null}],"usage":null}\n\n')
        conn.stream = st
        conn.transport.write(head(200, b"text/event-stream", None))
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
            if cfg.drop_as_error:
                conn.finish(
                    chunk(
                        b'data: {"error":{"message":"injected error event",'
                        b'"type":"server_error","code":500}}\n\n'
                    )
                    + chunk(b"data: [DONE]\n\n")
                    + b"0\r\n\r\n"
                )
            else:
                conn.drop()
            return
        k = min(cfg.tokens_per_chunk, st.n_tokens - st.sent)
        first = st.sent
        st.sent += k
        st.chunk_no += 1
        last = st.sent >= st.n_tokens
        if st.first:  # chat: the role chunk leaves with the first token
            conn.transport.write(chunk(st.first))
            st.first = b""
        if st.plain is not None and not last:
            conn.transport.write(st.plain)
            self._schedule(st, st.t0 + (cfg.ttft_ms + st.chunk_no * cfg.itl_ms) / 1000.0)
            return
        tail = (
            b',"token_ids":[%s]' % ",".join(str(first + i) for i in range(k)).encode()
            if cfg.token_ids
            else b""
        )
        fin = b'"length"' if last else b"null"
        ev = st.prefix + st.open + b" tok" * k + st.close + fin + tail + b'}],"usage":null}\n\n'
        if last:
            out = chunk(ev)
            if st.usage:
                u = st.prefix + (
                    b'],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
                    b'"total_tokens":%d}}\n\n'
                    % (st.prompt_tokens, st.sent, st.prompt_tokens + st.sent)
                )
                out += chunk(u)
            out += chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            self.served[st.kind] += 1
            conn.finish(out)
            return
        conn.transport.write(chunk(ev))
        self._schedule(
            st, st.t0 + (cfg.ttft_ms + st.chunk_no * cfg.tokens_per_chunk * cfg.itl_ms) / 1000.0
        )

    # /v1/embeddings
    def _embedding(self, conn: Conn, req: dict, drop: bool, delay: float):
        cfg = self.cfg
        inp = req.get("input")
        if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = inp
        else:
            conn.finish(
                error(
                    400,
                    "input must be a string, a list of strings, token ids, "
                    "or a list of token-id lists",
                )
            )
            return
        fmt = req.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            conn.finish(error(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}"))
            return
        fmt = cfg.embed_answer_encoding or fmt  # a server that answers one way only
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
            body = (
                b'{"object":"list","data":['
                + data
                + b'],"model":'
                + model
                + b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (n_tok, n_tok)
            )
            self.served["embeddings"] += 1
            conn.finish(head(200, b"application/json", len(body)) + body)

        conn.pending = self.loop.call_at(
            self.loop.time() + delay + cfg.embed_latency_ms / 1000.0, answer
        )
