"""An experiment spec: a TOML file read with `tomllib` into typed dataclasses.

Every field is checked before anything starts. An unknown key, a wrong type or a value out
of range is reported with its dotted path (``conditions[2].strategy``) and what is allowed;
all problems of a file are listed at once. Every number must be finite (`inf` and `nan` are
refused: a window of `inf` seconds never ends), and repetitions are bounded (MAX_REPETITIONS).

```toml
name = "demo"
repetitions = 3            # reps per condition
order = "alternate"        # A B A B ... ("sequential": A A B B)
baseline = "gen-only"      # condition the deltas are computed against

[servers.gen]              # launcher, model and flags of each server
launcher = "builtin"
model = "tiny-moe"
[servers.embed]
model = "all-minilm-l6-v2"

[load]                     # as `coserve bench`
gen_concurrency = 8
embed_rate = 60            # embed requests/s, open loop; embed_concurrency caps them in flight
warmup_s = 1
duration_s = 3

[[conditions]]
name = "gen-only"
servers = ["gen"]
[[conditions]]
name = "timeslice"
strategy = "timeslice"

[sweep]                    # each point a condition: timeslice.embed-r30, timeslice.embed-r120
role = "embed"
rate = [30, 120]           # or concurrency = [...]
conditions = ["timeslice"]
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coserve.engine.types import EngineArgs
from coserve.gpu.strategy_base import STRATEGIES as _STRATEGIES
from coserve.gpu.strategy_base import TP_ALIASES
from coserve.launch_command import LAUNCHERS, ServerSpec
from coserve.roles import ROLES
from coserve.server.slo_guard import BUDGET_MAX_MS, BUDGET_MIN_MS
from coserve.spec_check import build_dataclass, checked_overrides
from coserve.spec_cosched import server_problems
from coserve.spec_load import LoadSpec, ReportSpec, SweepPoint, SweepSpec, load_problems, plain
from coserve.spec_load import spec_field as _f
from coserve.spec_tp import tp_problems

STRATEGIES = _STRATEGIES + TP_ALIASES
ORDERS = ("alternate", "sequential")
DEVICES = ("auto", "cpu", "cuda")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The built-in engine's defaults: a server setting a spec leaves out is the engine's.
_ENGINE = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
# Reps per condition: far more than any study needs, few enough that the schedule fits in memory.
MAX_REPETITIONS = 1000


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists each as 'dotted.path: what is wrong'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the spec:\n{lines}")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How one model server is launched (the `[servers.gen]` / `[servers.embed]` tables)."""

    launcher: str = _f("builtin", choices=LAUNCHERS, help="who serves the model")
    model: str = _f("", help="preset name or model directory (builtin/vllm)")
    url: str = _f("", help="base URL of an already running server (launcher = external)")
    random_weights: bool = _f(True, help="initialise the preset's weights at random")
    device: str = _f("auto", choices=DEVICES, help="builtin engine device; auto = cuda if present")
    gpu_memory_utilization: float = _f(_ENGINE["gpu_memory_utilization"], gt=0.0, le=1.0)
    max_model_len: int = _f(0, ge=0, help="0 = the model's own limit")
    max_num_seqs: int = _f(
        _ENGINE["max_num_seqs"], ge=1, help="sequences per step; for embed, inputs per forward"
    )
    max_num_batched_tokens: int | None = _f(
        None,
        ge=1,
        omit_default=True,
        help="tokens per step (embed: per forward); unset = the server's default",
    )
    slo_guard: bool = _f(
        False,
        omit_default=True,
        role="embed",
        help="throttle embed to hold gen's step time (an external embed server: "
        "one that runs its own guard, whose figures the run records)",
    )
    gen_tpot_slo_ms: float | None = _f(
        None,
        ge=BUDGET_MIN_MS,
        le=BUDGET_MAX_MS,
        omit_default=True,
        role="embed",
        help="the guard's budget in ms",
    )
    gen_tpot_slo_pct: float | None = _f(
        None,
        gt=0.0,  # 0 %: gen's own noise would pass for embed's cost, held at its floor throughout
        le=1000.0,
        omit_default=True,
        role="embed",
        help="the guard's budget: gen alone's step time plus this %",
    )
    enforce_eager: bool = _f(_ENGINE["enforce_eager"], help="no CUDA graphs")
    tensor_parallel_size: int = _f(_ENGINE["tensor_parallel_size"], ge=1)
    extra_args: list[str] = _f(
        [],
        help="added to the server command (launcher command: the "
        "whole command line, with {host}, {port} and {python} filled in)",
    )
    docker_image: str = _f("", help="launcher vllm: run `vllm serve` in this image")
    ready_timeout_s: float = _f(600.0, gt=0.0, le=86400.0, help="how long to wait for /health")

    def server_spec(self, role: str, device: str | None, **decided: Any) -> ServerSpec:
        """The launch spec of this server as `role` on `device` (None: the server's own
        default). `decided` sets what the caller decides beyond the spec (tensor_parallel_size
        from a TP strategy, the guard's gen URL, host, launcher); unset engine settings (0,
        None) are left to the server's own defaults."""
        fields = dict(
            role=role,
            launcher=self.launcher,
            model=self.model,
            url=self.url or None,
            device=device,
            random_weights=self.random_weights,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len or None,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or None,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            extra_args=list(self.extra_args),
            docker_image=self.docker_image or None,
            gen_tpot_slo_ms=self.gen_tpot_slo_ms,
            gen_tpot_slo_pct=self.gen_tpot_slo_pct,
        )
        return ServerSpec(**{**fields, **decided})


@dataclass(frozen=True, kw_only=True)
class TelemetrySpec:
    enabled: bool = _f(True)
    interval_s: float = _f(1.0, gt=0.0)


@dataclass(frozen=True, kw_only=True)
class Condition:
    name: str = _f(pattern=NAME_RE, help="letters, digits, '.', '_' and '-'")
    strategy: str = _f("timeslice", choices=STRATEGIES, help="how the servers share the GPUs")
    servers: list[str] = _f(["gen", "embed"], choices=ROLES, min_items=1, unique=True)
    gpus: list[str] = _f(["0"], min_items=1, help="GPU indices or UUIDs the condition uses")
    enforce_eager: bool | None = _f(None, help="overrides both servers' enforce_eager")
    baseline: str = _f("", help="condition this one's deltas are against (default: the spec's)")
    description: str = _f("")
    options: dict[str, Any] = _f({}, help="strategy options, passed to the strategy")
    load: dict[str, Any] = _f({}, help="overrides of [load] fields")
    gen: dict[str, Any] = _f({}, help="overrides of [servers.gen] fields")
    embed: dict[str, Any] = _f({}, help="overrides of [servers.embed] fields")
    # Set for the points of a sweep: what the point changes on which base condition.
    sweep: SweepPoint | None = field(default=None, metadata={"internal": True})

    def server(self, spec: Spec, role: str) -> ServerConfig:
        """The server config this condition runs `role` with (spec's, then overrides)."""
        cfg = dataclasses.replace(spec.servers[role], **getattr(self, role))
        if self.enforce_eager is not None:
            cfg = dataclasses.replace(cfg, enforce_eager=self.enforce_eager)
        return cfg

    def load_for(self, spec: Spec) -> LoadSpec:
        return dataclasses.replace(spec.load, **self.load)

    def baseline_name(self, spec: Spec) -> str:
        return self.baseline or spec.baseline


@dataclass(frozen=True, kw_only=True)
class Spec:
    name: str = _f(pattern=NAME_RE, help="letters, digits, '.', '_' and '-'")
    description: str = _f("")
    repetitions: int = _f(3, ge=1, le=MAX_REPETITIONS)
    order: str = _f("alternate", choices=ORDERS)
    seed: int = _f(0, ge=0)
    baseline: str = _f("", help="condition deltas are computed against (default: the first)")
    servers: dict[str, ServerConfig] = _f({})
    load: LoadSpec = _f(LoadSpec())
    telemetry: TelemetrySpec = _f(TelemetrySpec())
    conditions: list[Condition] = _f(min_items=1)
    sweep: SweepSpec | None = _f(None)
    report: ReportSpec = _f(ReportSpec(), omit_default=True)
    source: str = field(default="", metadata={"internal": True}, compare=False)

    def condition(self, name: str) -> Condition:
        for c in self.all_conditions():
            if c.name == name:
                return c
        raise KeyError(name)

    def sweep_conditions(self) -> list[Condition]:
        """One condition per (swept condition, value): `base.role-cN` for a concurrency,
        `base.role-rR` for a request rate (R in requests/s)."""
        if self.sweep is None:
            return []
        out = []
        for base_name in self.sweep.conditions or [self.baseline]:
            base = next(c for c in self.conditions if c.name == base_name)
            for v in self.sweep.values:
                pt = self.sweep.point(base.name, v)
                out.append(
                    dataclasses.replace(
                        base,
                        name=self.sweep.point_name(base.name, v),
                        load={**base.load, pt.load_key(): v},
                        sweep=pt,
                        description=f"{base.name} with {pt.label()}",
                    )
                )
        return out

    def all_conditions(self) -> list[Condition]:
        return [*self.conditions, *self.sweep_conditions()]

    def reps_of(self, condition: Condition) -> int:
        if condition.sweep is not None and self.sweep is not None:
            return self.sweep.repetitions
        return self.repetitions

    def schedule(self, only: list[str] | None = None) -> list[tuple[Condition, int]]:
        """(condition, rep) in run order: the matrix first, then the sweep; `order` within each."""
        out: list[tuple[Condition, int]] = []
        for group in (self.conditions, self.sweep_conditions()):
            group = [c for c in group if only is None or c.name in only]
            if self.order == "sequential":
                out += [(c, r) for c in group for r in range(1, self.reps_of(c) + 1)]
            else:
                most = max((self.reps_of(c) for c in group), default=0)
                out += [(c, r) for r in range(1, most + 1) for c in group if r <= self.reps_of(c)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The validated spec as plain TOML-able data (None left out); `parse_spec` reads it
        back."""
        return _drop_none(plain(self))

    def digest(self) -> str:
        """sha256 of the validated spec (defaults filled in, but fields added later left out at
        their defaults: see `spec_field`), independent of layout and comments."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


def _check_strategy(cond: Condition, path: str, errors: list[str]) -> None:
    """Let the strategy check its options and GPUs (it only validates; nothing starts)."""
    from coserve.gpu.strategies import StrategyError, make_strategy

    try:
        make_strategy(cond.strategy, list(cond.gpus), dict(cond.options), Path("."))
    except StrategyError as e:
        if e.option in cond.options:
            role = f".{e.role}" if e.role and isinstance(cond.options[e.option], dict) else ""
            errors.append(f"{path}.options.{e.option}{role}: {e.detail}")
        elif e.about_options:
            errors.append(f"{path}.options: {e}")
        else:
            errors.append(f"{path}.strategy: {e}")


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> Spec:
    errors: list[str] = []
    raw = dict(data)
    servers_raw = raw.pop("servers", {})
    conds_raw = raw.pop("conditions", None)
    sweep_raw = raw.pop("sweep", None)

    # Servers: a table of roles, each a ServerConfig.
    servers: dict[str, ServerConfig] = {}
    if not isinstance(servers_raw, dict):
        errors.append(f"servers: {servers_raw!r} is not a table (allowed keys: {', '.join(ROLES)})")
        servers_raw = {}
    declared = [r for r in servers_raw if r in ROLES]
    for role, table in servers_raw.items():
        if role not in ROLES:
            errors.append(f"servers.{role}: unknown server (allowed: {', '.join(ROLES)})")
            continue
        cfg = build_dataclass(ServerConfig, table, f"servers.{role}", errors)
        if cfg is not None:
            servers[role] = cfg
            if cfg.launcher == "external" and not cfg.url:
                errors.append(f"servers.{role}.url: needed when launcher = 'external'")
            if cfg.launcher in ("builtin", "vllm") and not cfg.model:
                errors.append(f"servers.{role}.model: needed for launcher '{cfg.launcher}'")
            if cfg.launcher == "command" and not cfg.extra_args:
                errors.append(
                    f"servers.{role}.extra_args: launcher 'command' needs the command line here"
                )
            if cfg.docker_image and cfg.launcher != "vllm":
                errors.append(f"servers.{role}.docker_image: only for launcher 'vllm'")

    # Conditions: each with its overrides checked field by field.
    conditions: list[Condition] = []
    if conds_raw is None:
        errors.append("conditions: missing (at least one [[conditions]] table is needed)")
    elif not isinstance(conds_raw, list) or not conds_raw:
        errors.append("conditions: needs at least one [[conditions]] table")
    else:
        for i, table in enumerate(conds_raw):
            path = f"conditions[{i}]"
            if not isinstance(table, dict):
                errors.append(f"{path}: {table!r} is not a table")
                continue
            table = dict(table)
            overrides = {}
            known = len(errors)
            for key, cls in (("load", LoadSpec), ("gen", ServerConfig), ("embed", ServerConfig)):
                if key in table:
                    overrides[key] = checked_overrides(cls, table.pop(key), f"{path}.{key}", errors)
            overrides_valid = len(errors) == known
            cond = build_dataclass(Condition, table, path, errors)
            if cond is None:
                continue
            cond = dataclasses.replace(cond, **overrides)
            for role in dict.fromkeys(cond.servers):
                if role not in declared:
                    errors.append(f"{path}.servers: runs '{role}' but there is no [servers.{role}]")
            _check_strategy(cond, path, errors)
            if overrides_valid:  # a refused override is left out: checking without it misleads
                errors += server_problems(cond, servers, path) + tp_problems(cond, servers, path)
            for role in ROLES:
                if getattr(cond, role) and role not in cond.servers:
                    errors.append(f"{path}.{role}: overrides a server this condition does not run")
            conditions.append(cond)
    names = [c.name for c in conditions]
    for i, n in enumerate(names):
        if n in names[:i]:
            errors.append(f"conditions[{i}].name: '{n}' is used twice")
    by_name = {c.name: c for c in conditions}

    # The top-level scalars and tables.
    if "name" not in raw:
        errors.append("name: missing (a string is needed: letters, digits, '.', '_' and '-')")
    spec_values = build_dataclass(Spec, raw, "", errors, partial=True)
    spec_values = {k: v for k, v in spec_values.items() if v is not None}

    baseline = spec_values.get("baseline", "")
    if baseline and names and baseline not in names:
        errors.append(f"baseline: '{baseline}' is not a condition (conditions: {', '.join(names)})")
    if not baseline and conditions:
        gen_conds = [c.name for c in conditions if "gen" in c.servers]
        spec_values["baseline"] = (gen_conds or names)[0]
    for i, c in enumerate(conditions):
        if c.baseline and c.baseline not in names:
            errors.append(
                f"conditions[{i}].baseline: '{c.baseline}' is not a condition "
                f"(conditions: {', '.join(names)})"
            )
    errors += load_problems(spec_values.get("load", LoadSpec()), [c.load for c in conditions])

    sweep = None
    if sweep_raw is not None:
        sweep = build_dataclass(SweepSpec, sweep_raw, "sweep", errors)
        if sweep is not None and None in sweep.concurrency + sweep.rate:
            sweep = None  # a bad value, already reported
    if sweep is not None and sweep.repetitions > MAX_REPETITIONS:
        errors.append(f"sweep.repetitions: {sweep.repetitions} must be at most {MAX_REPETITIONS}")
        sweep = None
    if sweep is not None:
        errors += sweep.problems(sweep_raw)
        for j, n in enumerate(sweep.conditions):
            if n not in by_name:
                errors.append(
                    f"sweep.conditions[{j}]: '{n}' is not a condition "
                    f"(conditions: {', '.join(names)})"
                )
            elif sweep.role not in by_name[n].servers:
                errors.append(f"sweep.conditions[{j}]: '{n}' does not run {sweep.role}")
        base = spec_values.get("baseline", "")
        if not sweep.conditions and base in by_name and sweep.role not in by_name[base].servers:
            errors.append(
                f"sweep.conditions: the baseline '{base}' does not run {sweep.role}; "
                f"name the conditions to sweep"
            )
        for b in sweep.conditions or [base]:
            for v in sweep.values:
                if sweep.point_name(b, v) in by_name:
                    errors.append(
                        f"sweep: its point '{sweep.point_name(b, v)}' has the name of a "
                        f"condition; rename that condition"
                    )
    if errors:
        raise SpecError(source, errors)
    return Spec(**spec_values, servers=servers, conditions=conditions, sweep=sweep, source=source)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises SpecError naming every bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(str(path), [f"cannot read the file: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [f"not UTF-8 text (byte {e.start})"]) from e
    return loads_spec(text, str(path))


def loads_spec(text: str, source: str = "<spec>") -> Spec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(source, [f"not valid TOML: {e}"]) from e
    return parse_spec(data, source)
