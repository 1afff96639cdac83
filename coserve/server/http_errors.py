"""Requests aiohttp's HTTP parser refuses (a bad Content-Length, a malformed header) before
any middleware runs: answered with an OpenAI error body and logged in one line, instead of
aiohttp's text/plain 400 and a traceback in the server log."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from coserve.server.errors import ApiError

log = logging.getLogger("coserve.server")


class _JsonErrorHandler(RequestHandler):
    def handle_error(self, request, status=500, exc=None, message=None):
        if not (400 <= status < 500 and isinstance(exc, HttpProcessingError)):
            return super().handle_error(request, status, exc, message)
        what = " ".join(str(exc.message).split())[:200]
        log.info("refused a malformed HTTP request from %s: %s", request.remote, what)
        resp = ApiError(f"malformed HTTP request: {what}", status=status).response()
        resp.force_close()  # the parser's state is unknown: as aiohttp, close the connection
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        # web.Server.__call__ builds RequestHandler(self, loop=self._loop, **self._kwargs) in
        # every aiohttp 3.x; should that change, connections keep aiohttp's own handler.
        try:
            return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        except (AttributeError, TypeError):
            return super().__call__()


class JsonErrorRunner(web.AppRunner):
    """web.AppRunner whose connections answer parser-level client errors as OpenAI bodies."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its web.Server itself; only the per-connection handler differs.
        if type(server) is web.Server:
            server.__class__ = _JsonErrorServer
        return server
