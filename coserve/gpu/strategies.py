"""How the two model servers share GPUs: exclusive, timeslice, mps, mig, tp.

    from coserve.gpu.strategies import make_strategy
    with make_strategy("mps", ["0"], {"active_thread_percentage": {"embed": 50}}, run_dir) as s:
        env = s.env_for("gen")            # extra environment for the gen server's process
        tp = s.tensor_parallel_size("gen")
        s.describe()                      # what was set up, for results

`make_strategy` validates the name and options and touches nothing; set-up (daemons, MIG
instances, machine checks) happens on `__enter__`, tear-down on `__exit__`, also on
exceptions. The mps strategy also turns SIGTERM into SystemExit while its daemon runs, so a
`kill` of coserve stops the daemon too.

Options (unknown ones are refused, naming the allowed ones):

| strategy  | options |
|-----------|---------|
| exclusive | gen_gpus, embed_gpus (default: gen on gpus[0], embed on gpus[1]) |
| timeslice | gen_gpus, embed_gpus (default: both on all gpus) |
| mps       | gen_gpus, embed_gpus; active_thread_percentage, pinned_mem_limit, client_priority (each a value for both servers or {"gen": .., "embed": ..}); allow_exclusive_process, ignore_foreign_daemons, control_bin, start_timeout_s |
| mig       | profiles ("4g.71gb+3g.71gb", a list, or "auto": the study's 4g+3g layout for this GPU), apply_mig |
| tp        | tp / gen_tp / embed_tp (degree per server), gen_gpus, embed_gpus (default gpus[:tp]), sharing ("timeslice" or "mps"), and the mps options when sharing = "mps" |

`tp+mps` and `tp+timeslice` are accepted as names for tp with that sharing.
Every environment this module hands out (and every process coserve starts) carries
NCCL_NVLS_ENABLE=0 (plus TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from coserve.engine.nccl_env import NO_MULTICAST_ENV

BASE_ENV: dict[str, str] = dict(NO_MULTICAST_ENV)
ROLES = ("gen", "embed")
STRATEGIES = ("exclusive", "timeslice", "mps", "mig", "tp")
_ROLE_GPU_OPTS = {"gen_gpus", "embed_gpus"}
_MPS_OPTS = {"active_thread_percentage", "pinned_mem_limit", "client_priority", "allow_exclusive_process",
             "ignore_foreign_daemons", "control_bin", "start_timeout_s"}
OPTIONS: dict[str, set[str]] = {
    "exclusive": set(_ROLE_GPU_OPTS),
    "timeslice": set(_ROLE_GPU_OPTS),
    "mps": _ROLE_GPU_OPTS | _MPS_OPTS,
    "mig": {"profiles", "apply_mig"},
    "tp": _ROLE_GPU_OPTS | {"tp", "gen_tp", "embed_tp", "sharing"} | _MPS_OPTS,
}
_PRIORITY = {"normal": 0, "below_normal": 1, "low": 1, "0": 0, "1": 1}


class StrategyError(ValueError):
    """A strategy that cannot run as asked; the message names the option or what is missing."""


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise StrategyError(f"unknown server role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def _per_role(options: dict, key: str, role: str, default=None):
    v = options.get(key, default)
    if isinstance(v, dict):
        bad = set(v) - set(ROLES)
        if bad:
            raise StrategyError(f"option {key}: unknown role(s) {', '.join(sorted(bad))}; expected gen and/or embed")
        return v.get(role, default)
    return v


def _gpu_list(value, key: str) -> list[str]:
    if isinstance(value, (str, int)):
        value = [p for p in str(value).split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise StrategyError(f"option {key}: expected a non-empty list of GPUs (indices or UUIDs), got {value!r}")
    return [str(g).strip() for g in value]


def _open_nvml_quiet(nvml):
    from coserve.gpu import nvml as nv

    try:
        return nv.open_nvml(nvml), None
    except nv.NvmlUnavailable as e:
        return None, str(e)


class Strategy:
    """Base: set-up on enter, tear-down on exit (also on exceptions)."""

    name = "base"

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        self.gpus = [str(g).strip() for g in gpus]
        self.options = dict(options or {})
        self.run_dir = Path(run_dir)
        self._nvml = nvml
        self.notes: list[str] = []
        self.active = False
        self._role_devices: dict[str, list[str]] = {}
        self.validate()

    # -- to override -------------------------------------------------------------------
    def validate(self) -> None:
        unknown = set(self.options) - OPTIONS[self.name]
        if unknown:
            raise StrategyError(f"strategy {self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                                f"allowed: {', '.join(sorted(OPTIONS[self.name])) or 'none'}")

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
        return list(self._role_devices.get(_check_role(role), []))

    def env_for(self, role: str) -> dict[str, str]:
        _check_role(role)
        env = dict(BASE_ENV)
        env.update(self._env(role))
        return env

    def tensor_parallel_size(self, role: str) -> int:
        _check_role(role)
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
            "roles": {r: {"devices": self.devices_for(r), "tensor_parallel_size": self.tensor_parallel_size(r),
                          "env": self.env_for(r)} for r in ROLES},
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
    def _check_compute_modes(self, devices: list[str], *, shared: bool, allow_exclusive_process: bool = False,
                             mps: bool = False) -> None:
        """Refuse GPUs whose compute mode forbids what we are about to do."""
        from coserve.gpu import nvml as nv

        if not devices:
            return
        lib, why = _open_nvml_quiet(self._nvml)
        if lib is None:
            self.notes.append(f"compute mode not checked: {why}")
            return
        try:
            for d in devices:
                idx = nv.resolve_gpu_index(lib, d)
                h = nv.try_call(lib.nvmlDeviceGetHandleByIndex, idx) if idx is not None else None
                if h is None:
                    if not d.startswith("MIG-"):
                        raise StrategyError(f"GPU {d!r} not found by NVML (this machine has "
                                            f"{nv.try_call(lib.nvmlDeviceGetCount, default='?')} GPU(s))")
                    continue
                mode = nv.COMPUTE_MODES.get(nv.try_call(lib.nvmlDeviceGetComputeMode, h), "unknown")
                if mode == "PROHIBITED":
                    raise StrategyError(f"GPU {d} is in PROHIBITED compute mode: no CUDA process may use it")
                if mode in ("EXCLUSIVE_PROCESS", "EXCLUSIVE_THREAD"):
                    if mps and not allow_exclusive_process:
                        raise StrategyError(
                            f"GPU {d} is in {mode} compute mode. coserve refuses to start MPS on it by default: only "
                            f"one process may hold the GPU, and it is set that way on purpose by whoever runs it. "
                            f"If this is a dedicated MPS setup, pass the mps option allow_exclusive_process = true; "
                            f"otherwise set DEFAULT yourself (nvidia-smi -i {d} -c DEFAULT; coserve does not change it)")
                    if shared and not mps:
                        raise StrategyError(
                            f"GPU {d} is in {mode} compute mode: two servers cannot share it without MPS. "
                            f"Use strategy mps, or set DEFAULT (nvidia-smi -i {d} -c DEFAULT; coserve does not change it)")
                self.notes.append(f"GPU {d}: compute mode {mode}")
        finally:
            nv.close_nvml(lib)

    def _foreign_mps(self) -> list:
        from coserve.gpu import mps

        return mps.find_mps_processes(exclude=mps.our_pids())


class _RoleGpus(Strategy):
    """Strategies where each role gets a list of GPUs, given or defaulted."""

    def _default_devices(self, role: str) -> list[str]:
        return list(self.gpus)

    def validate(self) -> None:
        super().validate()
        for role in ROLES:
            key = f"{role}_gpus"
            if key in self.options:
                self._role_devices[role] = _gpu_list(self.options[key], key)
                missing = [g for g in self._role_devices[role] if self.gpus and g not in self.gpus]
                if missing:
                    raise StrategyError(f"option {key}: {', '.join(missing)} not in this condition's gpus {self.gpus}")
            else:
                self._role_devices[role] = self._default_devices(role)


class _WithoutMps(_RoleGpus):
    """A condition meant to run without MPS. Its clients point at an empty pipe directory of
    ours, so that a default MPS daemon someone else runs (/tmp/nvidia-mps) cannot capture it."""

    def _set_up_without_mps(self, shared: bool) -> None:
        self._check_compute_modes(self.telemetry_devices(), shared=shared)
        for p in self._foreign_mps():
            self.notes.append(f"{p.describe()} is running; this condition's servers do not use it "
                              f"(their CUDA_MPS_PIPE_DIRECTORY points to an empty directory)")
        (self.run_dir / "no-mps").mkdir(parents=True, exist_ok=True)

    def _env(self, role: str) -> dict[str, str]:
        env = super()._env(role)
        if self.gpus:
            env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.run_dir / "no-mps")
        return env


class Exclusive(_WithoutMps):
    """One GPU (or GPU set) per model: the study's planned baseline, gen on GPU 0, embed on GPU 1."""

    name = "exclusive"

    def _default_devices(self, role: str) -> list[str]:
        if len(self.gpus) < 2:
            raise StrategyError(f"strategy exclusive needs 2 GPUs (gen on one, embed on the other), got "
                                f"{len(self.gpus)}: {self.gpus or 'none'}; for a single server use timeslice")
        return [self.gpus[0]] if role == "gen" else [self.gpus[1]]

    def validate(self) -> None:
        super().validate()
        shared = set(self._role_devices["gen"]) & set(self._role_devices["embed"])
        if shared:
            raise StrategyError(f"strategy exclusive: gen and embed both on {', '.join(sorted(shared))}; "
                                f"exclusive means no shared GPU (use timeslice or mps to share)")

    def setup(self) -> None:
        self._set_up_without_mps(shared=False)


class Timeslice(_WithoutMps):
    """Both servers on the same GPU(s) in the default compute mode: CUDA time-slices them."""

    name = "timeslice"

    def setup(self) -> None:
        if not self.gpus:
            self.notes.append("no GPUs given: both servers run where their device flag says (CPU)")
            return
        self._set_up_without_mps(shared=True)


def _libcuda_paths() -> list[str]:
    cands = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
        cands += [line.split("=>")[-1].strip() for line in out.splitlines() if "libcuda.so" in line]
    except Exception:
        pass
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib", "/usr/lib"):
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


def _deferred_sigterm(_signo, _frame):
    raise SystemExit(128 + signal.SIGTERM)


class Mps(_RoleGpus):
    """Both servers as clients of coserve's own MPS control daemon (private pipe/log dirs)."""

    name = "mps"

    def validate(self) -> None:
        super().validate()
        if not self.gpus:
            raise StrategyError("strategy mps needs at least one GPU (MPS is a CUDA feature)")
        for role in ROLES:
            atp = _per_role(self.options, "active_thread_percentage", role)
            if atp is not None:
                try:
                    v = float(atp)
                except (TypeError, ValueError):
                    v = -1
                if not 0 < v <= 100:
                    raise StrategyError(f"option active_thread_percentage ({role}): expected a number in (0, 100], got {atp!r}")
            lim = _per_role(self.options, "pinned_mem_limit", role)
            if lim is not None and not _valid_mem_limit(str(lim)):
                raise StrategyError(f"option pinned_mem_limit ({role}): expected a size like '40G' or '512M' "
                                    f"(or 'idx=size,...'), got {lim!r}")
            pr = _per_role(self.options, "client_priority", role)
            if pr is not None and str(pr).lower() not in _PRIORITY:
                raise StrategyError(f"option client_priority ({role}): expected normal or below_normal (0 or 1), got {pr!r}")
        self.daemon = None
        self._old_sigterm = None
        self._sigterm_installed = False

    def _daemon_devices(self) -> list[str]:
        return self.telemetry_devices()

    def setup(self) -> None:
        from coserve.gpu import mps as mpsmod
        from coserve.gpu import nvml as nv

        if not self.options.get("ignore_foreign_daemons"):
            foreign = self._foreign_mps()
            if foreign:
                lines = "\n  ".join(p.describe() for p in foreign)
                hint = ""
                if any(p.started_by_coserve for p in foreign):
                    d = next(p.pipe_dir for p in foreign if p.started_by_coserve)
                    hint = f"\nOne was left by an earlier coserve run; stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY={d} nvidia-cuda-mps-control"
                raise StrategyError(
                    f"an MPS daemon coserve did not start is running:\n  {lines}\ncoserve never touches a daemon it "
                    f"did not start, and two daemons on one GPU do not mix. Stop it, run on other GPUs with the mps "
                    f"option ignore_foreign_daemons = true, or use strategy timeslice.{hint}")
        devices = self._daemon_devices()
        self._check_compute_modes(devices, shared=True, mps=True,
                                  allow_exclusive_process=bool(self.options.get("allow_exclusive_process")))
        if any(_per_role(self.options, "client_priority", r) is not None for r in ROLES):
            sup = mps_client_priority_supported()
            if sup is False:
                raise StrategyError("option client_priority: this driver's libcuda does not know "
                                    "CUDA_MPS_CLIENT_PRIORITY (a newer driver has it); drop the option")
            if sup is None:
                self.notes.append("client_priority: libcuda not found here, support not verified")
        # The daemon sees GPUs by UUID where NVML can tell them (NVIDIA's advice for MPS).
        visible = list(devices)
        lib, why = _open_nvml_quiet(self._nvml)
        if lib is not None:
            try:
                for i, d in enumerate(devices):
                    if d.isdigit():
                        h = nv.try_call(lib.nvmlDeviceGetHandleByIndex, int(d))
                        uuid = nv.try_call(lib.nvmlDeviceGetUUID, h) if h is not None else None
                        if uuid:
                            visible[i] = nv._s(uuid)
            finally:
                nv.close_nvml(lib)
        self.daemon = mpsmod.MpsDaemon(devices, self.run_dir, control_bin=self.options.get("control_bin"),
                                       start_timeout_s=float(self.options.get("start_timeout_s", 30)),
                                       cuda_visible_devices=",".join(visible))
        self._install_sigterm()
        try:
            self.daemon.start()
        except mpsmod.MpsError as e:
            raise StrategyError(str(e)) from e
        self.notes.append(f"MPS daemon pid {self.daemon.proc.pid}, server pids {self.daemon.server_pids}, "
                          f"pipe dir {self.daemon.pipe_dir}, logs {self.daemon.log_dir}")
        self.notes.append("NVML reports MPS clients as the MPS server's process; GPM is device-wide")

    def teardown(self) -> None:
        deferred: list[int] = []
        if self._sigterm_installed:  # a SIGTERM during tear-down waits until the daemon is down
            signal.signal(signal.SIGTERM, lambda s, f: deferred.append(s))
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            if self._sigterm_installed:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._sigterm_installed = False
            if deferred:
                raise SystemExit(128 + signal.SIGTERM)

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.notes.append("not in the main thread: SIGTERM is not intercepted; the caller must stop the daemon")
            return
        cur = signal.getsignal(signal.SIGTERM)
        if cur in (signal.SIG_DFL, None):
            self._old_sigterm = cur if cur is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, _deferred_sigterm)
            self._sigterm_installed = True

    def _env(self, role: str) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.daemon is not None:  # before set-up the pipe directory is not known yet
            env.update(self.daemon.client_env())
        # The MPS server re-numbers the GPUs it was given from 0; clients use those numbers.
        daemon_devs = self._daemon_devices()
        devs = self.devices_for(role)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(daemon_devs.index(d)) for d in devs)
        atp = _per_role(self.options, "active_thread_percentage", role)
        if atp is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = f"{float(atp):g}"
        lim = _per_role(self.options, "pinned_mem_limit", role)
        if lim is not None:
            lim = str(lim)
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = lim if "=" in lim else ",".join(f"{i}={lim}" for i in range(len(devs)))
        pr = _per_role(self.options, "client_priority", role)
        if pr is not None:
            env["CUDA_MPS_CLIENT_PRIORITY"] = str(_PRIORITY[str(pr).lower()])
        return env

    def describe(self) -> dict:
        d = super().describe()
        if self.daemon is not None:
            d["mps"] = {"pipe_dir": str(self.daemon.pipe_dir), "log_dir": str(self.daemon.log_dir),
                        "server_pids": list(self.daemon.server_pids), "events": list(self.daemon.events)}
        return d


def _valid_mem_limit(s: str) -> bool:
    import re

    one = r"\d+(\.\d+)?\s*[KMGT]?B?"
    return bool(re.fullmatch(one, s.strip(), re.IGNORECASE) or
                re.fullmatch(rf"\d+={one}(,\d+={one})*", s.replace(" ", ""), re.IGNORECASE))


class Mig(Strategy):
    """Each server on its own MIG instance (hard partition); see coserve.gpu.mig."""

    name = "mig"

    def validate(self) -> None:
        super().validate()
        from coserve.gpu import mig

        self.roles = list(ROLES)
        prof = self.options.get("profiles", "auto")
        if prof not in (None, "", "auto"):
            try:
                self.profiles = mig.parse_profiles(prof)
            except mig.MigError as e:
                raise StrategyError(f"option profiles: {e}") from e
            if len(self.profiles) != len(self.roles):
                raise StrategyError(f"option profiles: {len(self.profiles)} profiles for 2 servers (gen, embed); "
                                    f"give two, e.g. '4g.71gb+3g.71gb'")
        else:
            self.profiles = None
        if len(self.gpus) > 2 or (len(self.gpus) == 2 and not all(g.startswith("MIG-") for g in self.gpus)):
            raise StrategyError(f"strategy mig takes one parent GPU (partitioned for both servers) or two MIG "
                                f"device UUIDs, got {self.gpus}")
        self.plan = None
        self.created: list[str] = []

    def setup(self) -> None:
        from coserve.gpu import mig

        if len(self.gpus) == 2:  # MIG devices given directly
            self._role_devices = {"gen": [self.gpus[0]], "embed": [self.gpus[1]]}
            self.notes.append("MIG devices given directly; no plan made")
            return
        gpu = self.gpus[0] if self.gpus else "0"
        try:
            self.plan, assigned, self.created = mig.resolve(gpu, self.profiles or "auto", self.roles,
                                                            apply=bool(self.options.get("apply_mig")), nvml=self._nvml)
        except mig.MigError as e:
            raise StrategyError(str(e)) from e
        self._role_devices = {r: [assigned[r]] for r in self.roles}
        if self.created:
            self.notes.append(f"--apply-mig created {'+'.join(self.created)} (coserve never destroys instances)")

    def _env(self, role: str) -> dict[str, str]:
        devs = self.devices_for(role)
        return {"CUDA_VISIBLE_DEVICES": devs[0]} if devs else {}

    def describe(self) -> dict:
        d = super().describe()
        d["mig"] = {"plan": self.plan.as_dict() if self.plan else None, "created": list(self.created)}
        return d


class Tp(Strategy):
    """A tensor-parallel degree per server over a GPU list, shared by timeslice or mps."""

    name = "tp"

    def validate(self) -> None:
        super().validate()
        sharing = self.options.get("sharing", "timeslice")
        if sharing not in ("timeslice", "mps"):
            raise StrategyError(f"option sharing: expected timeslice or mps, got {sharing!r}")
        self.sharing = sharing
        self.tp: dict[str, int] = {}
        for role in ROLES:
            v = self.options.get(f"{role}_tp", _per_role(self.options, "tp", role))
            if v is None:
                v = len(self.options.get(f"{role}_gpus") or self.gpus) or 1
            try:
                n = int(v)
            except (TypeError, ValueError):
                n = 0
            if n < 1 or str(v).strip() != str(n):
                raise StrategyError(f"option {role}_tp / tp: expected a whole number >= 1, got {v!r}")
            self.tp[role] = n
        inner_opts = {k: v for k, v in self.options.items() if k in (_ROLE_GPU_OPTS | (_MPS_OPTS if sharing == "mps" else set()))}
        for role in ROLES:
            if f"{role}_gpus" not in inner_opts:
                if self.tp[role] > len(self.gpus):
                    raise StrategyError(f"strategy tp: {role} has TP={self.tp[role]} but the condition has "
                                        f"{len(self.gpus)} GPU(s) {self.gpus}")
                inner_opts[f"{role}_gpus"] = list(self.gpus[: self.tp[role]])
        extra_mps = set(self.options) & _MPS_OPTS
        if sharing != "mps" and extra_mps:
            raise StrategyError(f"strategy tp: option(s) {', '.join(sorted(extra_mps))} need sharing = \"mps\"")
        cls = Mps if sharing == "mps" else Timeslice
        self.inner = cls(self.gpus, inner_opts, self.run_dir, nvml=self._nvml)
        for role in ROLES:
            n = len(self.inner.devices_for(role))
            if n != self.tp[role]:
                raise StrategyError(f"strategy tp: {role} has TP={self.tp[role]} but {n} GPU(s) "
                                    f"{self.inner.devices_for(role)}; give as many GPUs as the TP degree")

    def setup(self) -> None:
        self.inner.setup()

    def teardown(self) -> None:
        self.inner.teardown()

    def devices_for(self, role: str) -> list[str]:
        return self.inner.devices_for(role)

    def _env(self, role: str) -> dict[str, str]:
        return self.inner._env(role)

    def tensor_parallel_size(self, role: str) -> int:
        return self.tp[_check_role(role)]

    def describe(self) -> dict:
        d = self.inner.describe()
        d.update({"strategy": self.name, "sharing": self.sharing, "options": dict(self.options)})
        d["roles"] = {r: {"devices": self.devices_for(r), "tensor_parallel_size": self.tp[r], "env": self.env_for(r)}
                      for r in ROLES}
        return d


_CLASSES = {"exclusive": Exclusive, "timeslice": Timeslice, "mps": Mps, "mig": Mig, "tp": Tp}


def make_strategy(name: str, gpus: list[str], options: dict | None, run_dir: Path, *, nvml: Any = None) -> Strategy:
    """Validate and build a strategy (nothing is started until `with`)."""
    options = dict(options or {})
    key = str(name).strip().lower()
    if key in ("tp+mps", "tp+timeslice"):
        sharing = key.split("+", 1)[1]
        if options.get("sharing", sharing) != sharing:
            raise StrategyError(f"strategy {name}: option sharing = {options['sharing']!r} contradicts the name")
        options["sharing"] = sharing
        key = "tp"
    if key not in _CLASSES:
        raise StrategyError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)} (or tp+mps, tp+timeslice)")
    if gpus is None:
        gpus = []
    if isinstance(gpus, str):
        gpus = [g for g in gpus.split(",") if g.strip()]
    return _CLASSES[key](list(gpus), options, Path(run_dir), nvml=nvml)

