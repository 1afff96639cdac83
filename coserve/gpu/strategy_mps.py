"""The mps strategy: both servers as clients of coserve's own MPS control daemon (gpu/mps.py),
with per-role active thread percentage, pinned memory limit and client priority."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from coserve.gpu import mps as mpsmod
from coserve.gpu import nvml as nv
from coserve.gpu.strategy_base import RoleGpus, StrategyError, per_role
from coserve.procs import SigtermExit
from coserve.roles import ROLES

_PRIORITY = {"normal": 0, "below_normal": 1, "low": 1, "0": 0, "1": 1}


def _libcuda_paths() -> list[str]:
    cands = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
        cands += [line.split("=>")[-1].strip() for line in out.splitlines() if "libcuda.so" in line]
    except Exception:
        pass
    for d in (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/lib/wsl/lib",
        "/usr/lib",
    ):
        cands.append(os.path.join(d, "libcuda.so.1"))
    seen, out_paths = set(), []
    for c in cands:
        real = os.path.realpath(c)
        if os.path.exists(real) and real not in seen:
            seen.add(real)
            out_paths.append(real)
    return out_paths


def mps_client_priority_supported() -> bool | None:
    """Does this driver know CUDA_MPS_CLIENT_PRIORITY? Looks for the name in libcuda.

    True/False when libcuda was found, None when it was not (no driver here)."""
    for path in _libcuda_paths():
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(b"CUDA_MPS_CLIENT_PRIORITY") >= 0
        except (OSError, ValueError):
            continue
    return None


class Mps(RoleGpus):
    """Both servers as clients of coserve's own MPS control daemon (private pipe/log dirs)."""

    name = "mps"

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        super().__init__(gpus, options, run_dir, nvml)
        if not self.gpus:
            raise StrategyError("strategy mps needs at least one GPU (MPS is a CUDA feature)")
        for role in ROLES:
            atp = per_role(self.options, "active_thread_percentage", role)
            if atp is not None:
                # a number only: a string "50" is a TOML slip, refused as other spec numbers are
                number = isinstance(atp, int | float) and not isinstance(atp, bool)
                if not (number and 0 < atp <= 100):
                    raise StrategyError(
                        f"expected a number in (0, 100], got {atp!r}",
                        option="active_thread_percentage",
                        role=role,
                    )
            lim = per_role(self.options, "pinned_mem_limit", role)
            if lim is not None and not _valid_mem_limit(str(lim)):
                raise StrategyError(
                    f"expected a size like '40G' or '512M' (or 'idx=size,...'), got {lim!r}",
                    option="pinned_mem_limit",
                    role=role,
                )
            pr = per_role(self.options, "client_priority", role)
            if pr is not None and str(pr).lower() not in _PRIORITY:
                raise StrategyError(
                    f"expected normal or below_normal (0 or 1), got {pr!r}",
                    option="client_priority",
                    role=role,
                )
        self.daemon = None
        self._sigterm = SigtermExit()

    def _daemon_devices(self) -> list[str]:
        return self.telemetry_devices()

    def setup(self) -> None:
        if not self.options.get("ignore_foreign_daemons"):
            foreign = self._foreign_mps()
            if foreign:
                lines = "\n  ".join(p.describe() for p in foreign)
                hint = ""
                if any(p.started_by_coserve for p in foreign):
                    d = next(p.pipe_dir for p in foreign if p.started_by_coserve)
                    hint = (
                        "\nOne was left by an earlier coserve run; stop it with: "
                        f"echo quit | CUDA_MPS_PIPE_DIRECTORY={d} nvidia-cuda-mps-control"
                    )
                raise StrategyError(
                    f"an MPS daemon coserve did not start is running:\n  {lines}\ncoserve never "
                    "touches a daemon it "
                    "did not start, and two daemons on one GPU do not mix. Stop it, run on other "
                    "GPUs with the mps "
                    f"option ignore_foreign_daemons = true, or use strategy timeslice.{hint}"
                )
        devices = self._daemon_devices()
        self._check_compute_modes(
            devices,
            shared=True,
            mps=True,
            allow_exclusive_process=bool(self.options.get("allow_exclusive_process")),
        )
        if any(per_role(self.options, "client_priority", r) is not None for r in ROLES):
            sup = mps_client_priority_supported()
            if sup is False:
                raise StrategyError(
                    "this driver's libcuda does not know CUDA_MPS_CLIENT_PRIORITY "
                    "(a newer driver has it); drop the option",
                    option="client_priority",
                )
            if sup is None:
                self.notes.append("client_priority: libcuda not found here, support not verified")
        # The daemon sees GPUs by UUID where NVML can tell them (NVIDIA's advice for MPS).
        visible = list(devices)
        try:
            with nv.nvml_session(self._nvml) as lib:
                for i, d in enumerate(devices):
                    if d.isdigit():
                        h = nv.try_call(lib.nvmlDeviceGetHandleByIndex, int(d))
                        uuid = nv.try_call(lib.nvmlDeviceGetUUID, h) if h is not None else None
                        if uuid:
                            visible[i] = nv._s(uuid)
        except nv.NvmlUnavailable:
            pass  # the daemon then sees the GPUs by index
        self.daemon = mpsmod.MpsDaemon(
            devices,
            self.run_dir,
            control_bin=self.options.get("control_bin"),
            start_timeout_s=float(self.options.get("start_timeout_s", 30)),
            cuda_visible_devices=",".join(visible),
        )
        note = self._sigterm.install()
        if note:
            self.notes.append(note)
        try:
            self.daemon.start()
        except mpsmod.MpsError as e:
            raise StrategyError(str(e)) from e
        self.notes.append(
            f"MPS daemon pid {self.daemon.proc.pid}, server pids {self.daemon.server_pids}, "
            f"pipe dir {self.daemon.pipe_dir}, logs {self.daemon.log_dir}"
        )
        self.notes.append(
            "NVML reports MPS clients as the MPS server's process; GPM is device-wide"
        )

    def teardown(self) -> None:
        with self._sigterm.deferred():  # a SIGTERM during tear-down waits until the daemon is down
            if self.daemon is not None:
                self.daemon.stop()

    def _env(self, role: str) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.daemon is not None:  # before set-up the pipe directory is not known yet
            env.update(self.daemon.client_env())
        # The MPS server re-numbers the GPUs it was given from 0; clients use those numbers.
        daemon_devs = self._daemon_devices()
        devs = self.devices_for(role)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(daemon_devs.index(d)) for d in devs)
        atp = per_role(self.options, "active_thread_percentage", role)
        if atp is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = f"{float(atp):g}"
        lim = per_role(self.options, "pinned_mem_limit", role)
        if lim is not None:
            lim = str(lim)
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = (
                lim if "=" in lim else ",".join(f"{i}={lim}" for i in range(len(devs)))
            )
        pr = per_role(self.options, "client_priority", role)
        if pr is not None:
            env["CUDA_MPS_CLIENT_PRIORITY"] = str(_PRIORITY[str(pr).lower()])
        return env

    def describe(self) -> dict:
        d = super().describe()
        if self.daemon is not None:
            d["mps"] = {
                "pipe_dir": str(self.daemon.pipe_dir),
                "log_dir": str(self.daemon.log_dir),
                "server_pids": list(self.daemon.server_pids),
                "events": list(self.daemon.events),
            }
        return d


def _valid_mem_limit(s: str) -> bool:
    one = r"\d+(\.\d+)?\s*[KMGT]?B?"
    return bool(
        re.fullmatch(one, s.strip(), re.IGNORECASE)
        or re.fullmatch(rf"\d+={one}(,\d+={one})*", s.replace(" ", ""), re.IGNORECASE)
    )
