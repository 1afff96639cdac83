"""The OpenAI-compatible HTTP API in front of one engine, as vLLM serves it:
/v1/completions and /v1/chat/completions (gen, gen_api.py), /v1/embeddings (embed),
/v1/models, /health, /metrics, /version.

One server serves one model. The engine steps in a process of its own (engine_core.py,
driven through engine_client.py); the handlers here only parse, hand requests over and
write what comes back."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from coserve import __version__
from coserve.engine.messages import NewEmbed, Profile
from coserve.server.body import BODY_FAULT_LOG, MAX_BODY_BYTES, json_response, read_request
from coserve.server.engine_client import EngineClient, RequestStream
from coserve.server.errors import ApiError, outcome_for_status, quote
from coserve.server.fields import RequestLimits
from coserve.server.float_json import float32_rows_json
from coserve.server.gen_api import OUTCOME, GenApi
from coserve.server.http_errors import JsonErrorRunner
from coserve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coserve.server.metrics import Metrics
from coserve.server.profile_api import PATHS as PROFILE_PATHS
from coserve.server.profile_api import ProfileApi
from coserve.server.profile_flags import DEFAULT_MIN_S, DEFAULT_STEPS
from coserve.server.protocol import parse_embedding
from coserve.server.slo_guard import Allowance, GuardConfig, SloGuard
from coserve.server.slo_guard_io import guard_metrics, run_guard

log = logging.getLogger("coserve.server")

API_ENDPOINTS = ("completions", "chat/completions", "embeddings", "models")


@dataclass
class ServeOptions:
    kind: str  # "gen" | "embed"
    served_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line says which)
    api_key: str | None = None
    shutdown_timeout_s: float = 5.0  # in-flight requests get this long to finish on SIGTERM
    access_log: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)
    guard: GuardConfig | None = None  # embed only: the SLO guard, reading guard_gen_url's /metrics
    guard_gen_url: str = ""
    guard_interval_s: float = 0.05
    profile_dir: str = ""  # "" : no profiling endpoints (profile_api.py)
    profile_steps: int = DEFAULT_STEPS
    profile_min_s: float = DEFAULT_MIN_S


def _authorized(request: web.Request, key: str) -> bool:
    """Constant-time check of `Authorization: Bearer KEY`; a header that is not even text
    (non-ASCII bytes) is simply a wrong key."""
    given = request.headers.get("Authorization", "")
    try:
        given_bytes = given.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return hmac.compare_digest(given_bytes, f"Bearer {key}".encode())


class OpenAIServer:
    def __init__(self, engine: EngineClient, opts: ServeOptions):
        self.engine = engine
        self.opts = opts
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.metrics = Metrics(opts.served_names[0], opts.kind)
        self.shutting_down = False
        self.created = int(time.time())
        self.gen = GenApi(engine, self.metrics, opts.served_names, opts.limits)
        self.guard = SloGuard(opts.guard) if opts.guard is not None else None

    def make_app(self) -> web.Application:
        max_bytes = self.opts.limits.max_body_bytes
        app = web.Application(middlewares=[self._middleware], client_max_size=max_bytes)
        app[MAX_BODY_BYTES] = max_bytes
        logging.getLogger("aiohttp.server").addFilter(BODY_FAULT_LOG)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/version", self.version)
        if self.opts.profile_dir:
            ProfileApi(
                self.engine,
                self.opts.profile_dir,
                self.opts.profile_steps,
                self.opts.profile_min_s,
            ).add_routes(app)
        return app

    # ---- middleware: auth, errors, request accounting ------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        api = request.path.startswith("/v1/")
        if not api:
            try:
                if request.path in PROFILE_PATHS:
                    self._check_key(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                return ApiError(e.reason, status=e.status).response()
        endpoint = request.path[len("/v1/") :]
        if endpoint not in API_ENDPOINTS:
            endpoint = "other"  # a label per random path would grow /metrics without bound
        outcome = "error"
        self.metrics.in_flight += 1
        try:
            if self.shutting_down:
                raise ApiError("the server is shutting down", status=503)
            self._check_key(request)
            resp = await handler(request)
            outcome = request.get(OUTCOME) or outcome_for_status(resp.status)
            return resp
        except ApiError as e:
            outcome = e.outcome
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            outcome = outcome_for_status(e.status)
            return ApiError(e.reason, status=e.status).response()
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        except Exception as e:
            log.exception("error serving %s", request.path)
            return ApiError(f"internal error: {quote(e)}", status=500).response()
        finally:
            self.metrics.in_flight -= 1
            self.metrics.requests[(endpoint, outcome)] += 1

    def _check_key(self, request: web.Request) -> None:
        """Raises ApiError 401 when --api-key is set and the request does not carry it."""
        if self.opts.api_key is not None and not _authorized(request, self.opts.api_key):
            raise ApiError(
                "invalid or missing API key (send 'Authorization: Bearer KEY')", status=401
            )

    # ---- /v1/completions, /v1/chat/completions --------------------------------------------
    def _gen_only(self, api: str) -> None:
        if self.opts.kind != "gen":
            raise ApiError(
                f"The model `{self.opts.served_names[0]}` is an embedding model and does not "
                f"support the {api} API; use /v1/embeddings"
            )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._gen_only("Completions")
        return await self.gen.completions(request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._gen_only("Chat Completions")
        return await self.gen.chat(request)

    # ---- /v1/embeddings ------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        if self.opts.kind != "embed":
            raise ApiError(
                f"The model `{self.opts.served_names[0]}` is a generative model and does not "
                "support the Embeddings API; use /v1/completions"
            )
        req = await read_request(
            request,
            parse_embedding,
            self.opts.served_names,
            self.tokenizer,
            self.max_model_len,
            self.engine.dim,
            self.opts.limits,
        )
        rid = f"embd-{uuid.uuid4().hex}"
        stream = RequestStream()
        await self.engine.add([NewEmbed(rid, req.inputs)], stream, "input")
        try:
            (out,) = await stream.next_batch()
        except BaseException:
            self.engine.abort([rid])
            raise
        self.metrics.embedded_inputs += len(req.inputs)
        if req.encoding_format == "base64":
            little = np.asarray(out.embeddings, dtype="<f4")
            rows = [f'"{base64.b64encode(v.tobytes()).decode()}"' for v in little]
        else:
            rows = float32_rows_json(out.embeddings)
        # The vectors are JSON already; only the envelope goes through json.dumps.
        data = ",".join(
            f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i, row in enumerate(rows)
        )
        prompt_tokens = out.prompt_tokens or sum(len(ids) for ids in req.inputs)
        head = json.dumps(
            {"id": rid, "object": "list", "created": int(time.time()), "model": req.model},
            separators=(",", ":"),
        )
        usage = (
            f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens},'
            '"completion_tokens":0}'
        )
        return web.Response(
            text=f'{head[:-1]},"data":[{data}],"usage":{usage}}}', content_type="application/json"
        )

    # ---- the rest ------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "coserve",
                "root": self.engine.model_name,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [],
            }
            for name in self.opts.served_names
        ]
        return json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            raise ApiError(f"the engine is not running: {self.engine.error}", status=503)
        if self.shutting_down:
            raise ApiError("the server is shutting down", status=503)
        return web.Response(status=200)

    async def metrics_page(self, request: web.Request) -> web.Response:
        extra = []
        if self.guard is not None:
            extra = guard_metrics(
                self.guard.state, float(self.engine.stats.get("guard_throttled_s", 0.0))
            )
        text = self.metrics.render(self.engine.stats, self.engine.steps, extra)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": __version__})

    # ---- shutdown ------------------------------------------------------------------------
    async def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.metrics.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.metrics.in_flight == 0

    async def shutdown(self, site: web.BaseSite, runner: web.AppRunner) -> bool:
        """Stop accepting, let in-flight requests finish for the grace period, abort the rest,
        close the connections and stop the engine process. False when the engine process did
        not stop within 30 s of being asked (stuck in a step) and was killed."""
        self.shutting_down = True
        await site.stop()
        if self.metrics.in_flight:
            log.info(
                "draining %d in-flight request(s) for up to %.1f s",
                self.metrics.in_flight,
                self.opts.shutdown_timeout_s,
            )
        if not await self._wait_idle(self.opts.shutdown_timeout_s):
            n = self.engine.abort_all()
            log.info("aborted %d request(s) still running", n)
            await self._wait_idle(2.0)
        await runner.cleanup()
        if not await self.engine.stop(timeout_s=30.0):
            log.error("the engine process did not stop within 30 s; killed it")
            return False
        return True


def ready_line(opts: ServeOptions, engine: EngineClient, host: str, port: int) -> str:
    parts = [f"model {opts.served_names[0]}", f"max_model_len {engine.max_model_len}"]
    if opts.kind == "gen":
        parts.append(f"KV cache capacity {engine.stats.get('kv_capacity_tokens')} tokens")
    else:
        parts.append(f"embedding dim {engine.dim}")
    return f"coserve serve {opts.kind}: ready at http://{host}:{port} ({', '.join(parts)})"


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (not yet listen) the server's address, so a taken port fails before a model loads
    and `--port 0` is resolved early; connections are refused until serving starts."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def start_guard(server: OpenAIServer, stop: asyncio.Event) -> asyncio.Future | None:
    """The task of `server`'s SLO guard (None without one), polling until `stop`."""
    if server.guard is None:
        return None
    o, cfg = server.opts, server.guard.cfg
    log.info(
        "SLO guard on: reading %s/metrics every %.0f ms; budget: gen's step %s %s",
        o.guard_gen_url.rstrip("/"),
        o.guard_interval_s * 1e3,
        cfg.stat,
        f"<= {cfg.budget_s * 1e3:g} ms"
        if cfg.budget_s is not None
        else f"within +{cfg.over_alone_pct:g} % of gen alone (probed)",
    )
    return asyncio.ensure_future(
        run_guard(server.guard, o.guard_gen_url, server.engine.allow, o.guard_interval_s, stop)
    )


def end_guard(server: OpenAIServer, task: asyncio.Future | None) -> None:
    """Stop the guard's task; the embed requests still in flight then run unthrottled through
    the drain."""
    if task is not None:
        task.cancel()
        server.engine.allow(Allowance(server.guard.cfg.max_tokens))


async def serve(engine: EngineClient, opts: ServeOptions, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the engine dies (exit 1); the engine
    process is stopped either way (exit 1 as well when it had to be killed)."""
    loop = asyncio.get_running_loop()
    if sock is None:
        try:
            sock = bind_socket(opts.host, opts.port)
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", opts.host, opts.port, e)
            await engine.stop()
            return 1
    await engine.attach()
    if opts.profile_dir:
        engine.control(Profile("prepare"))  # the profiler's set-up, before any load
    server = OpenAIServer(engine, opts)
    runner = JsonErrorRunner(
        server.make_app(),
        handler_cancellation=True,
        shutdown_timeout=1.0,
        access_log=logging.getLogger("aiohttp.access") if opts.access_log else None,
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    print(ready_line(opts, engine, host, port), flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    guard_task = start_guard(server, stop)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(engine.dead.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    end_guard(server, guard_task)
    rc = 0 if stop.is_set() else 1
    log.info("shutting down (%s)", "signal" if rc == 0 else "engine failed")
    stopped = await server.shutdown(site, runner)
    if rc == 0 and engine.error is not None:  # it failed during the drain
        log.info("the engine failed while stopping: %s", engine.error)
        rc = 1
    elif rc == 0 and not stopped:  # stuck: an engine that had to be killed is no clean stop
        rc = 1
    log.info("stopped")
    return rc
