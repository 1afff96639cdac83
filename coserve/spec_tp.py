"""Whether a condition's tensor-parallel degrees split its built-in models' attention heads:
the serve path refuses such a degree only when the server starts, which fails every rep of
the run; the spec check (and so `coserve run --dry-run`) refuses it up front, naming the
field that set the degree. Problems as 'dotted.path: what is wrong'."""

from __future__ import annotations

from typing import Any

from coserve.engine.presets import preset_tp_problem
from coserve.spec_check import resolved_servers, server_field_path


def _tp_field(cond: Any, role: str, path: str) -> str:
    """The field a tp strategy took `role`'s degree from: options.{role}_tp, options.tp (per
    role), else the GPUs it was given (one rank per GPU)."""
    opts = cond.options
    if f"{role}_tp" in opts:
        return f"{path}.options.{role}_tp"
    if "tp" in opts:
        return f"{path}.options.tp" + (f".{role}" if isinstance(opts["tp"], dict) else "")
    if f"{role}_gpus" in opts:
        return f"{path}.options.{role}_gpus"
    return f"{path}.gpus"


def tp_problems(cond: Any, servers: dict[str, Any], path: str) -> list[str]:
    """Problems of `cond`'s TP degrees for its builtin servers of a built-in preset (`servers`
    the spec's ServerConfigs, `cond` a Condition whose strategy and overrides are checked)."""
    from coserve.gpu.strategies import StrategyError, make_strategy

    strategy = None
    if cond.strategy.startswith("tp"):  # the strategy holds the degree
        try:
            strategy = make_strategy(cond.strategy, list(cond.gpus), dict(cond.options), ".")
        except StrategyError:  # reported by the strategy check
            return []
    out = []
    for role, cfg in resolved_servers(cond, servers).items():
        if cfg.launcher != "builtin":
            continue
        if strategy is not None:
            n, where = strategy.tensor_parallel_size(role), _tp_field(cond, role, path)
        else:
            n = cfg.tensor_parallel_size
            where = server_field_path(cond, role, "tensor_parallel_size", path)
        problem = preset_tp_problem(cfg.model, n)
        if problem:
            out.append(f"{where}: {cfg.model}: {problem}")
    return out
