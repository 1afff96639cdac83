"""A rep as `coserve run` runs it, with a window of engine steps profiled in each built-in
server: a Backend whose servers get `--profile-dir REP/profile/ROLE --profile-steps N
--profile-min-seconds S`, whose load asks them (POST /start_profile) to capture once its
warm-up is over, and which, after the load, ends the captures (POST /stop_profile), waits for
the traces and writes the rep's analysis to REP/profile/summary.json (records.RepProfile).
The Runner itself is unchanged.
A load that fails or is cut short leaves no summary (the rep fails or stops anyway).

Servers of other launchers (vllm, external, command) are not profiled; the summary says so."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from coserve.experiment.backend import Backend
from coserve.experiment.rundir import write_json
from coserve.server.profile_flags import DEFAULT_MIN_S

log = logging.getLogger("coserve.experiment")

ROLES = ("gen", "embed")
SAVE_TIMEOUT_S = 300.0  # a big model's trace takes a while to write
POLL_S = 0.25


def _post(url: str, timeout_s: float = 5.0) -> dict:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read() or b"{}")


def _get(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read() or b"{}")


class ProfilingBackend(Backend):
    """Backend that profiles `steps` engine steps, and at least `min_s` seconds, per built-in
    server after the warm-up. Raises ValueError naming the argument out of range."""

    def __init__(
        self, steps: int, min_s: float = DEFAULT_MIN_S, save_timeout_s: float = SAVE_TIMEOUT_S
    ):
        if steps < 1:
            raise ValueError(f"steps: must be at least 1, got {steps}")
        if not 0 <= min_s < 1e6:
            raise ValueError(f"min_s: must be in [0, 1e6) seconds, got {min_s}")
        self.steps = steps
        self.min_s = min_s
        self.save_timeout_s = save_timeout_s
        self._profiled: dict[str, str] = {}  # server url -> role, this rep's
        self._notes: list[str] = []

    def strategy(self, name: str, gpus: list[str], options: dict, run_dir: Path):
        self._profiled, self._notes = {}, []  # each rep starts with its strategy
        return super().strategy(name, gpus, options, run_dir)

    def start_server(self, spec, env, log_path: Path, ready_timeout_s: float):
        if spec.launcher != "builtin":
            self._notes.append(f"{spec.role}: launcher {spec.launcher} is not profiled")
            return super().start_server(spec, env, log_path, ready_timeout_s)
        pdir = (Path(log_path).parent / "profile" / spec.role).resolve()
        flags = ["--profile-dir", str(pdir), "--profile-steps", str(self.steps)]
        flags += ["--profile-min-seconds", repr(self.min_s)]
        spec = dataclasses.replace(spec, extra_args=[*spec.extra_args, *flags])
        server = super().start_server(spec, env, log_path, ready_timeout_s)
        self._profiled[server.url] = spec.role
        return server

    def run_load(self, load, out_path: Path, on_progress, dead=None) -> dict:
        urls = [u for u in (load.get("gen_url"), load.get("embed_url")) if u in self._profiled]
        timer = threading.Timer(float(load.get("warmup_s") or 0.0), self._start, (urls,))
        timer.daemon = True
        timer.start()
        try:
            summary = super().run_load(load, out_path, on_progress, dead)
        finally:
            timer.cancel()
            timer.join()
        if not summary.get("cut_short"):  # Ctrl-C: tear down now, without the traces
            self._finish(urls, Path(out_path).parent)
        return summary

    # ---- the window ----------------------------------------------------------------------
    def _start(self, urls: list[str]) -> None:
        for url in urls:
            try:
                _post(f"{url}/start_profile")
            except (OSError, ValueError) as e:
                self._notes.append(f"{self._profiled[url]}: /start_profile failed ({e})")

    def _wait_saved(self, url: str) -> dict:
        deadline = time.monotonic() + self.save_timeout_s
        state: dict = {}
        while time.monotonic() < deadline:
            try:
                state = _get(f"{url}/profile")
            except (OSError, ValueError) as e:
                return {"state": "failed", "error": f"GET /profile: {e}"}
            if state.get("state") in ("saved", "failed", "idle"):
                return state
            time.sleep(POLL_S)
        return {**state, "state": "failed", "error": "the trace was not written in time"}

    def _finish(self, urls: list[str], rep_dir: Path) -> None:
        from coserve.profile.analyze import analyze_rep

        states = {}
        for url in urls:
            role = self._profiled[url]
            try:
                _post(f"{url}/stop_profile")
            except (OSError, ValueError) as e:
                states[role] = {"state": "failed", "error": f"POST /stop_profile: {e}"}
                continue
            states[role] = self._wait_saved(url)
        for role, st in states.items():
            if st.get("state") != "saved":
                self._notes.append(
                    f"{role}: no trace ({st.get('state')}: {st.get('error') or 'never started'})"
                )
        summary = analyze_rep(
            rep_dir, [r for r, st in states.items() if st.get("state") == "saved"]
        )
        summary.notes[:0] = self._notes
        (rep_dir / "profile").mkdir(exist_ok=True)
        write_json(rep_dir / "profile" / "summary.json", summary.to_dict())
