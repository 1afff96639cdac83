"""The load side of a spec: `[load]` (LoadSpec), `[sweep]` (SweepSpec and its points) and
`[report]`, plus `spec_field`, the field helper every spec table is declared with.

LoadSpec is not declared field by field: it is `coserve.bench.config.LoadConfig` filtered
to the fields that shape a load (`LOAD_CHECKS`), with LoadConfig's types and defaults, so
each default is written once. A new LoadConfig field joins the spec by an entry here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from coserve.bench.arrivals import ARRIVALS, MAX_RATE, MIN_RATE
from coserve.bench.config import (
    GEN_ENDPOINTS,
    MAX_CONCURRENCY,
    MAX_EMBED_BATCH,
    MAX_LEN,
    MAX_SECONDS,
    WATCH_S,
    ConfigError,
    LoadConfig,
)
from coserve.reference import REFERENCES
from coserve.roles import ROLES


def spec_field(default: Any = dataclasses.MISSING, *, help: str = "", **checks: Any) -> Any:
    """A dataclass field with its checks (choices, ge, gt, le, pattern, min_items, unique) and
    help. `omit_default=True`: left out of `Spec.to_dict` (so of the digest) while at its
    default, for fields added after specs were hashed: an older run folder keeps its hash.
    `role="embed"`: a server field only that role's server may set (spec_cosched refuses it
    on the other, `--spec-keys` lists it under that role's table)."""
    meta = {"help": help, **checks}
    if isinstance(default, list | dict):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def plain(v: Any) -> Any:
    """asdict without internal fields, and without `omit_default` fields at their default."""
    if dataclasses.is_dataclass(v):
        out = {}
        for f in dataclasses.fields(v):
            x = getattr(v, f.name)
            if f.metadata.get("internal") or (
                f.metadata.get("omit_default")
                and x
                == (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
            ):
                continue
            out[f.name] = plain(x)
        return out
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return v


# LoadConfig field -> its checks in a spec. The open-loop fields came later (omit_default).
_LATER = {"omit_default": True}
LOAD_CHECKS: dict[str, dict[str, Any]] = {
    "gen_concurrency": {
        "ge": 1,
        "le": MAX_CONCURRENCY,
        "help": "gen requests in flight; with gen_rate the cap",
    },
    "input_len": {"ge": 1, "le": MAX_LEN},
    "output_len": {"ge": 1, "le": MAX_LEN},
    "embed_concurrency": {
        "ge": 1,
        "le": MAX_CONCURRENCY,
        "help": "embed requests in flight; with embed_rate the cap",
    },
    "embed_batch": {"ge": 1, "le": MAX_EMBED_BATCH, "help": "inputs per embed request"},
    "embed_input_len": {"ge": 1, "le": MAX_LEN},
    "embed_text": {"help": "send texts instead of token ids to the embed server"},
    "warmup_s": {"ge": 0.0, "le": MAX_SECONDS},
    "duration_s": {"gt": 0.0, "le": MAX_SECONDS},
    "gen_rate": {"gt": 0.0, "help": "gen requests/s, open loop (unset: closed loop)", **_LATER},
    "embed_rate": {"gt": 0.0, "help": "embed requests/s, open loop (unset: closed loop)", **_LATER},
    "arrival": {"choices": ARRIVALS, **_LATER},
    "burstiness": {"gt": 0.0, "help": "gamma shape of inter-arrivals; 1 = Poisson", **_LATER},
    "goodput_ttft_ms": {"gt": 0.0, **_LATER},
    "goodput_tpot_ms": {"gt": 0.0, **_LATER},
    "goodput_e2el_ms": {"gt": 0.0, **_LATER},
    "embed_slo_ms": {"gt": 0.0, "help": "embed request latency bound for embed goodput", **_LATER},
    "gen_endpoint": {"choices": GEN_ENDPOINTS, **_LATER},
    "stall_s": {
        "ge": WATCH_S,
        "le": MAX_SECONDS,
        "help": "seconds an endpoint with requests in flight may say nothing before the run "
        "ends as frozen",
        **_LATER,
    },
}


def _load_spec_class() -> type:
    hints = typing.get_type_hints(LoadConfig)
    fields = [
        (f.name, hints[f.name], spec_field(f.default, **LOAD_CHECKS[f.name]))
        for f in dataclasses.fields(LoadConfig)
        if f.name in LOAD_CHECKS
    ]
    missing = set(LOAD_CHECKS) - {name for name, _, _ in fields}
    if missing:  # pragma: no cover - a renamed LoadConfig field
        raise TypeError(f"LOAD_CHECKS names fields LoadConfig lacks: {sorted(missing)}")
    return dataclasses.make_dataclass(
        "LoadSpec",
        fields,
        frozen=True,
        kw_only=True,
        namespace={
            "__module__": __name__,
            "__doc__": "The load of a spec (`[load]`): LoadConfig's load-shape fields.",
        },
    )


LoadSpec = _load_spec_class()


def load_problem(load: LoadSpec) -> ConfigError | None:
    """What `LoadConfig.validate` finds wrong with `load` (the checks that span fields live
    there, once), or None. `.field` names the field."""
    # validate() wants an endpoint to drive; any URL does for checking the load's shape.
    url = "http://127.0.0.1:1"
    try:
        LoadConfig(**dataclasses.asdict(load), gen_url=url, embed_url=url).validate()
    except ConfigError as e:
        return e
    return None


def load_problems(load: LoadSpec, overrides: list[dict[str, Any]]) -> list[str]:
    """'path: what is wrong' for `[load]` and for each condition's `load` override (indexed as
    `conditions`), each reported at the table that set the field."""
    out = []
    if (problem := load_problem(load)) is not None:
        out.append(f"load.{problem}")
    for i, override in enumerate(overrides):
        problem = load_problem(dataclasses.replace(load, **override)) if override else None
        if problem is not None and problem.field in override:
            out.append(f"conditions[{i}].load.{problem}")
    return out


class SweepPoint(NamedTuple):
    """What a sweep point changes: `role`'s `knob` ("concurrency" | "rate") set to `value`,
    on top of condition `base`. As a list (rep records): [role, value, base, knob]."""

    role: str
    value: float
    base: str
    knob: str = "concurrency"

    def load_key(self) -> str:
        return f"{self.role}_{self.knob}"

    def label(self) -> str:
        """'embed rate 7.5 req/s' or 'embed C=16'."""
        if self.knob == "rate":
            return f"{self.role} rate {self.value:g} req/s"
        return f"{self.role} C={self.value:g}"


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep: each listed condition run once per concurrency, or once per request rate."""

    role: str = spec_field("gen", choices=ROLES, help="whose load is swept")
    concurrency: list[int] = spec_field(
        [],
        ge=1,
        le=MAX_CONCURRENCY,
        unique=True,
        omit_default=True,
        help="requests in flight, one point each",
    )
    rate: list[float] = spec_field(
        [],
        ge=MIN_RATE,
        le=MAX_RATE,
        unique=True,
        omit_default=True,
        help="requests/s (open loop), one point each",
    )
    conditions: list[str] = spec_field(
        [], unique=True, help="conditions to sweep (default: the baseline)"
    )
    repetitions: int = spec_field(1, ge=1)

    @property
    def knob(self) -> str:
        return "rate" if self.rate else "concurrency"

    @property
    def values(self) -> list[float]:
        return list(self.rate or self.concurrency)

    def point(self, base: str, value: float) -> SweepPoint:
        return SweepPoint(self.role, value, base, self.knob)

    def point_name(self, base: str, value: float) -> str:
        """`base.embed-c16` for a concurrency, `base.embed-r7.5` for a rate."""
        return f"{base}.{self.role}-{'r' if self.rate else 'c'}{value:g}"

    def problems(self, given: Collection[str] = ()) -> list[str]:
        """'field: what is wrong' for a sweep that gives neither or both of its lists;
        `given`: the keys the spec's [sweep] table has (an empty list given is named)."""
        if self.concurrency and self.rate:
            return ["sweep.rate: give concurrency = [...] or rate = [...], not both"]
        if not self.concurrency and not self.rate:
            empty = [k for k in ("rate", "concurrency") if k in given]
            if empty:
                return [f"sweep.{empty[0]}: empty (give at least one value)"]
            return ["sweep.concurrency: missing (give concurrency = [...] or rate = [...])"]
        return []


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    """`[report]`: how the report is drawn."""

    reference: str = spec_field(
        "none",
        choices=("none", *REFERENCES),
        help="published figures marked beside ours (seed: the study)",
    )
