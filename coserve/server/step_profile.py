"""A window of engine steps under the torch profiler, inside the engine core's step loop.

The HTTP front (profile_api.py) sends `Profile("start", out_dir, steps)` and later
`Profile("stop")` (engine/messages.py); the core hands both to `StepProfiler.command`. The
capture starts at the next step and ends by itself once it holds `steps` steps and has lasted
`min_s` seconds (or at "stop"). The time floor is what lets two servers' windows overlap:
20 decode steps of gen take ~0.3 s, 20 steps of an embed server at 8,192-token forwards
~5 s, and a comparison of the two traces needs both to cover the same time. Each
captured step is one `coserve.step` range in the trace, so the analysis finds step boundaries
without matching clocks. The profiler records CPU activity always and CUDA kernels (CUPTI)
where the engine is on a GPU; under MPS this works in-process where ncu refuses.

Writing the trace takes seconds for a big model, so it waits until the engine has nothing to
run (the load is over) or "stop" arrives: the steps after the window are not delayed by it.

Files in out_dir: `trace.json.gz` (Chrome trace: chrome://tracing or ui.perfetto.dev) and
`steps.json` (per captured step: index, decode or not, outputs, wall ms; the window's wall
start and end, epoch seconds). Nothing is captured or written unless "start" arrives: a
server started without --profile-dir never builds a torch profiler; one started with it has
the front send "prepare" at start-up, which sets the profiler up (seconds, once) before any
load arrives.

States (in the core's stats as `profile_state`): idle, capturing, captured, saved, failed.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from pathlib import Path

from coserve.engine.messages import Profile

log = logging.getLogger("coserve.server")

STEP_RANGE = "coserve.step"


class StepProfiler:
    """The core's profiling window (one per engine loop)."""

    def __init__(self) -> None:
        self.state = "idle"
        self.error = ""
        self.capturing = False  # checked once per step; the only cost of an idle profiler
        self._prof = None
        self._dir: Path | None = None
        self._want = 0
        self._min_s = 0.0
        self._steps: list[dict] = []
        self._wall: list[float] = []
        self._stop_asked = False

    # ---- commands from the front -----------------------------------------------------------
    def command(self, msg: Profile) -> None:
        """Apply a `Profile` message: "prepare", "start" or "stop"; a start while not idle is
        ignored."""
        if msg.action == "prepare" and self.state == "idle":
            self._prepare()
        elif msg.action == "start" and self.state == "idle":
            self._start(Path(msg.out_dir), int(msg.steps), float(msg.min_s))
        elif msg.action == "stop":
            self._stop_asked = True
            if self.capturing:
                self._end_capture()

    @staticmethod
    def _new():
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            activities.append(ProfilerActivity.CUDA)
        return profile(activities=activities, record_shapes=False, with_stack=False)

    def _prepare(self) -> None:
        """Start and stop a profiler once, capturing nothing: the first start in a process
        sets up Kineto (and CUPTI) and takes seconds, which would otherwise stall the engine
        at the window's start."""
        try:
            prof = self._new()
            prof.start()
            prof.stop()
        except Exception as e:
            self._fail(f"the torch profiler did not start: {e!r}")

    def _start(self, out_dir: Path, steps: int, min_s: float) -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._prof = self._new()
            self._prof.start()
        except Exception as e:  # a profiler that cannot start must not stop the engine
            self._fail(f"the torch profiler did not start: {e!r}")
            return
        self._dir, self._want, self._min_s = out_dir, max(1, steps), max(0.0, min_s)
        self._wall = [time.time()]
        self.state, self.capturing = "capturing", True
        log.info(
            "profiling the next %d engine steps (and at least %g s) into %s",
            self._want,
            self._min_s,
            out_dir,
        )

    # ---- the step loop ---------------------------------------------------------------------
    def run_step(self, engine) -> list:
        """engine.step() inside a `coserve.step` range; ends the window after the last step."""
        from torch.profiler import record_function

        t0 = time.perf_counter()
        with record_function(STEP_RANGE):
            done = engine.step()
        self._steps.append(
            {
                "index": len(self._steps),
                "decode": getattr(engine, "last_step_decode", None),
                "outputs": len(done),
                "wall_ms": round((time.perf_counter() - t0) * 1e3, 4),
            }
        )
        if len(self._steps) >= self._want and time.time() - self._wall[0] >= self._min_s:
            self._end_capture()
        return done

    def after_step(self, busy: bool) -> None:
        """Write the trace once the window is over and the engine idle (or "stop" came)."""
        if self.state == "captured" and (not busy or self._stop_asked):
            self._save()

    # ---- internals -------------------------------------------------------------------------
    def _end_capture(self) -> None:
        self.capturing = False
        try:
            self._prof.stop()
        except Exception as e:
            self._fail(f"the torch profiler did not stop cleanly: {e!r}")
            return
        self._wall.append(time.time())
        self.state = "captured"

    def _save(self) -> None:
        assert self._dir is not None
        try:
            raw = self._dir / "trace.json"
            self._prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(self._dir / "trace.json.gz", "wb", 6) as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(raw)
            meta = {
                "requested_steps": self._want,
                "requested_min_s": self._min_s,
                "wall_start": self._wall[0],
                "wall_end": self._wall[-1],
                "steps": self._steps,
            }
            (self._dir / "steps.json").write_text(json.dumps(meta, indent=1))
        except Exception as e:
            self._fail(f"the trace could not be written: {e!r}")
            return
        self._prof = None
        self.state = "saved"
        log.info("profile of %d steps written to %s", len(self._steps), self._dir)

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self.capturing, self._prof = False, None
        self.state, self.error = "failed", message

    def stats(self) -> dict:
        """What the core adds to its stats for the front (strings; /metrics skips them)."""
        return {
            "profile_state": self.state,
            "profile_steps": len(self._steps),
            "profile_error": self.error,
        }
