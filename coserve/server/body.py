"""Reading a request body and writing a JSON answer.

Whatever goes wrong while a body is read or parsed is the client's fault and a 4xx: a wrong
Content-Type (415, so a web page cannot drive the server with a CORS-free text/plain POST),
a body over the size limit (413), a Content-Encoding it does not decode (415), a body that
cannot be decoded as its Content-Encoding says, or JSON that does not parse or nests too deep
(400)."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from coserve.server.errors import ApiError, quote

log = logging.getLogger("coserve.server")

JSON_TYPES = ("application/json",)
# What aiohttp's parser decodes (http_parser: gzip, deflate, br, zstd) and no coding at all;
# a body in any other coding reaches the handler undecoded and would be read as JSON text.
CODINGS = ("", "identity", "gzip", "deflate", "br", "zstd")
OFF_LOOP_BYTES = 256 << 10  # bodies from this size on are parsed in a worker thread
MAX_BODY_BYTES = web.AppKey(
    "max_body_bytes", int
)  # the app's client_max_size, for the 413's message


class BodyFaultLog(logging.Filter):
    """aiohttp's protocol logs a body that fails its Content-Encoding as an "Unhandled
    exception" with two tracebacks, though the handler answers the client 400 (read_json):
    the record is kept as one line, a warning, without the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            record.msg, record.args = (
                "a request body could not be read (answered 400): %s",
                (str(exc).replace("\n", " "),),
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


BODY_FAULT_LOG = BodyFaultLog()  # one instance: addFilter keeps it once however many apps


async def read_json(request: web.Request) -> tuple[dict, int]:
    """(the body as a JSON object, its size in bytes). Raises ApiError 415/413/400."""
    if request.content_type not in JSON_TYPES:
        sent = request.headers.get("Content-Type")  # as sent: aiohttp's parse of a bad one
        raise ApiError(  # is its default, which the client never wrote
            f"the request body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {'no Content-Type' if sent is None else quote(sent)})",
            status=415,
        )
    coding = request.headers.get("Content-Encoding", "")
    if coding.strip().lower() not in CODINGS:
        raise ApiError(
            f"the request body's Content-Encoding {quote(coding)} is not one this server "
            f"decodes ({', '.join(c for c in CODINGS if c)})",
            status=415,
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            f"the request body is larger than this server takes ({request.app[MAX_BODY_BYTES]} "
            "bytes; see --max-request-bytes)",
            status=413,
        ) from None
    except web.RequestPayloadError as e:  # a Content-Encoding the body is not in, say
        raise ApiError(f"the request body could not be read: {str(e):.200}") from None
    try:
        body = await _off_loop(len(raw), json.loads, raw)
    except RecursionError:
        raise ApiError("the request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {str(e):.200}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body, len(raw)


async def read_request(request: web.Request, parse, *args):
    """`parse(body, *args)` of the request's JSON body; any failure is a 4xx (ApiError)."""
    body, size = await read_json(request)
    return await _off_loop(size, parse_or_400, parse, body, *args)


async def _off_loop(size: int, fn, *args):
    """fn(*args) here for a small body; for a large one in a thread, so that parsing and
    tokenising megabytes does not stall the event loop (/health, other requests' streams)."""
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(obj, separators=(",", ":")), content_type="application/json"
    )


def parse_or_400(parse, *args):
    """`parse(*args)`, with any exception other than ApiError (a value no check foresaw: too
    deep, not encodable, ...) turned into a 400: parsing a request never fails the server."""
    try:
        return parse(*args)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a request's content can raise is the client's fault
        log.info(
            "request refused by an unforeseen %s while parsing", type(e).__name__, exc_info=True
        )
        raise ApiError(
            f"the request could not be read: {type(e).__name__}: {quote(str(e))}"
        ) from None
