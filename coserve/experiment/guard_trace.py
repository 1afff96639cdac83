"""The SLO guard over time: its /metrics figures sampled while a rep's load runs.

The rep record keeps the guard's state at the end of the load (`slo_guard`); whether it held
gen's step time at its budget *through* the window, and how far embed's allowance swung, is
in the time series. A sampler thread reads the embed server's guard figures every
`interval_s` (the rep's telemetry interval) and appends one JSON line per reading to
`slo_guard.jsonl` in the rep folder:

    {"t": 1764500000.12, "gen_step_seconds": 0.0201, "budget_seconds": 0.0203,
     "tokens_per_forward": 512.0, "pause_seconds": 0.031, "holding": 0.0, ...}

or `{"t": ..., "error": "cannot read ..."}` for a failed read. `t` is Unix time (s), as in
telemetry.jsonl, so the two line up; the other keys are the guard's metric names less their
`coserve:slo_guard_` prefix, in its units (seconds, tokens, counts).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from coserve.server.slo_guard_io import scrape_guard


class GuardTrace:
    """Samples an embed server's guard figures into `out_path` until `stop()`.

    Raises ValueError for a non-positive interval. A read that fails is a line with "error",
    never an exception: the trace must not fail the rep it describes."""

    def __init__(self, embed_url: str, interval_s: float, out_path: Path):
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.embed_url, self.interval_s, self.out_path = embed_url, interval_s, Path(out_path)
        self.rows = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coserve-guard-trace", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """End the sampling (idempotent); the number of lines written."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.rows

    def _run(self) -> None:
        with self.out_path.open("a") as f:
            while not self._stop.is_set():
                started = time.monotonic()
                try:  # a short timeout: a reading older than the interval describes nothing
                    figures = scrape_guard(self.embed_url, self.interval_s)
                except Exception as e:  # noqa: BLE001 - the trace must outlive any page
                    figures = {"error": f"cannot read {self.embed_url}/metrics: {e!r}"}
                row = {"t": round(time.time(), 3), **figures}
                f.write(json.dumps(row) + "\n")
                f.flush()
                self.rows += 1
                self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
