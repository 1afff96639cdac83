"""The base of every sharing strategy (see strategies.py): its options, its errors, and the
device/environment bookkeeping each strategy shares.

A strategy is built in its constructor: the options are parsed into attributes there, and a
bad one raises StrategyError before anything exists. Nothing is started until `with`
(`setup`); `teardown` undoes it, also after a failed set-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coserve.gpu import mps
from coserve.gpu import nvml as nv
from coserve.procs import BASE_ENV
from coserve.roles import ROLES

STRATEGIES = ("exclusive", "timeslice", "mps", "mig", "tp")
# Accepted as names for tp with that sharing.
TP_ALIASES = ("tp+timeslice", "tp+mps")
ROLE_GPU_OPTS = {"gen_gpus", "embed_gpus"}
MPS_OPTS = {
    "active_thread_percentage",
    "pinned_mem_limit",
    "client_priority",
    "allow_exclusive_process",
    "ignore_foreign_daemons",
    "control_bin",
    "start_timeout_s",
}
OPTIONS: dict[str, set[str]] = {
    "exclusive": set(ROLE_GPU_OPTS),
    "timeslice": set(ROLE_GPU_OPTS),
    "mps": ROLE_GPU_OPTS | MPS_OPTS,
    "mig": {"profiles", "apply_mig"},
    "tp": ROLE_GPU_OPTS | {"tp", "gen_tp", "embed_tp", "sharing"} | MPS_OPTS,
}


class StrategyError(ValueError):
    """A strategy that cannot run as asked; the message names the option or what is missing.

    `option`: the one option at fault (the message then reads "option NAME (ROLE): detail"),
    `role`: the server role of a per-role value, `detail`: the message without that prefix,
    `about_options`: the options are at fault, though not one of them alone."""

    def __init__(
        self,
        detail: str,
        *,
        option: str | None = None,
        role: str | None = None,
        about_options: bool = False,
    ):
        self.detail = detail
        self.option = option
        self.role = role
        self.about_options = about_options or option is not None
        prefix = f"option {option}{f' ({role})' if role else ''}: " if option else ""
        super().__init__(prefix + detail)


def check_role(role: str) -> str:
    """`role` itself; StrategyError when it is not one of ROLES."""
    if role not in ROLES:
        raise StrategyError(f"unknown server role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def per_role(options: dict, key: str, role: str, default=None):
    """Option `key` for `role`: a plain value holds for both roles, a {"gen": .., "embed": ..}
    table per role. StrategyError names a table key that is not a role."""
    v = options.get(key, default)
    if isinstance(v, dict):
        bad = set(v) - set(ROLES)
        if bad:
            raise StrategyError(
                f"unknown role(s) {', '.join(sorted(bad))}; expected gen and/or embed", option=key
            )
        return v.get(role, default)
    return v


def gpu_list(value, key: str) -> list[str]:
    """GPUs given as a list or "0,1" -> ["0", "1"]; StrategyError names option `key` when empty."""
    if isinstance(value, (str, int)):
        value = [p for p in str(value).split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise StrategyError(
            f"expected a non-empty list of GPUs (indices or UUIDs), got {value!r}", option=key
        )
    return [str(g).strip() for g in value]


class Strategy:
    """Base: options parsed on construction, set-up on enter, tear-down on exit (also on
    exceptions). Subclasses extend `__init__` (parse their options, raise StrategyError),
    `setup`, `teardown` and `_env`."""

    name = "base"

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        self.gpus = [str(g).strip() for g in gpus]
        self.options = dict(options or {})
        self.run_dir = Path(run_dir)
        self._nvml = nvml
        self.notes: list[str] = []
        self.active = False
        self._role_devices: dict[str, list[str]] = {}
        unknown = set(self.options) - OPTIONS[self.name]
        if unknown:
            raise StrategyError(
                f"strategy {self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(OPTIONS[self.name])) or 'none'}",
                about_options=True,
            )

    # -- to override -------------------------------------------------------------------
    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def _env(self, role: str) -> dict[str, str]:
        devs = self.devices_for(role)
        if not devs:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(devs), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    # -- public ------------------------------------------------------------------------
    def devices_for(self, role: str) -> list[str]:
        return list(self._role_devices.get(check_role(role), []))

    def env_for(self, role: str) -> dict[str, str]:
        check_role(role)
        env = dict(BASE_ENV)
        env.update(self._env(role))
        return env

    def tensor_parallel_size(self, role: str) -> int:
        check_role(role)
        return 1

    def telemetry_devices(self) -> list[str]:
        out: list[str] = []
        for role in ROLES:
            for d in self.devices_for(role):
                if d not in out:
                    out.append(d)
        return out

    def describe(self) -> dict:
        return {
            "strategy": self.name,
            "gpus": list(self.gpus),
            "options": dict(self.options),
            "roles": {
                r: {
                    "devices": self.devices_for(r),
                    "tensor_parallel_size": self.tensor_parallel_size(r),
                    "env": self.env_for(r),
                }
                for r in ROLES
            },
            "telemetry_devices": self.telemetry_devices(),
            "notes": list(self.notes),
        }

    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        self.active = True
        return self

    def __exit__(self, *exc) -> bool:
        self.active = False
        self.teardown()
        return False

    # -- shared checks -----------------------------------------------------------------
    def _check_compute_modes(
        self,
        devices: list[str],
        *,
        shared: bool,
        allow_exclusive_process: bool = False,
        mps: bool = False,
    ) -> None:
        """Refuse GPUs whose compute mode forbids what we are about to do."""
        if not devices:
            return
        try:
            with nv.nvml_session(self._nvml) as lib:
                for d in devices:
                    self._check_compute_mode(
                        lib,
                        d,
                        shared=shared,
                        mps=mps,
                        allow_exclusive_process=allow_exclusive_process,
                    )
        except nv.NvmlUnavailable as e:
            self.notes.append(f"compute mode not checked: {e}")

    def _check_compute_mode(
        self, lib: Any, d: str, *, shared: bool, mps: bool, allow_exclusive_process: bool
    ) -> None:
        idx = nv.resolve_gpu_index(lib, d)
        h = nv.try_call(lib.nvmlDeviceGetHandleByIndex, idx) if idx is not None else None
        if h is None:
            if not d.startswith("MIG-"):
                raise StrategyError(
                    f"GPU {d!r} not found by NVML (this machine has "
                    f"{nv.try_call(lib.nvmlDeviceGetCount, default='?')} GPU(s))"
                )
            return
        mode = nv.COMPUTE_MODES.get(nv.try_call(lib.nvmlDeviceGetComputeMode, h), "unknown")
        if mode == "PROHIBITED":
            raise StrategyError(
                f"GPU {d} is in PROHIBITED compute mode: no CUDA process may use it"
            )
        if mode in ("EXCLUSIVE_PROCESS", "EXCLUSIVE_THREAD"):
            if mps and not allow_exclusive_process:
                raise StrategyError(
                    f"GPU {d} is in {mode} compute mode. coserve refuses to start MPS on it by "
                    "default: only "
                    "one process may hold the GPU, and it is set that way on purpose by whoever "
                    "runs it. "
                    "If this is a dedicated MPS setup, pass the mps option "
                    "allow_exclusive_process = true; "
                    f"otherwise set DEFAULT yourself (nvidia-smi -i {d} -c DEFAULT; coserve does "
                    "not change it)"
                )
            if shared and not mps:
                raise StrategyError(
                    f"GPU {d} is in {mode} compute mode: two servers cannot share it without MPS. "
                    f"Use strategy mps, or set DEFAULT (nvidia-smi -i {d} -c DEFAULT; coserve does "
                    "not change it)"
                )
        self.notes.append(f"GPU {d}: compute mode {mode}")

    def _foreign_mps(self) -> list:
        return mps.find_mps_processes(exclude=mps.our_pids())


class RoleGpus(Strategy):
    """Strategies where each role gets a list of GPUs, given or defaulted."""

    def _default_devices(self, role: str) -> list[str]:
        return list(self.gpus)

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        super().__init__(gpus, options, run_dir, nvml)
        for role in ROLES:
            key = f"{role}_gpus"
            if key in self.options:
                self._role_devices[role] = gpu_list(self.options[key], key)
                missing = [g for g in self._role_devices[role] if self.gpus and g not in self.gpus]
                if missing:
                    raise StrategyError(
                        f"{', '.join(missing)} not in this condition's gpus {self.gpus}", option=key
                    )
            else:
                self._role_devices[role] = self._default_devices(role)


class WithoutMps(RoleGpus):
    """A condition meant to run without MPS. Its clients point at an empty pipe directory of
    ours, so that a default MPS daemon someone else runs (/tmp/nvidia-mps) cannot capture it."""

    def _set_up_without_mps(self, shared: bool) -> None:
        self._check_compute_modes(self.telemetry_devices(), shared=shared)
        for p in self._foreign_mps():
            self.notes.append(
                f"{p.describe()} is running; this condition's servers do not use it "
                f"(their CUDA_MPS_PIPE_DIRECTORY points to an empty directory)"
            )
        (self.run_dir / "no-mps").mkdir(parents=True, exist_ok=True)

    def _env(self, role: str) -> dict[str, str]:
        env = super()._env(role)
        if self.gpus:
            env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.run_dir / "no-mps")
        return env
