"""The HTTP side of the load generator: URLs, error bodies, the start-up model check, and
reading a streamed body straight from aiohttp's protocol."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

__all__ = ["BenchError", "consume", "error_message", "exc_message", "join", "resolve_model"]

perf_counter = time.perf_counter


class BenchError(RuntimeError):
    """The run cannot start (endpoint unreachable, no model to pick); the message says why."""


def join(base: str, path: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + path


def error_message(body: bytes) -> str:
    """The message of an error answer: an OpenAI error body unpacked, else the text (cut)."""
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


def exc_message(e: BaseException) -> str:
    msg = str(e) or e.__class__.__name__
    if isinstance(e, TimeoutError):
        msg = "timed out"
    return f"{e.__class__.__name__}: {msg}"[:500]


async def resolve_model(
    session: aiohttp.ClientSession,
    kind: str,
    url: str,
    model: str | None,
    timeout: float,
    headers: dict,
) -> str:
    """Fail at once, with a clear message, when the endpoint cannot be reached; pick the
    first model the server lists when none is given. Raises BenchError."""
    flag = "--gen-model" if kind == "gen" else "--embed-model"
    try:
        async with session.get(
            join(url, "/v1/models"), headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise BenchError(f"cannot reach the {kind} server at {url}: {exc_message(e)}") from None
    if model:
        return model  # reachable; a server without /v1/models is fine when a model is given
    if status in (401, 403):
        raise BenchError(
            f"{kind} server at {url}: GET /v1/models answered {status} "
            f"({error_message(body)}); check --api-key"
        )
    if status != 200:
        raise BenchError(
            f"{kind} server at {url}: GET /v1/models answered {status} "
            f"({error_message(body)}); pass {flag}"
        )
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(
            f"{kind} server at {url}: /v1/models lists no model; pass {flag}"
        ) from None


# Streams being counted, by id() of their aiohttp StreamReader.
_HOOKED: dict = {}


class _HookedReader(aiohttp.StreamReader):
    """aiohttp's StreamReader, but body bytes go straight to a `GenStream` inside the
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


async def consume(content, s) -> None:
    """Feed a response body to the GenStream `s` until its end; errors end up in
    `s.error`."""
    if type(content) is aiohttp.StreamReader:
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
