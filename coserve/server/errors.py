"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, as vLLM answers them
(type names the HTTP status class, code is the status)."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# What /metrics counts a request as, from the status it got.
_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "bad_request", 413: "bad_request", 503: "unavailable"}


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
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=json.dumps(self.body()), content_type="application/json")


class Aborted(ApiError):
    """The server aborted the request (it is shutting down)."""

    def __init__(self, message: str = "the server is shutting down; request aborted"):
        super().__init__(message, status=503)

    @property
    def outcome(self) -> str:
        return "aborted"


def outcome_for_status(status: int) -> str:
    return "success" if status < 400 else _OUTCOMES.get(status, "error")
