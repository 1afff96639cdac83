"""The HTTP/1.1 side of the stream test server (stream_server.py): a bare asyncio protocol
with keep-alive, Content-Length request bodies and chunked answers, and an event loop whose
timers can fire within some 20 us (`--precise`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import socket

__all__ = ["Conn", "chunk", "error", "head", "json_response", "new_event_loop"]


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

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def head(status: int, ctype: bytes, length: int | None) -> bytes:
    reason = _REASONS.get(status, "Error").encode()
    h = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n" % (status, reason, ctype)
    if length is None:
        h += b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
    else:
        h += b"Content-Length: %d\r\n" % length
    return h + b"Connection: keep-alive\r\n\r\n"


def json_response(status: int, obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return head(status, b"application/json", len(body)) + body


def error(status: int, message: str, etype: str = "invalid_request_error") -> bytes:
    return json_response(
        status, {"error": {"message": message, "type": etype, "param": None, "code": status}}
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024


class Conn(asyncio.Protocol):
    """One client connection; requests are handed to `server.handle` one at a time."""

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.buf = b""
        self.busy = False  # a response is being produced; later requests wait in buf
        self.closed = False
        self.pending = None  # timer handle of the response in progress
        self.stream = None  # the streamed answer in progress

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
                    self._send_and_close(error(413, "request head too large"))
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, path, _version = lines[0].split(" ", 2)
            except ValueError:
                self._send_and_close(error(400, "bad request line"))
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._send_and_close(error(400, "chunked request bodies are not supported"))
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._send_and_close(error(400, "bad Content-Length"))
                return
            if length > _MAX_BODY:
                self._send_and_close(error(413, "request body too large"))
                return
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
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
