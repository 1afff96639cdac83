"""Counting a streamed completion (`/v1/completions` or `/v1/chat/completions`) as its bytes
arrive: the measured fast path `GenStream`, and `ReferenceStream`, a plain parser of the same
rules that the tests hold it against on the same byte streams.

The rules (both classes): a server-sent event's data is JSON or `[DONE]`. A chunk with a
choice carries tokens: `len(token_ids)` when it has them, else completions count 1 unless its
text is empty *and* it has a finish reason (an empty closing chunk), chat counts 1 when its
`delta.content` (or `delta.reasoning_content`, as vLLM's and SGLang's reasoning parsers
send) is a non-empty string (the role chunk, `"content":""`, carries none). The
`usage` object gives completion and prompt tokens; an `error` object (or `"object":"error"`)
is an error event. ITL gaps are between consecutive token-bearing chunks; a chunk whose
arrival is in [ws, we) puts its gap and its tokens in the window.
"""

from __future__ import annotations

import asyncio
import json
from array import array

from coserve.bench.client import error_message

__all__ = ["GenStream", "ReferenceStream", "choice_tokens", "sse_data"]

_CONTENT = b'"content":"'
_REASONING = b'"reasoning_content":"'


def choice_tokens(choices, chat: bool) -> int:
    """Tokens in a parsed chunk's choices (the first one: n = 1 requests)."""
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return 0
    c = choices[0]
    ids = c.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if chat:
        delta = c.get("delta") if isinstance(c.get("delta"), dict) else {}
        return (
            1
            if any(
                isinstance(delta.get(k), str) and delta[k] for k in ("content", "reasoning_content")
            )
            else 0
        )
    if c.get("text") == "" and c.get("finish_reason") is not None:
        return 0
    return 1


def sse_data(ev: bytes) -> bytes | None:
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


def _event_error(obj: dict) -> str | None:
    err = obj.get("error") or (obj if obj.get("object") == "error" else None)
    return error_message(json.dumps({"error": err}).encode()) if err else None


class GenStream:
    """Counts one streamed answer as its bytes arrive. `feed` runs once per piece of body the
    HTTP parser hands over (usually one SSE event), stamped with the time it was read from
    the socket. Its window tokens (`win_tok`) and gaps (`itl`) stay here until the request
    ends: the worker adds them to the endpoint's only when the request did not fail."""

    __slots__ = (
        "ep",
        "chat",
        "ws",
        "we",
        "itl",
        "itl_append",
        "buf",
        "st",
        "first",
        "last",
        "nchunks",
        "ntok",
        "win_tok",
        "usage_tokens",
        "prompt_tokens",
        "error",
        "error_event",
        "chunk_times",
        "fut",
        "fast_prefix",
        "fast_suffix",
        "fast_len",
        "fast_min",
    )

    def __init__(self, ep, ws: float, we: float, record_chunks: bool, chat: bool = False):
        self.ep = ep  # its tokens_total is kept live for the progress display
        self.chat = chat
        self.ws = ws
        self.we = we
        self.itl = array("d")
        self.itl_append = self.itl.append
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
        self.fast_min = 0  # a chunk of the shape with a non-empty text is longer than this

    def feed(self, data: bytes, t: float) -> None:
        p = self.fast_prefix
        if (
            p is not None
            and not self.buf
            and len(data) > self.fast_min
            and data.startswith(p)
            and data.endswith(self.fast_suffix)
            and data.find(b"\n\n", self.fast_len) == len(data) - 2
        ):
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
            self._general(data, t)
        except Exception as e:  # never let a bad chunk escape into aiohttp's protocol
            self.fail(e)

    def _general(self, data: bytes, t: float) -> None:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self.buf = events.pop()
        got = 0
        for ev in events:
            if not ev.startswith(b"data: {"):
                ev = sse_data(ev)
                if ev is None or ev == b"[DONE]":
                    continue
            obj = None
            j = ev.find(b'"choices":[{')
            if j >= 0:  # compact JSON with a choice: it may carry tokens
                k = ev.find(b'"token_ids":[', j)
                if k >= 0:
                    seg = ev[k + 13 : ev.find(b"]", k)]
                    n = seg.count(b",") + 1 if seg.strip() else 0
                elif self.chat:
                    k = ev.find(_CONTENT, j)
                    n = 0 if k < 0 or ev[k + 11 : k + 12] == b'"' else 1
                    if not n:
                        k = ev.find(_REASONING, j)
                        n = 0 if k < 0 or ev[k + 21 : k + 22] == b'"' else 1
                elif b'"text":""' in ev and b'"finish_reason":null' not in ev:
                    n = 0  # an empty closing chunk: no token in it
                else:
                    n = 1
                if n == 1 and self.fast_prefix is None and not self.nchunks:
                    self._learn_shape(ev, j)
            elif b'"choices"' in ev and b'"choices":[]' not in ev:
                # JSON written with spaces (or keys in another order): parse it
                obj = json.loads(ev[ev.find(b"{") :])
                n = choice_tokens(obj.get("choices"), self.chat)
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
                if b'"error"' not in ev and (b'"usage"' not in ev or b'"usage":null' in ev):
                    continue
                obj = json.loads(ev[ev.find(b"{") :])
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usage_tokens = usage.get("completion_tokens")
                self.prompt_tokens = usage.get("prompt_tokens")
            err = _event_error(obj)
            if err:
                self.error_event = err
        if got:
            self.ntok += got
            self.ep.tokens_total += got
            if self.ws <= t < self.we:
                self.win_tok += got

    def _learn_shape(self, ev: bytes, j: int) -> None:
        """From the first plain chunk (one choice, a text, no token_ids, no usage), keep
        the bytes before its text and after it: later chunks that start and end with
        exactly those, with one event in between, are one-token chunks."""
        key = _CONTENT if self.chat else b'"text":"'
        i = ev.find(key, j)
        if i < 0:
            return
        i += len(key)
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
        if k == i:
            return  # an empty text: not the shape of a token chunk
        suffix = ev[k:]
        if b"token_ids" in suffix or b'"usage":{' in suffix or b"\n" in suffix:
            return
        self.fast_prefix = ev[:i]
        self.fast_suffix = suffix + b"\n\n"
        self.fast_len = i
        self.fast_min = i + len(self.fast_suffix)

    def eof(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


class ReferenceStream:
    """The same rules as `GenStream`, written plainly: buffer, split on blank lines, read
    each event's data lines, parse every JSON. For tests; too slow for the load path.
    `chunks` holds (arrival time, tokens) of each token-bearing chunk."""

    def __init__(self, ws: float, we: float, chat: bool = False):
        self.ws, self.we, self.chat = ws, we, chat
        self.buf = b""
        self.chunks: list[tuple[float, int]] = []
        self.usage_tokens = self.prompt_tokens = None
        self.error_event: str | None = None
        self.error: BaseException | None = None

    def feed(self, data: bytes, t: float) -> None:
        if self.error is not None:
            return
        self.buf = (self.buf + data).replace(b"\r\n", b"\n")
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            payload = sse_data(ev)
            if payload is None or payload == b"[DONE]":
                continue
            try:
                obj = json.loads(payload)
            except ValueError as e:
                self.error = e
                return
            n = choice_tokens(obj.get("choices"), self.chat)
            if n:
                self.chunks.append((t, n))
            if isinstance(obj.get("usage"), dict):
                self.usage_tokens = obj["usage"].get("completion_tokens")
                self.prompt_tokens = obj["usage"].get("prompt_tokens")
            self.error_event = _event_error(obj) or self.error_event

    @property
    def ntok(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def win_tok(self) -> int:
        return sum(n for t, n in self.chunks if self.ws <= t < self.we)

    @property
    def itl(self) -> list[float]:
        ts = [t for t, _ in self.chunks]
        return [b - a for a, b in zip(ts, ts[1:], strict=False) if self.ws <= b < self.we]
