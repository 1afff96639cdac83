"""A stand-in for NVML, for tests and for trying coserve's GPU code paths on a machine
without a GPU (the MPS control daemon's: fake_mps.py). Nothing in coserve uses it unless
handed one.

`FakeNvml` is an object with the pynvml functions coserve calls, answering known values
(utilisation, memory, power, clocks, GPM metrics cycling through given lists, MIG modes,
profiles and instances); `fake_gpu` describes one GPU for it.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace


class FakeNVMLError(Exception):
    pass


_H100_PROFILES = {  # name -> (profile id, slices, memory MiB)
    "1g.10gb": (0, 1, 9856),
    "1g.20gb": (15, 1, 19968),
    "2g.20gb": (1, 2, 19968),
    "3g.40gb": (2, 3, 40192),
    "4g.40gb": (3, 4, 40192),
    "7g.80gb": (4, 7, 80384),
}
_H200_PROFILES = {
    "1g.18gb": (0, 1, 16384),
    "1g.35gb": (15, 1, 32768),
    "2g.35gb": (1, 2, 32768),
    "3g.71gb": (2, 3, 70144),
    "4g.71gb": (3, 4, 70144),
    "7g.141gb": (4, 7, 140288),
}


def fake_gpu(
    name: str = "NVIDIA H100 80GB HBM3",
    *,
    index: int = 0,
    memory_mib: int = 81559,
    mig=False,
    compute_mode: int = 0,
    gpm: bool = True,
    mig_devices=None,
    **values,
) -> dict:
    """A GPU description for FakeNvml. `mig`: None (no MIG), False (off) or True (on)."""
    profiles = _H200_PROFILES if "H200" in name else _H100_PROFILES
    g = {
        "name": name,
        "uuid": f"GPU-fake-{index:04d}",
        "memory_mib": memory_mib,
        "compute_mode": compute_mode,
        "mig": mig,
        "mig_pending": mig,
        "gpm": gpm,
        "profiles": profiles if mig is not None else {},
        "mig_devices": list(mig_devices or []),
        "util_gpu": [50, 70],
        "util_mem": [20, 30],
        "mem_used_mib": [1000, 3000],
        "power_mw": [300_000, 500_000],
        "power_limit_mw": 700_000,  # None: NVML answers Not Supported
        "sm_clock": [1980],
        "mem_clock": [2619],
        "gpm_values": {
            2: [80.0, 90.0],
            3: [18.0, 20.0],
            5: [17.0, 21.0],
            10: [30.0, 32.0],
            13: [1.0, 3.0],
            12: [5.0, 7.0],
        },
    }
    g.update(values)
    return g


class FakeNvml:
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10
    NVML_GPM_METRIC_FP32_UTIL = 12
    NVML_GPM_METRIC_FP16_UTIL = 13
    NVML_GPU_INSTANCE_PROFILE_COUNT = 18
    NVMLError = FakeNVMLError

    def __init__(
        self,
        gpus: list[dict] | None = None,
        *,
        fail_init: str | None = None,
        driver: str = "580.159.04",
        cuda: int = 13000,
    ):
        self.gpus = gpus if gpus is not None else [fake_gpu()]
        for i, g in enumerate(self.gpus):
            g.setdefault("uuid", f"GPU-fake-{i:04d}")
        self.fail_init = fail_init
        self.driver = driver
        self.cuda = cuda
        self.init_count = 0
        self.calls: dict[str, int] = {}
        self._sample_seq = itertools.count(1)

    # handles are ("gpu", index) or ("mig", index, k)
    def _gpu(self, h):
        if not isinstance(h, tuple) or h[1] >= len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return self.gpus[h[1]]

    def _tick(self, h, key):
        k = (h, key)
        n = self.calls.get(k, 0)
        self.calls[k] = n + 1
        return n

    def _cycle(self, h, key, values):
        return values[self._tick(h, key) % len(values)]

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError(self.fail_init)
        self.init_count += 1

    def nvmlShutdown(self):
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= int(i) < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return ("gpu", int(i))

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for i, g in enumerate(self.gpus):
            if g["uuid"] == uuid:
                return ("gpu", i)
            for k, d in enumerate(g["mig_devices"]):
                if d["uuid"] == uuid:
                    return ("mig", i, k)
        raise FakeNVMLError("Not Found")

    def nvmlDeviceGetIndex(self, h):
        return h[1]

    def nvmlDeviceGetName(self, h):
        g = self._gpu(h)
        if h[0] == "mig":
            return f"{g['name']} MIG {g['mig_devices'][h[2]]['profile']}"
        return g["name"]

    def nvmlDeviceGetUUID(self, h):
        g = self._gpu(h)
        return g["mig_devices"][h[2]]["uuid"] if h[0] == "mig" else g["uuid"]

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self._gpu(h)
        total = (
            (g["mig_devices"][h[2]]["memory_mib"] if h[0] == "mig" else g["memory_mib"])
            * 1024
            * 1024
        )
        used = int(self._cycle(h, "mem", g["mem_used_mib"]) * 1024 * 1024)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeMode(self, h):
        return self._gpu(h)["compute_mode"]

    def nvmlDeviceGetMigMode(self, h):
        g = self._gpu(h)
        if g["mig"] is None:
            raise FakeNVMLError("Not Supported")
        return [int(bool(g["mig"])), int(bool(g["mig_pending"]))]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7 if self._gpu(h)["mig"] is not None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        g = self._gpu(h)
        if k >= len(g["mig_devices"]):
            raise FakeNVMLError("Not Found")
        return ("mig", h[1], k)

    def nvmlDeviceGetGpuInstanceId(self, h):
        if h[0] != "mig":
            raise FakeNVMLError("Invalid Argument")
        return self._gpu(h)["mig_devices"][h[2]]["gi_id"]

    def nvmlDeviceGetComputeInstanceId(self, h):
        return 0

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h):
        return ("gpu", h[1])

    def nvmlDeviceGetGpuInstanceProfileInfo(self, h, pid, version=2):
        g = self._gpu(h)
        for name, (p, slices, mem) in g["profiles"].items():
            if p == pid:
                return SimpleNamespace(
                    id=pid,
                    sliceCount=slices,
                    instanceCount=7 // slices,
                    multiprocessorCount=16 * slices,
                    memorySizeMB=mem,
                    name=f"MIG {name}".encode(),
                )
        raise FakeNVMLError("Not Supported")

    def nvmlDeviceGetUtilizationRates(self, h):
        if h[0] == "mig":
            raise FakeNVMLError("Not Supported")
        g = self._gpu(h)
        n = self._tick(h, "util")
        return SimpleNamespace(
            gpu=g["util_gpu"][n % len(g["util_gpu"])], memory=g["util_mem"][n % len(g["util_mem"])]
        )

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        limit = self._gpu(h)["power_limit_mw"]
        if limit is None:
            raise FakeNVMLError("Not Supported")
        return limit

    def nvmlDeviceGetPowerUsage(self, h):
        return self._cycle(h, "power", self._gpu(h)["power_mw"])

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._cycle(h, "reasons", self._gpu(h).get("clock_reasons", [0]))

    def nvmlDeviceGetClockInfo(self, h, kind):
        g = self._gpu(h)
        return self._cycle(
            h, f"clock{kind}", g["sm_clock"] if kind == self.NVML_CLOCK_SM else g["mem_clock"]
        )

    # GPM
    def nvmlGpmQueryDeviceSupport(self, h):
        return SimpleNamespace(isSupportedDevice=int(self._gpu(h)["gpm"]))

    def nvmlGpmSampleAlloc(self):
        return SimpleNamespace(seq=None, handle=None, freed=False)

    def nvmlGpmSampleFree(self, s):
        s.freed = True

    def nvmlGpmSampleGet(self, h, s):
        if not self._gpu(h)["gpm"]:
            raise FakeNVMLError("Not Supported")
        s.seq, s.handle = next(self._sample_seq), h
        return s

    def nvmlGpmMigSampleGet(self, h, gi_id, s):
        s.seq, s.handle = next(self._sample_seq), ("gi", h[1], gi_id)
        return s

    class c_nvmlGpmMetricsGet_t:
        def __init__(self):
            self.version = 0
            self.numMetrics = 0
            self.sample1 = self.sample2 = None
            self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)]

    def nvmlGpmMetricsGet(self, mg):
        if (
            mg.version != self.NVML_GPM_METRICS_GET_VERSION
            or mg.sample1 is None
            or mg.sample2 is None
        ):
            raise FakeNVMLError("Invalid Argument")
        if mg.sample1.freed or mg.sample2.freed or mg.sample1.seq >= mg.sample2.seq:
            raise FakeNVMLError("Invalid Argument: samples freed or out of order")
        h = mg.sample2.handle
        g = self.gpus[h[1]]
        n = self._tick(h, "gpm")
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            vals = g["gpm_values"].get(m.metricId)
            if vals is None:
                m.nvmlReturn, m.value = 3, 0.0  # NOT_SUPPORTED
            else:
                m.nvmlReturn, m.value = 0, float(vals[n % len(vals)])
        return mg

    # MIG instance creation, as `nvidia-smi mig -i N -cgi a,b -C` would do it
    def create_instances(self, gpu_index: int, profiles: list[str]) -> None:
        g = self.gpus[gpu_index]
        for prof in profiles:
            gi = 1 + max([d["gi_id"] for d in g["mig_devices"]] or [0])
            g["mig_devices"].append(
                {
                    "uuid": f"MIG-fake-{gpu_index}-{gi}",
                    "profile": prof,
                    "gi_id": gi,
                    "memory_mib": g["profiles"][prof][2],
                }
            )

    def fake_nvidia_smi(self):
        """A `run_cmd` for coserve.gpu.mig.resolve that creates instances in this fake."""

        def run(cmd, **kw):
            i = int(cmd[cmd.index("-i") + 1])
            profs = cmd[cmd.index("-cgi") + 1].split(",")
            self.create_instances(i, profs)
            return SimpleNamespace(returncode=0, stdout="created\n", stderr="")

        return run
