"""NVML access shared by the strategies, telemetry and `coserve doctor`.

Everything here takes an optional `nvml` object: the `pynvml` module (package
nvidia-ml-py) by default, or any object with the same function names (tests inject a
fake that returns known values). `open_nvml()` says plainly why NVML is unusable on a
machine without a GPU instead of raising.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}
_MIG_PROFILE_RE = re.compile(r"(\d+g\.\d+gb(?:\+me(?:\.all)?|-me|\+gfx)?)", re.IGNORECASE)


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (no driver, no GPU, no pynvml)."""


def open_nvml(nvml: Any = None) -> Any:
    """Return an initialised NVML object, or raise NvmlUnavailable with a plain reason.

    Each successful call must be paired with `close_nvml` (NVML counts its inits)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError as e:  # pragma: no cover - pynvml is a dependency
            raise NvmlUnavailable(
                f"no GPU: the NVML bindings (nvidia-ml-py) are not installed ({e})"
            ) from e
    try:
        nvml.nvmlInit()
    except Exception as e:  # pynvml raises NVMLError subclasses; fakes may raise anything
        raise NvmlUnavailable(f"no GPU: NVML could not be initialised ({_err(e)})") from e
    return nvml


def close_nvml(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


@contextlib.contextmanager
def nvml_session(nvml: Any = None) -> Iterator[Any]:
    """`with nvml_session() as lib:` NVML is initialised inside and shut down on the way out.

    Raises NvmlUnavailable, before the body runs, when NVML cannot be used here."""
    lib = open_nvml(nvml)
    try:
        yield lib
    finally:
        close_nvml(lib)


def _err(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def try_call(fn, *args, default=None):
    """Call an NVML function; NVML errors (not supported, no permission) give `default`."""
    try:
        return fn(*args)
    except Exception:
        return default


def device_handle(nvml: Any, device: str):
    """Handle for "0" (index), "GPU-..." or "MIG-..." (UUIDs)."""
    device = str(device).strip()
    if device.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(device))
    return nvml.nvmlDeviceGetHandleByUUID(device)


def mig_profile_from_name(name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3 MIG 4g.40gb' -> '4g.40gb'."""
    m = _MIG_PROFILE_RE.search(name or "")
    return m.group(1).lower() if m else None


@dataclass
class MigDevice:
    uuid: str
    profile: str | None
    gpu_instance_id: int | None
    compute_instance_id: int | None
    memory_mib: int | None
    parent_index: int


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_mib: int
    compute_mode: str
    mig_current: bool | None
    mig_pending: bool | None
    gpm_supported: bool | None
    mig_devices: list[MigDevice] = field(default_factory=list)
    supported_mig_profiles: dict[str, dict] = field(default_factory=dict)


def driver_versions(nvml: Any) -> tuple[str | None, str | None]:
    drv = try_call(nvml.nvmlSystemGetDriverVersion)
    cuda = try_call(nvml.nvmlSystemGetCudaDriverVersion)
    cuda_s = f"{cuda // 1000}.{(cuda % 1000) // 10}" if isinstance(cuda, int) and cuda > 0 else None
    return (_s(drv) if drv is not None else None), cuda_s


def gpm_supported(nvml: Any, handle) -> bool | None:
    fn = getattr(nvml, "nvmlGpmQueryDeviceSupport", None)
    if fn is None:
        return None
    sup = try_call(fn, handle)
    if sup is None:
        return False
    return bool(getattr(sup, "isSupportedDevice", sup))


def supported_mig_profiles(nvml: Any, handle) -> dict[str, dict]:
    """GPU instance profiles the driver reports for this GPU: name -> info.

    Asks NVML for every profile id it knows (nvmlDeviceGetGpuInstanceProfileInfo, v2 carries the
    name); profiles the GPU lacks answer NOT_SUPPORTED and are skipped."""
    out: dict[str, dict] = {}
    count = getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0)
    fn = getattr(nvml, "nvmlDeviceGetGpuInstanceProfileInfo", None)
    if fn is None:
        return out
    for pid in range(int(count)):
        info = try_call(fn, handle, pid)
        if info is None or not getattr(info, "sliceCount", 0):
            continue
        name = mig_profile_from_name(_s(getattr(info, "name", "")))
        if name is None:
            mem_gb = round(int(info.memorySizeMB) / 1024)
            name = f"{int(info.sliceCount)}g.{mem_gb}gb"
        out.setdefault(
            name,
            {
                "profile_id": pid,
                "nvml_id": int(getattr(info, "id", pid)),
                "slices": int(info.sliceCount),
                "instances": int(getattr(info, "instanceCount", 0)),
                "sms": int(getattr(info, "multiprocessorCount", 0)),
                "memory_mib": int(info.memorySizeMB),
            },
        )
    return out


def mig_devices(nvml: Any, handle, parent_index: int) -> list[MigDevice]:
    out: list[MigDevice] = []
    n = try_call(nvml.nvmlDeviceGetMaxMigDeviceCount, handle, default=0) or 0
    for i in range(int(n)):
        mh = try_call(nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, i)
        if mh is None:
            continue
        uuid = _s(try_call(nvml.nvmlDeviceGetUUID, mh, default=""))
        name = _s(try_call(nvml.nvmlDeviceGetName, mh, default=""))
        mem = try_call(nvml.nvmlDeviceGetMemoryInfo, mh)
        out.append(
            MigDevice(
                uuid=uuid,
                profile=mig_profile_from_name(name),
                gpu_instance_id=try_call(nvml.nvmlDeviceGetGpuInstanceId, mh),
                compute_instance_id=try_call(
                    getattr(nvml, "nvmlDeviceGetComputeInstanceId", lambda h: None), mh
                ),
                memory_mib=int(mem.total) // (1024 * 1024) if mem is not None else None,
                parent_index=parent_index,
            )
        )
    return out


def gpu_info(nvml: Any, index: int, *, with_mig_profiles: bool = True) -> GpuInfo:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = try_call(nvml.nvmlDeviceGetMemoryInfo, h)
    mode = try_call(nvml.nvmlDeviceGetComputeMode, h)
    mig = try_call(nvml.nvmlDeviceGetMigMode, h)
    cur, pend = (bool(mig[0]), bool(mig[1])) if mig is not None else (None, None)
    info = GpuInfo(
        index=index,
        name=_s(try_call(nvml.nvmlDeviceGetName, h, default="?")),
        uuid=_s(try_call(nvml.nvmlDeviceGetUUID, h, default="")),
        memory_mib=int(mem.total) // (1024 * 1024) if mem is not None else 0,
        compute_mode=COMPUTE_MODES.get(mode, "unknown") if mode is not None else "unknown",
        mig_current=cur,
        mig_pending=pend,
        gpm_supported=gpm_supported(nvml, h),
    )
    if cur:
        info.mig_devices = mig_devices(nvml, h, index)
    if with_mig_profiles and cur is not None:  # MIG-capable GPU; NVML may answer with MIG off
        info.supported_mig_profiles = supported_mig_profiles(nvml, h)
    return info


def all_gpus(nvml: Any, *, with_mig_profiles: bool = True) -> list[GpuInfo]:
    n = nvml.nvmlDeviceGetCount()
    return [gpu_info(nvml, i, with_mig_profiles=with_mig_profiles) for i in range(int(n))]


def resolve_gpu_index(nvml: Any, device: str) -> int | None:
    """Index of a physical GPU given by index or GPU UUID (None for MIG UUIDs / unknown)."""
    device = str(device).strip()
    if device.isdigit():
        return int(device)
    h = try_call(nvml.nvmlDeviceGetHandleByUUID, device)
    if h is None:
        return None
    return try_call(nvml.nvmlDeviceGetIndex, h)
