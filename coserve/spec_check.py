"""Checking a TOML table against a dataclass declared with `spec_field`: types, choices,
bounds, patterns and list sizes, every problem reported with its dotted path
(``conditions[2].gpus[0]``) into one list, so a spec file's problems are listed at once; and,
for the checks of a condition's servers, the configs it resolves to and where each field
came from."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:  # "a list of strings", not "a list of a strings"
        item = describe_type(typing.get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _toml(value: Any) -> str:
    """A value as the spec spells it: TOML's true/false (Python's repr said "True")."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _check_scalar(value: Any, tp: Any, meta: dict, path: str, errors: list[str]) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        # TOML integers are unbounded: one past float's range would overflow float().
        if ok and not (abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value)):
            errors.append(f"{path}: {value!r} is not a finite number")
            return None
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - schema error
        raise TypeError(tp)
    if not ok:
        errors.append(f"{path}: {_toml(value)} is not {describe_type(tp)}")
        return None
    if "choices" in meta and value not in meta["choices"]:
        errors.append(f"{path}: {value!r} is not one of {', '.join(meta['choices'])}")
        return None
    for key, test, words in (
        ("ge", lambda v, b: v >= b, "at least"),
        ("gt", lambda v, b: v > b, "greater than"),
        ("le", lambda v, b: v <= b, "at most"),
    ):
        if key in meta and not test(value, meta[key]):
            errors.append(f"{path}: {value!r} must be {words} {meta[key]}")
            return None
    if "pattern" in meta and not meta["pattern"].match(value):
        errors.append(f"{path}: {value!r} is not allowed ({meta.get('help') or 'bad name'})")
        return None
    return value


def _check(value: Any, tp: Any, meta: dict, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _check(value, inner, meta, path, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: {value!r} is not {describe_type(tp)}")
            return None
        if len(value) < meta.get("min_items", 0):
            errors.append(f"{path}: needs at least {meta['min_items']} item(s)")
            return None
        if path.endswith(".gpus"):  # GPU indices or UUIDs: both fine, kept as strings
            bad = [
                v
                for v in value
                if not isinstance(v, int | str)
                or isinstance(v, bool)
                or str(v).strip().startswith("-")
                or not str(v).strip()
            ]
            if bad:
                errors.append(f"{path}: {bad[0]!r} is not a GPU index (0, 1, ...) or UUID")
                return None
            return [str(v) for v in value]
        out = [_check(v, item_tp, meta, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        if meta.get("unique") and len(set(map(repr, out))) != len(out):
            errors.append(f"{path}: items repeat")
        return out
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, errors)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: {value!r} is not a table")
            return None
        return dict(value)
    return _check_scalar(value, tp, meta, path, errors)


def build_dataclass(
    cls: type, table: Any, path: str, errors: list[str], partial: bool = False
) -> Any:
    """Build dataclass `cls` from a TOML table, appending problems to `errors`; None when the
    table has a problem.
    With `partial`, missing fields are fine and a dict of the given (checked) values returns."""
    where = path or "the spec"
    if not isinstance(table, dict):
        errors.append(f"{where}: {table!r} is not a table")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in table:
        if key not in fields:
            near = ", ".join(sorted(fields))
            errors.append(f"{path + '.' if path else ''}{key}: unknown field (allowed: {near})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in table:
            if (
                not partial
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                errors.append(f"{sub}: missing ({describe_type(hints[name])} is needed)")
            continue
        values[name] = _check(table[name], hints[name], dict(f.metadata), sub, errors)
    if partial:
        return values
    if any(v is None and name in table for name, v in values.items()):
        return None
    try:
        return cls(**values)
    except TypeError:
        return None


def checked_overrides(cls: type, table: Any, path: str, errors: list[str]) -> dict[str, Any]:
    """The fields of `cls` a table overrides, each checked; bad ones are left out (and reported)."""
    values = build_dataclass(cls, table, path, errors, partial=True)
    return {k: v for k, v in (values or {}).items() if v is not None}


def resolved_servers(cond: Any, servers: dict[str, Any]) -> dict[str, Any]:
    """role -> the ServerConfig `cond` runs: the spec's `servers[role]` with the condition's
    overrides (`cond.gen`, `cond.embed`) applied; roles without a [servers.ROLE] left out."""
    return {
        role: dataclasses.replace(servers[role], **getattr(cond, role))
        for role in cond.servers
        if role in servers
    }


def server_field_path(cond: Any, role: str, name: str, path: str) -> str:
    """Where `cond` (at `path`, e.g. conditions[2]) took server field `name` of `role` from:
    its own override `PATH.ROLE.NAME`, else `servers.ROLE.NAME (in PATH)`."""
    if name in getattr(cond, role):
        return f"{path}.{role}.{name}"
    return f"servers.{role}.{name} (in {path})"
