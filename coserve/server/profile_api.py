"""The profiling endpoints of `coserve serve gen|embed --profile-dir DIR`, as vLLM names them:

    POST /start_profile   capture the next --profile-steps engine steps, for at least
                          --profile-min-seconds (step_profile.py)
    POST /stop_profile    end the capture now and write the trace
    GET  /profile         {"state": idle|capturing|captured|saved|failed, "steps": n,
                           "error": "", "dir": DIR}

A server started without --profile-dir has none of them (404), and its engine core never
starts the torch profiler: an unprofiled run is the run it was. One window per server: a
second start answers 409."""

from __future__ import annotations

from aiohttp import web

from coserve.engine.messages import Profile
from coserve.server.body import json_response
from coserve.server.errors import ApiError
from coserve.server.profile_flags import DEFAULT_MIN_S

START, STOP, STATUS = "/start_profile", "/stop_profile", "/profile"
# Outside /v1, yet behind --api-key: they start the profiler and write traces to disk.
PATHS = frozenset((START, STOP, STATUS))


class ProfileApi:
    """The three endpoints over one EngineClient."""

    def __init__(self, engine, profile_dir: str, steps: int, min_s: float = DEFAULT_MIN_S):
        self.engine = engine
        self.dir = profile_dir
        self.steps = steps
        self.min_s = min_s
        self.started = False

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(START, self.start)
        app.router.add_post(STOP, self.stop)
        app.router.add_get(STATUS, self.status)

    async def start(self, request: web.Request) -> web.Response:
        if self.started:
            raise ApiError("a profile was already started on this server", status=409)
        if not self.engine.alive:
            raise ApiError("the engine is not running", status=503)
        self.started = True
        self.engine.control(Profile("start", self.dir, self.steps, self.min_s))
        return json_response(
            {"state": "starting", "steps": self.steps, "min_seconds": self.min_s, "dir": self.dir}
        )

    async def stop(self, request: web.Request) -> web.Response:
        if self.engine.alive:
            self.engine.control(Profile("stop"))
        return await self.status(request)

    async def status(self, request: web.Request) -> web.Response:
        stats = self.engine.stats
        state = stats.get("profile_state", "idle")
        if self.started and state == "idle":
            state = "starting"  # the core has not reported since the start was sent
        return json_response(
            {
                "state": state,
                "steps": int(stats.get("profile_steps", 0)),
                "error": stats.get("profile_error", ""),
                "dir": self.dir,
            }
        )
