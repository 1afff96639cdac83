"""The pieces a rep is made of (strategy, servers, telemetry, load), behind one class that
tests replace piece by piece."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coserve.experiment import fingerprint as fpmod

# How often the servers' processes are polled while the load runs: a server that dies is
# noticed within this, and the load stopped.
WATCH_INTERVAL_S = 0.25


class Backend:
    """The pieces a rep is made of. Tests may replace any of them."""

    def strategy(self, name: str, gpus: list[str], options: dict, run_dir: Path):
        from coserve.gpu.strategies import make_strategy

        return make_strategy(name, gpus, options, run_dir)

    def start_server(self, spec, env: dict[str, str], log_path: Path, ready_timeout_s: float):
        from coserve.launch import start_server

        return start_server(spec, env, log_path, ready_timeout_s)

    def telemetry(self, devices: list[str], interval_s: float, out_path: Path):
        from coserve.gpu.telemetry import TelemetrySampler

        return TelemetrySampler(devices, interval_s=interval_s, out_path=out_path)

    def run_load(
        self,
        load: dict[str, Any],
        out_path: Path,
        on_progress,
        dead: Callable[[], str | None] | None = None,
    ) -> dict:
        """Run the load, write bench.json (+ records), return the summary. `dead()` is polled
        every WATCH_INTERVAL_S; when it names a reason the load is stopped (cut short)."""
        from coserve.bench.config import LoadConfig
        from coserve.bench.loadgen import run_load, run_sync, write_result

        async def watched():
            stop = asyncio.Event()

            async def watch():
                while not stop.is_set():
                    await asyncio.sleep(WATCH_INTERVAL_S)
                    if dead():
                        stop.set()

            watcher = asyncio.create_task(watch()) if dead is not None else None
            try:
                return await run_load(LoadConfig(**load), on_progress=on_progress, stop=stop)
            finally:
                if watcher is not None:
                    watcher.cancel()

        # run_sync takes uvloop where installed, as `coserve bench` does: same client speed.
        result = run_sync(watched())
        write_result(result, out_path)
        return result.summary()

    def guard_state(self, embed_url: str) -> dict[str, Any]:
        """The SLO guard's figures at the end of the load (slo_guard_io.scrape_guard)."""
        from coserve.server.slo_guard_io import scrape_guard

        return scrape_guard(embed_url)

    def guard_trace(self, embed_url: str, interval_s: float, out_path: Path):
        """A sampler of the SLO guard's figures while the load runs (guard_trace.py)."""
        from coserve.experiment.guard_trace import GuardTrace

        return GuardTrace(embed_url, interval_s, out_path)

    def gpu_state(self) -> dict[str, Any]:
        """The machine's GPUs as the preflight checks them (fingerprint.gpu_state)."""
        return fpmod.gpu_state()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from coserve.gpu import nvml as nv

    try:
        with nv.nvml_session() as lib:
            return "cuda" if int(lib.nvmlDeviceGetCount()) > 0 else "cpu"
    except nv.NvmlUnavailable:
        return "cpu"
