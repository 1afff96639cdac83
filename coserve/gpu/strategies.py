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

- exclusive: gen_gpus, embed_gpus (default: gen on gpus[0], embed on gpus[1])
- timeslice: gen_gpus, embed_gpus (default: both on all gpus)
- mps: gen_gpus, embed_gpus; active_thread_percentage, pinned_mem_limit, client_priority
  (each a value for both servers or {"gen": .., "embed": ..}); allow_exclusive_process,
  ignore_foreign_daemons, control_bin, start_timeout_s
- mig: profiles ("4g.71gb+3g.71gb", a list, or "auto": the study's 4g+3g layout for this
  GPU), apply_mig
- tp: tp / gen_tp / embed_tp (degree per server), gen_gpus, embed_gpus (default gpus[:tp]),
  sharing ("timeslice" or "mps"), and the mps options when sharing = "mps"

Modules: strategy_base.py (options, errors, the shared bookkeeping), strategy_mps.py (mps),
this one (the others, and `make_strategy`).

`tp+mps` and `tp+timeslice` are accepted as names for tp with that sharing.
Every environment this module hands out (and every process coserve starts) carries
NCCL_NVLS_ENABLE=0 (plus TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coserve.gpu import mig
from coserve.gpu.strategy_base import (  # noqa: F401 - the strategy API, importable from here
    MPS_OPTS,
    OPTIONS,
    ROLE_GPU_OPTS,
    STRATEGIES,
    TP_ALIASES,
    Strategy,
    StrategyError,
    WithoutMps,
    check_role,
    per_role,
)
from coserve.gpu.strategy_mps import Mps, mps_client_priority_supported  # noqa: F401
from coserve.procs import BASE_ENV  # noqa: F401
from coserve.roles import ROLES


class Exclusive(WithoutMps):
    """One GPU (or GPU set) per model: the study's planned baseline, gen on GPU 0, embed on
    GPU 1."""

    name = "exclusive"

    def _default_devices(self, role: str) -> list[str]:
        if len(self.gpus) < 2:
            raise StrategyError(
                f"strategy exclusive needs 2 GPUs (gen on one, embed on the other), got "
                f"{len(self.gpus)}: {self.gpus or 'none'}; for a single server use timeslice"
            )
        return [self.gpus[0]] if role == "gen" else [self.gpus[1]]

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        super().__init__(gpus, options, run_dir, nvml)
        shared = set(self._role_devices["gen"]) & set(self._role_devices["embed"])
        if shared:
            raise StrategyError(
                f"strategy exclusive: gen and embed both on {', '.join(sorted(shared))}; "
                f"exclusive means no shared GPU (use timeslice or mps to share)"
            )

    def setup(self) -> None:
        self._set_up_without_mps(shared=False)


class Timeslice(WithoutMps):
    """Both servers on the same GPU(s) in the default compute mode: CUDA time-slices them."""

    name = "timeslice"

    def setup(self) -> None:
        if not self.gpus:
            self.notes.append("no GPUs given: both servers run where their device flag says (CPU)")
            return
        self._set_up_without_mps(shared=True)


class Mig(Strategy):
    """Each server on its own MIG instance (hard partition); see coserve.gpu.mig."""

    name = "mig"

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        super().__init__(gpus, options, run_dir, nvml)
        self.roles = list(ROLES)
        prof = self.options.get("profiles", "auto")
        if prof not in (None, "", "auto"):
            try:
                self.profiles = mig.parse_profiles(prof)
            except mig.MigError as e:
                raise StrategyError(str(e), option="profiles") from e
            if len(self.profiles) != len(self.roles):
                raise StrategyError(
                    f"{len(self.profiles)} profiles for 2 servers (gen, embed); "
                    f"give two, e.g. '4g.71gb+3g.71gb'",
                    option="profiles",
                )
        else:
            self.profiles = None
        if len(self.gpus) > 2 or (
            len(self.gpus) == 2 and not all(g.startswith("MIG-") for g in self.gpus)
        ):
            raise StrategyError(
                f"strategy mig takes one parent GPU (partitioned for both servers) or two MIG "
                f"device UUIDs, got {self.gpus}"
            )
        self.plan = None
        self.created: list[str] = []

    def setup(self) -> None:
        if len(self.gpus) == 2:  # MIG devices given directly
            self._role_devices = {"gen": [self.gpus[0]], "embed": [self.gpus[1]]}
            self.notes.append("MIG devices given directly; no plan made")
            return
        gpu = self.gpus[0] if self.gpus else "0"
        try:
            self.plan, assigned, self.created = mig.resolve(
                gpu,
                self.profiles or "auto",
                self.roles,
                apply=bool(self.options.get("apply_mig")),
                nvml=self._nvml,
            )
        except mig.MigError as e:
            raise StrategyError(str(e)) from e
        self._role_devices = {r: [assigned[r]] for r in self.roles}
        if self.created:
            self.notes.append(
                f"--apply-mig created {'+'.join(self.created)} (coserve never destroys instances)"
            )

    def _env(self, role: str) -> dict[str, str]:
        devs = self.devices_for(role)
        return {"CUDA_VISIBLE_DEVICES": devs[0]} if devs else {}

    def describe(self) -> dict:
        d = super().describe()
        d["mig"] = {
            "plan": self.plan.as_dict() if self.plan else None,
            "created": list(self.created),
        }
        return d


class Tp(Strategy):
    """A tensor-parallel degree per server over a GPU list, shared by timeslice or mps."""

    name = "tp"

    def __init__(self, gpus: list[str], options: dict, run_dir: Path, nvml: Any = None):
        super().__init__(gpus, options, run_dir, nvml)
        sharing = self.options.get("sharing", "timeslice")
        if sharing not in ("timeslice", "mps"):
            raise StrategyError(f"expected timeslice or mps, got {sharing!r}", option="sharing")
        self.sharing = sharing
        self.tp: dict[str, int] = {}
        for role in ROLES:
            key = f"{role}_tp" if f"{role}_tp" in self.options else "tp"
            v = self.options.get(f"{role}_tp", per_role(self.options, "tp", role))
            if v is None:
                v = len(self.options.get(f"{role}_gpus") or self.gpus) or 1
            # an int only: a string "2" is a TOML slip, refused as every other spec number is
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StrategyError(
                    f"expected an integer >= 1 (a TP degree), got {v!r}",
                    option=key,
                    role=role if key == "tp" and isinstance(self.options["tp"], dict) else None,
                )
            self.tp[role] = v
        inner_opts = {
            k: v
            for k, v in self.options.items()
            if k in (ROLE_GPU_OPTS | (MPS_OPTS if sharing == "mps" else set()))
        }
        for role in ROLES:
            if f"{role}_gpus" not in inner_opts:
                if self.tp[role] > len(self.gpus):
                    raise StrategyError(
                        f"strategy tp: {role} has TP={self.tp[role]} but the condition has "
                        f"{len(self.gpus)} GPU(s) {self.gpus}"
                    )
                inner_opts[f"{role}_gpus"] = list(self.gpus[: self.tp[role]])
        extra_mps = set(self.options) & MPS_OPTS
        if sharing != "mps" and extra_mps:
            raise StrategyError(
                f'strategy tp: option(s) {", ".join(sorted(extra_mps))} need sharing = "mps"',
                about_options=True,
            )
        cls = Mps if sharing == "mps" else Timeslice
        self.inner = cls(self.gpus, inner_opts, self.run_dir, nvml=self._nvml)
        for role in ROLES:
            n = len(self.inner.devices_for(role))
            if n != self.tp[role]:
                raise StrategyError(
                    f"strategy tp: {role} has TP={self.tp[role]} but {n} GPU(s) "
                    f"{self.inner.devices_for(role)}; give as many GPUs as the TP degree"
                )

    def setup(self) -> None:
        self.inner.setup()

    def teardown(self) -> None:
        self.inner.teardown()

    def devices_for(self, role: str) -> list[str]:
        return self.inner.devices_for(role)

    def _env(self, role: str) -> dict[str, str]:
        return self.inner._env(role)

    def tensor_parallel_size(self, role: str) -> int:
        return self.tp[check_role(role)]

    def describe(self) -> dict:
        d = self.inner.describe()
        d.update({"strategy": self.name, "sharing": self.sharing, "options": dict(self.options)})
        d["roles"] = {
            r: {
                "devices": self.devices_for(r),
                "tensor_parallel_size": self.tp[r],
                "env": self.env_for(r),
            }
            for r in ROLES
        }
        return d


_CLASSES = {"exclusive": Exclusive, "timeslice": Timeslice, "mps": Mps, "mig": Mig, "tp": Tp}


def make_strategy(
    name: str, gpus: list[str], options: dict | None, run_dir: Path, *, nvml: Any = None
) -> Strategy:
    """Validate and build a strategy (nothing is started until `with`)."""
    options = dict(options or {})
    key = str(name).strip().lower()
    if key in TP_ALIASES:
        sharing = key.split("+", 1)[1]
        if options.get("sharing", sharing) != sharing:
            raise StrategyError(
                f"strategy {name}: option sharing = {options['sharing']!r} contradicts the name",
                about_options=True,
            )
        options["sharing"] = sharing
        key = "tp"
    if key not in _CLASSES:
        raise StrategyError(
            f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)} "
            f"(or {', '.join(TP_ALIASES)})"
        )
    if gpus is None:
        gpus = []
    if isinstance(gpus, str):
        gpus = [g for g in gpus.split(",") if g.strip()]
    return _CLASSES[key](list(gpus), options, Path(run_dir), nvml=nvml)
