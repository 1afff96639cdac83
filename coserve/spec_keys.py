"""Every key a spec TOML may hold, with its default and meaning: `coserve run --spec-keys`.

Written from the spec's own dataclasses (their `spec_field` metadata: help, choices, bounds),
so the list cannot drift from what `coserve run` accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from coserve.engine.presets import PRESETS
from coserve.spec import Condition, ServerConfig, Spec, TelemetrySpec
from coserve.spec_load import LoadSpec, ReportSpec, SweepSpec

# (TOML table, dataclass); Spec's own table is the top level, without its sub-tables
TABLES: tuple[tuple[str, type], ...] = (
    ("(top level)", Spec),
    ("[servers.gen] / [servers.embed]", ServerConfig),
    ("[load]", LoadSpec),
    ("[[conditions]]", Condition),
    ("[sweep]", SweepSpec),
    ("[telemetry]", TelemetrySpec),
    ("[report]", ReportSpec),
)
_SUB_TABLES = {"servers", "load", "telemetry", "conditions", "sweep", "report"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):  # TOML's spelling
        return str(value).lower()
    return repr(value).replace("'", '"')


def _rule(cls: type, f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = [f"{sign} {meta[k]:g}" for k, sign in _BOUNDS if k in meta]
    if "choices" in meta:
        listed = f.default_factory is not dataclasses.MISSING and isinstance(
            f.default_factory(), list
        )
        each = "each " if listed else ""  # a list's items
        parts.append(f"{each}one of " + ", ".join(str(c) for c in meta["choices"]))
    if cls is ServerConfig and f.name == "model":
        parts.append("presets: " + ", ".join(PRESETS))
    return "; ".join(parts)


def key_lines(table: str, cls: type) -> list[str]:
    """One line per key of `cls` (internal fields and, for the top level, its sub-tables left
    out): `  name = default  (rule)  help`."""
    out = [table]
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or (cls is Spec and f.name in _SUB_TABLES):
            continue
        rule = _rule(cls, f)
        text = "  ".join(x for x in (f"({rule})" if rule else "", f.metadata.get("help", "")) if x)
        out.append(f"  {f.name} = {_default(f)}" + (f"  {text}" if text else ""))
    return out


def reference() -> str:
    """The whole key list, table by table, with a line on how conditions override."""
    lines = [
        "Spec keys (TOML), table by table: key = default  (allowed values)  meaning.",
        "A condition overrides [load] with `load = {...}` and a server with `gen = {...}` or",
        "`embed = {...}`; a bad key or value is refused with its path. Examples: experiments/.",
        "",
    ]
    for table, cls in TABLES:
        lines += [*key_lines(table, cls), ""]
    return "\n".join(lines).rstrip() + "\n"
