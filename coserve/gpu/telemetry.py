"""GPU telemetry over NVML, sampled the way the study sampled with `dcgmi dmon`.

    s = TelemetrySampler(["0"], interval_s=1.0, out_path=run_dir / "telemetry.csv").start()
    ...load...
    summary = s.stop()   # {"sm_active": {"mean": .., "p50": ..}, ...}

Per device (GPU index, GPU UUID or MIG UUID) and tick: utilisation, memory used, power, SM and
memory clocks, and the GPM metrics that match the study's DCGM fields, as fractions 0..1 like
DCGM prints them:

| column        | NVML GPM metric                  | DCGM field                      |
|---------------|----------------------------------|---------------------------------|
| sm_active     | NVML_GPM_METRIC_SM_UTIL          | DCGM_FI_PROF_SM_ACTIVE          |
| sm_occupancy  | NVML_GPM_METRIC_SM_OCCUPANCY     | DCGM_FI_PROF_SM_OCCUPANCY       |
| tensor_active | NVML_GPM_METRIC_ANY_TENSOR_UTIL  | DCGM_FI_PROF_PIPE_TENSOR_ACTIVE |
| dram_active   | NVML_GPM_METRIC_DRAM_BW_UTIL     | DCGM_FI_PROF_DRAM_ACTIVE        |
| fp16_active   | NVML_GPM_METRIC_FP16_UTIL        | DCGM_FI_PROF_PIPE_FP16_ACTIVE   |
| fp32_active   | NVML_GPM_METRIC_FP32_UTIL        | DCGM_FI_PROF_PIPE_FP32_ACTIVE   |

Clock-event reasons (nvmlDeviceGetCurrentClocksEventReasons, formerly "throttle reasons")
come as 0/1 columns per tick (their mean over a window is the fraction of ticks they were
active): `power_capped` (software power cap or hardware power brake), `thermal` (software or
hardware thermal slowdown), `sync_boost`; and the raw mask as hex in `clock_reasons`.

At start() the sampler also reads each device's power budget (`at_start`): the enforced power
limit and the draw at that moment (in a run: servers up, load not begun), in watts.

GPM values cover the interval between two samples, so the first tick has none. GPM is
device-wide (or MIG-instance-wide): it cannot split gen from embed on a shared GPU.
The series goes to `out_path` (CSV if it ends in .csv, else JSON lines), one row per device per
tick, flushed as it goes. On a machine without GPU/NVML the sampler records nothing, writes no
file, and says why in `.reason` (and in a log warning); `stop()` then returns {}.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from coserve.gpu import nvml as nv

log = logging.getLogger("coserve.gpu.telemetry")

BASIC_METRICS = ("gpu_util", "mem_util", "mem_used_mib", "power_w", "sm_clock_mhz", "mem_clock_mhz")
# NVML's nvmlClocksEventReason* bits (nvml.h); the names differ between pynvml versions.
REASON_BITS = {
    "power_capped": 0x04 | 0x80,  # SwPowerCap | HwPowerBrakeSlowdown
    "thermal": 0x20 | 0x40,  # SwThermalSlowdown | HwThermalSlowdown
    "sync_boost": 0x10,
}
REASON_METRICS = tuple(REASON_BITS)
GPM_METRICS = {  # column -> NVML constant name
    "sm_active": "NVML_GPM_METRIC_SM_UTIL",
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
    "tensor_active": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "dram_active": "NVML_GPM_METRIC_DRAM_BW_UTIL",
    "fp16_active": "NVML_GPM_METRIC_FP16_UTIL",
    "fp32_active": "NVML_GPM_METRIC_FP32_UTIL",
}
METRICS = BASIC_METRICS + REASON_METRICS + tuple(GPM_METRICS)
COLUMNS = ("t", "t_rel_s", "device") + METRICS + ("clock_reasons",)


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "p50": statistics.median(values)}


class _Target:
    """One device being sampled: its handle, its parent (for MIG), its GPM samples."""

    def __init__(self, lib: Any, device: str):
        self.device = device
        self.handle = nv.device_handle(lib, device)
        self.is_mig = device.startswith("MIG-")
        self.parent = self.handle
        self.gi_id = None
        if self.is_mig:
            self.parent = lib.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self.handle)
            self.gi_id = lib.nvmlDeviceGetGpuInstanceId(self.handle)
        self.gpm = bool(nv.gpm_supported(lib, self.parent))
        self.prev = None
        self.cur = None


class TelemetrySampler:
    def __init__(
        self,
        devices: list[str],
        interval_s: float = 1.0,
        out_path: Path | None = None,
        *,
        nvml: Any = None,
        gpm: bool = True,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.devices = [str(d) for d in devices]
        self.interval_s = float(interval_s)
        self.out_path = Path(out_path) if out_path is not None else None
        self._nvml_arg = nvml
        self.want_gpm = gpm
        self.rows: list[dict] = []
        self.reason: str | None = None
        self.available = False
        self.notes: list[str] = []
        self.at_start: dict[str, dict[str, float | None]] = {}
        self._lib = None
        self._targets: list[_Target] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh = None
        self._writer = None
        self._t0 = 0.0
        self._failed_metrics: set[tuple[str, str]] = set()

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> TelemetrySampler:
        if not self.devices:
            self.reason = "no GPU devices to sample (CPU run): telemetry recorded nothing"
            log.warning(self.reason)
            return self
        try:
            self._lib = nv.open_nvml(self._nvml_arg)
        except nv.NvmlUnavailable as e:
            self.reason = f"{e}: telemetry recorded nothing"
            log.warning(self.reason)
            return self
        try:
            self._targets = [_Target(self._lib, d) for d in self.devices]
        except Exception as e:
            nv.close_nvml(self._lib)
            self._lib = None
            self.reason = (
                f"no GPU: cannot open device(s) {self.devices} in NVML ({e}): "
                "telemetry recorded nothing"
            )
            log.warning(self.reason)
            return self
        self.available = True
        self.at_start = {t.device: self._power_budget(t) for t in self._targets}
        if self.want_gpm:
            for t in self._targets:
                if not t.gpm:
                    self.notes.append(f"{t.device}: GPM not supported, no SM/tensor/DRAM activity")
                else:
                    t.cur = self._gpm_sample(t)
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out_path, "w", newline="")
            if self.out_path.suffix == ".csv":
                self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
                self._writer.writeheader()
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, name="coserve-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, float]]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(5.0, 3 * self.interval_s))
            self._thread = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lib is not None:
            for t in self._targets:
                for s in (t.prev, t.cur):
                    if s is not None:
                        nv.try_call(self._lib.nvmlGpmSampleFree, s)
                t.prev = t.cur = None
            nv.close_nvml(self._lib)
            self._lib = None
        return self.summary()

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # -- sampling ----------------------------------------------------------------------
    def _run(self) -> None:
        next_t = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            next_t += self.interval_s
            if next_t < time.monotonic():  # fell behind (slow NVML): skip, don't burst
                next_t = time.monotonic() + self.interval_s
            try:
                self.sample_once()
            except Exception as e:  # one bad tick must not end the series
                self.notes.append(f"sampling error: {e}")

    def sample_once(self) -> list[dict]:
        """Take one tick for every device (the thread calls this; tests may too)."""
        now = time.time()
        out = []
        for t in self._targets:
            row: dict[str, Any] = {
                "t": round(now, 3),
                "t_rel_s": round(now - self._t0, 3),
                "device": t.device,
            }
            row.update(self._basic(t))
            row.update(self._reasons(t))
            row.update(self._gpm(t))
            out.append(row)
        self.rows.extend(out)
        if self._fh is not None:
            for row in out:
                if self._writer is not None:
                    self._writer.writerow(
                        {k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS}
                    )
                else:
                    self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        return out

    def _metric(self, t: _Target, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            if (t.device, name) not in self._failed_metrics:
                self._failed_metrics.add((t.device, name))
                self.notes.append(f"{t.device}: {name} unavailable ({e})")
            return None

    def _basic(self, t: _Target) -> dict[str, Any]:
        lib = self._lib
        util = self._metric(t, "utilization", lib.nvmlDeviceGetUtilizationRates, t.handle)
        mem = self._metric(t, "memory", lib.nvmlDeviceGetMemoryInfo, t.handle)
        power = self._metric(t, "power", lib.nvmlDeviceGetPowerUsage, t.parent)
        sm = self._metric(t, "sm_clock", lib.nvmlDeviceGetClockInfo, t.parent, lib.NVML_CLOCK_SM)
        mclk = self._metric(
            t, "mem_clock", lib.nvmlDeviceGetClockInfo, t.parent, lib.NVML_CLOCK_MEM
        )
        return {
            "gpu_util": float(util.gpu) if util is not None else None,
            "mem_util": float(util.memory) if util is not None else None,
            "mem_used_mib": round(int(mem.used) / (1024 * 1024), 1) if mem is not None else None,
            "power_w": round(power / 1000.0, 2) if power is not None else None,
            "sm_clock_mhz": float(sm) if sm is not None else None,
            "mem_clock_mhz": float(mclk) if mclk is not None else None,
        }

    def _power_budget(self, t: _Target) -> dict[str, float | None]:
        """The card's enforced power limit and its draw now, W (None where NVML says no); a MIG
        device reads its whole GPU's, which its instances share."""
        limit = nv.try_call(self._lib.nvmlDeviceGetEnforcedPowerLimit, t.parent)
        power = nv.try_call(self._lib.nvmlDeviceGetPowerUsage, t.parent)
        return {
            "power_limit_w": round(limit / 1000.0, 1) if isinstance(limit, int | float) else None,
            "power_w": round(power / 1000.0, 2) if isinstance(power, int | float) else None,
        }

    def _reasons(self, t: _Target) -> dict[str, Any]:
        """The clock-event reason flags (read only: nothing here sets a clock)."""
        lib = self._lib
        fn = getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            lib, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        mask = None if fn is None else self._metric(t, "clock_reasons", fn, t.parent)
        if mask is None:
            return {**dict.fromkeys(REASON_METRICS), "clock_reasons": None}
        mask = int(mask)
        out: dict[str, Any] = {k: int(bool(mask & bits)) for k, bits in REASON_BITS.items()}
        out["clock_reasons"] = f"0x{mask:x}"
        return out

    def _gpm_sample(self, t: _Target):
        lib = self._lib
        s = self._metric(t, "gpm_alloc", lib.nvmlGpmSampleAlloc)
        if s is None:
            t.gpm = False
            return None
        if t.is_mig:
            ok = self._metric(t, "gpm_sample", lib.nvmlGpmMigSampleGet, t.parent, t.gi_id, s)
        else:
            ok = self._metric(t, "gpm_sample", lib.nvmlGpmSampleGet, t.parent, s)
        if ok is None:
            nv.try_call(lib.nvmlGpmSampleFree, s)
            return None
        return s

    def _gpm(self, t: _Target) -> dict[str, Any]:
        empty = dict.fromkeys(GPM_METRICS)
        if not (self.want_gpm and t.gpm):
            return empty
        lib = self._lib
        new = self._gpm_sample(t)
        if new is None:
            return empty
        if t.prev is not None:
            nv.try_call(lib.nvmlGpmSampleFree, t.prev)
        t.prev, t.cur = t.cur, new
        if t.prev is None:
            return empty
        ids = [getattr(lib, const) for const in GPM_METRICS.values()]
        mg = lib.c_nvmlGpmMetricsGet_t()
        mg.version = lib.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(ids)
        mg.sample1 = t.prev
        mg.sample2 = t.cur
        for i, mid in enumerate(ids):
            mg.metrics[i].metricId = mid
        if self._metric(t, "gpm_metrics", lib.nvmlGpmMetricsGet, mg) is None:
            return empty
        out = {}
        for i, col in enumerate(GPM_METRICS):
            m = mg.metrics[i]
            out[col] = round(float(m.value) / 100.0, 5) if int(m.nvmlReturn) == 0 else None
        return out

    # -- results -----------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, float]]:
        """{metric: {"mean", "p50"}} over all rows; with several devices also `metric/<device>`."""
        out: dict[str, dict[str, float]] = {}
        for m in METRICS:
            vals = [r[m] for r in self.rows if r.get(m) is not None]
            if vals:
                out[m] = summarize(vals)
        if len(self.devices) > 1:
            for d in self.devices:
                for m in METRICS:
                    vals = [r[m] for r in self.rows if r["device"] == d and r.get(m) is not None]
                    if vals:
                        out[f"{m}/{d}"] = summarize(vals)
        return out

    def status(self) -> str:
        if not self.available:
            return self.reason or "not started"
        n = len({r["t"] for r in self.rows})
        return f"{n} ticks over {len(self.devices)} device(s)" + (
            f"; {'; '.join(self.notes)}" if self.notes else ""
        )
