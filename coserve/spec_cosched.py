"""Checks of the server configs a condition resolves to (its servers' URLs, and the levers
for co-scheduling: embed granularity, the SLO guard): problems as 'dotted.path: what is
wrong'."""

from __future__ import annotations

import dataclasses
from typing import Any

from coserve.bench.config import url_problem
from coserve.spec_check import resolved_servers, server_field_path

# Embed launchers whose server may run a guard of its own (started by its command line, as
# `coserve serve colocated --slo-guard-gen-url` does): with slo_guard = true the run records
# its state and trace, as it does for a guard it starts.
SELF_GUARDED = ("external",)


def server_problems(cond: Any, servers: dict[str, Any], path: str) -> list[str]:
    """Problems of `cond`'s resolved server configs (`servers` are the spec's, `cond` a
    Condition whose overrides are checked field by field already)."""
    out: list[str] = []
    resolved = resolved_servers(cond, servers)

    def where(role: str, name: str) -> str:
        return server_field_path(cond, role, name, path)

    for role, cfg in resolved.items():
        if cfg.url and (why := url_problem(cfg.url)):
            out.append(f"{where(role, 'url')}: {why}")
        tokens = cfg.max_num_batched_tokens
        if role == "embed" and tokens and cfg.launcher == "builtin" and cfg.max_model_len > tokens:
            out.append(
                f"{where(role, 'max_num_batched_tokens')}: {tokens} is less than max_model_len "
                f"({cfg.max_model_len}); the embed engine takes a whole input per forward"
            )
        budget = [n for n in ("gen_tpot_slo_ms", "gen_tpot_slo_pct") if getattr(cfg, n) is not None]
        if role != "embed":
            out += [
                f"{where(role, f.name)}: the SLO guard runs in the embed server; set it under embed"
                for f in dataclasses.fields(cfg)
                if f.metadata.get("role") not in (None, role) and getattr(cfg, f.name) != f.default
            ]
            continue
        if not cfg.slo_guard:
            out += [f"{where(role, n)}: only with slo_guard = true" for n in budget]
            continue
        if cfg.launcher in SELF_GUARDED:
            # its own command line (`coserve serve colocated --slo-guard-gen-url ...`) starts
            # the guard; the run only records it
            out += [
                f"{where(role, n)}: an {cfg.launcher} embed server's guard takes its budget "
                "from that server's own command line"
                for n in budget
            ]
            continue
        if len(budget) != 1:
            out.append(
                f"{where(role, 'slo_guard')}: needs exactly one of gen_tpot_slo_ms and "
                "gen_tpot_slo_pct"
            )
        if cfg.launcher != "builtin":
            out.append(
                f"{where(role, 'slo_guard')}: coserve starts the guard in a builtin embed "
                f"server, or records the guard of an {' or '.join(SELF_GUARDED)} one "
                f"(launcher is {cfg.launcher!r})"
            )
        gen = resolved.get("gen")
        if "gen" not in cond.servers:
            out.append(f"{where(role, 'slo_guard')}: the condition runs no gen server to guard")
        # gen None: [servers.gen] is missing or invalid, an error of its own (the root cause)
        elif gen is not None and gen.launcher != "builtin":
            out.append(
                f"{where(role, 'slo_guard')}: the guard reads the builtin gen server's step "
                f"times; gen's launcher is {gen.launcher!r}"
            )
    return out
