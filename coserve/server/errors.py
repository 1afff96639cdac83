"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, as vLLM answers them
(type names the HTTP status class, code is the status)."""

from __future__ import annotations

import json

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# What /metrics counts a request as, from the status it got.
_OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    404: "bad_request",
    405: "bad_request",  # a GET to a POST endpoint: the client's fault, no server error
    413: "bad_request",
    415: "bad_request",
    503: "unavailable",
}

QUOTE_CHARS = 100  # how much of a rejected value an error message repeats


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters (with how long it was), so an error never
    echoes a huge value; a long container is cut before it is rendered."""
    size = None
    if isinstance(value, list | tuple | dict) and len(value) > limit:
        size = f"{len(value)} items"
        items = list(value.items() if isinstance(value, dict) else value)[:limit]
        try:
            text = repr(dict(items) if isinstance(value, dict) else items)
        except RecursionError:
            return f"a value nested too deeply to show ({size})"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of {value.bit_length()} bits"
    else:
        try:
            text = repr(value)
        except RecursionError:
            return "a value nested too deeply to show"
    if len(text) <= limit:
        return text
    if size is None:
        size = (
            f"{len(value)} characters"
            if isinstance(value, str)
            else f"{len(text)} characters as text"
        )
    return f"{text[:limit]}... ({size})"


class ApiError(Exception):
    """Raised anywhere below a handler; the middleware turns it into the error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    @property
    def outcome(self) -> str:
        return _OUTCOMES.get(self.status, "error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "APIError"),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self):
        """The aiohttp Response (aiohttp is imported here, so `coserve --help` does not load it)."""
        from aiohttp import web

        return web.Response(
            status=self.status, text=json.dumps(self.body()), content_type="application/json"
        )


class Aborted(ApiError):
    """The server aborted the request (it is shutting down)."""

    def __init__(self, message: str = "the server is shutting down; request aborted"):
        super().__init__(message, status=503)

    @property
    def outcome(self) -> str:
        return "aborted"


def outcome_for_status(status: int) -> str:
    return "success" if status < 400 else _OUTCOMES.get(status, "error")
