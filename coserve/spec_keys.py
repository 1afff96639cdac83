"""Every key a spec TOML may hold, with its default and meaning: `coserve run --spec-keys`.

Written from the spec's own dataclasses (their `spec_field` metadata: help, choices, bounds),
so the list cannot drift from what `coserve run` accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from coserve.engine.presets import PRESETS
from coserve.gpu.strategy_base import OPTIONS, TP_ALIASES
from coserve.spec import Condition, ServerConfig, Spec, TelemetrySpec
from coserve.spec_load import LoadSpec, ReportSpec, SweepSpec

_SUB_TABLES = {"servers", "load", "telemetry", "conditions", "sweep", "report"}


@dataclass(frozen=True)
class KeyTable:
    """One table of the listing: its TOML name and the dataclass its keys are the fields of;
    for a server table, `role` keeps the fields of that role alone (their `role` metadata),
    None the fields every server takes."""

    title: str
    cls: type
    role: str | None = None

    def fields(self) -> list[dataclasses.Field]:
        """The keys listed: internal fields, the top level's sub-tables and the fields of
        another role (or, for role None, of any one role) left out."""
        return [
            f
            for f in dataclasses.fields(self.cls)
            if not f.metadata.get("internal")
            and not (self.cls is Spec and f.name in _SUB_TABLES)
            and f.metadata.get("role") == self.role
        ]


# Spec's own table is the top level, without its sub-tables
TABLES: tuple[KeyTable, ...] = (
    KeyTable("(top level)", Spec),
    KeyTable("[servers.gen] / [servers.embed]", ServerConfig),
    KeyTable("[servers.embed] only (or a condition's `embed = {...}`)", ServerConfig, "embed"),
    KeyTable("[load]", LoadSpec),
    KeyTable("[[conditions]]", Condition),
    KeyTable("[sweep]", SweepSpec),
    KeyTable("[telemetry]", TelemetrySpec),
    KeyTable("[report]", ReportSpec),
)
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


def key_lines(table: KeyTable) -> list[str]:
    """The table's name, then one line per key: `  name = default  (rule)  help`."""
    out = [table.title]
    for f in table.fields():
        rule = _rule(table.cls, f)
        text = "  ".join(x for x in (f"({rule})" if rule else "", f.metadata.get("help", "")) if x)
        out.append(f"  {f.name} = {_default(f)}" + (f"  {text}" if text else ""))
    return out


def option_lines() -> list[str]:
    """A condition's `options` table: the keys each strategy takes (the strategy refuses any
    other), one line per strategy."""
    out = [
        "[[conditions]] options = {...}: the keys each strategy takes (a per-server one: one",
        "value for both servers, or {gen = ..., embed = ...}); see coserve/gpu/strategies.py",
    ]
    for name, keys in OPTIONS.items():
        aliases = [a for a in TP_ALIASES if a.startswith(f"{name}+")]
        label = f"{name} ({', '.join(aliases)})" if aliases else name
        out.append(f"  {label}: {', '.join(sorted(keys)) or 'none'}")
    return out


def reference() -> str:
    """The whole key list, table by table, with a line on how conditions override."""
    lines = [
        "Spec keys (TOML), table by table: key = default  (allowed values)  meaning.",
        "A condition overrides [load] with `load = {...}` and a server with `gen = {...}` or",
        "`embed = {...}`; a bad key or value is refused with its path. Examples: experiments/.",
        "",
    ]
    for table in TABLES:
        lines += [*key_lines(table), ""]
        if table.cls is Condition:
            lines += [*option_lines(), ""]
    return "\n".join(lines).rstrip() + "\n"
