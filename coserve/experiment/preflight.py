"""What a spec needs of this machine, checked before the first rep (and by `--dry-run`): a
CUDA device where the spec asks for one, GPU indices that exist, the built-in servers' models
(a preset of the role's task or a model directory here) and memory for their weights. Without
these checks every rep started, failed the same way, and the run reported N failures instead
of one reason."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coserve.memcheck import memory_need, ram_available
from coserve.spec import Condition, ServerConfig, Spec
from coserve.term import counted_names

# Strategies that only exist on NVIDIA GPUs (timeslice and exclusive also run on a CPU).
GPU_STRATEGIES = ("mps", "mig", "tp", "tp+timeslice", "tp+mps")


def gpu_ids(gpus: list[dict]) -> set[str]:
    """Every name a condition may give a GPU by: index, GPU UUID, MIG UUID."""
    out: set[str] = set()
    for g in gpus:
        out |= {str(g.get("index")), str(g.get("uuid"))}
        out |= {str(u) for u in g.get("mig_devices") or []}
    return out


def on_cpu(cfg: ServerConfig, have_gpus: bool) -> bool:
    """Whether the built-in engine would put `cfg` on a CPU: device "cpu", or "auto" on a
    machine without GPUs (`have_gpus`)."""
    return cfg.device == "cpu" or (cfg.device == "auto" and not have_gpus)


def cpu_roles(spec: Spec, cond: Condition, have_gpus: bool) -> list[str]:
    """The roles of `cond` whose built-in server runs on a CPU (`on_cpu`)."""
    cfgs = {role: cond.server(spec, role) for role in cond.servers}
    return [r for r, cfg in cfgs.items() if cfg.launcher == "builtin" and on_cpu(cfg, have_gpus)]


def model_problem(cond: Condition, role: str, cfg: ServerConfig) -> str | None:
    """Why the built-in server cannot load `cfg.model` as `role` of `cond`: neither a preset
    nor a directory with config.json here, or a preset of the other task; else None."""
    from coserve.engine.presets import PRESETS

    own = "model" in getattr(cond, role)
    where = f"{role}.model of the condition" if own else f"servers.{role}.model"
    preset = PRESETS.get(cfg.model)
    task = "generate" if role == "gen" else "embed"
    if preset is None and not (Path(cfg.model) / "config.json").is_file():
        return (
            f"{where}: {cfg.model!r} is neither a preset nor a directory with config.json "
            f"here (presets: {', '.join(n for n, p in PRESETS.items() if p.task == task)})"
        )
    if preset is not None and preset.task != task:
        kind = {"generate": "a generative", "embed": "an embedding"}
        return f"{where}: preset {cfg.model!r} is {kind[preset.task]} model, not {kind[task]} one"
    return None


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """`coserve serve`'s parser raising its error instead of exiting."""

    def error(self, message: str):
        raise _Refused(message)


def flags_problem(cond: Condition, role: str, cfg: ServerConfig, have_gpus: bool) -> str | None:
    """Why `coserve serve` would refuse the built-in server's extra_args (its parser, a flag
    meant for another kind of server, an all-reduce that would do nothing), else None: found
    once here, not by every rep's server exiting at start."""
    if not cfg.extra_args:
        return None
    from coserve.server import command
    from coserve.server.serve_flags import all_reduce_problem, misplaced

    parser = _Parser(prog="coserve serve")
    command.add_arguments(parser)
    parser.set_defaults(tensor_parallel_size=None)  # None: extra_args leave it to the spec
    own = "extra_args" in getattr(cond, role)
    where = f"{role}.extra_args of the condition" if own else f"servers.{role}.extra_args"
    device = "cpu" if on_cpu(cfg, have_gpus) else "cuda"
    try:
        args = parser.parse_args(
            [role, "--model", str(cfg.model), "--device", device, *cfg.extra_args]
        )
    except _Refused as e:
        return f"{where}: {e}"
    if args.tensor_parallel_size is not None:  # it would win over the spec's, unrecorded
        return (
            f"{where}: --tensor-parallel-size: set servers.{role}.tensor_parallel_size (or a tp "
            "strategy's options.tp) instead; the strategy's GPUs and the records follow that"
        )
    args.tensor_parallel_size = cfg.tensor_parallel_size
    tp = None if cond.strategy.startswith("tp") else args.tensor_parallel_size  # its strategy's
    why = misplaced(args, args.flag_kinds) or all_reduce_problem(args.tp_all_reduce, tp, device)
    return f"{where}: {why}" if why else None


def condition_problems(
    spec: Spec, cond: Condition, gpu_state: dict[str, Any], ram_bytes: int | None
) -> list[str]:
    """Why `cond` cannot run here, empty when nothing is known against it.
    `gpu_state` is `fingerprint.gpu_state()`; `ram_bytes` the RAM available (None: unknown)."""
    gpus = gpu_state.get("gpus") or []
    out = []
    builtin = {role: cond.server(spec, role) for role in cond.servers}
    builtin = {role: cfg for role, cfg in builtin.items() if cfg.launcher == "builtin"}
    out += [m for role, cfg in builtin.items() if (m := model_problem(cond, role, cfg))]
    out += [m for role, cfg in builtin.items() if (m := flags_problem(cond, role, cfg, bool(gpus)))]
    wants_cuda = [role for role, cfg in builtin.items() if cfg.device == "cuda"]
    if wants_cuda and not gpus:
        out.append(
            f"servers.{wants_cuda[0]}.device is 'cuda' but this machine has "
            f"no CUDA GPU ({gpu_state.get('note') or 'NVML lists none'}); use device = "
            f"'auto' or 'cpu'"
        )
    if not gpus and cond.strategy in GPU_STRATEGIES:
        out.append(
            f"strategy {cond.strategy!r} needs NVIDIA GPUs; this machine has "
            f"none ({gpu_state.get('note') or 'NVML lists none'})"
        )
    elif not gpus and list(cond.gpus) != ["0"]:
        out.append(
            f"gpus {list(cond.gpus)} name GPUs this machine does not have "
            f"({gpu_state.get('note') or 'NVML lists none'}); on a CPU-only machine leave "
            f"gpus out"
        )
    if gpus:
        known = gpu_ids(gpus)
        missing = [g for g in cond.gpus if g not in known]
        if missing:
            out.append(
                f"gpus {missing[0]!r} is not a GPU of this machine (GPUs: "
                f"{', '.join(str(g['index']) for g in gpus)}, or their UUIDs)"
            )
    on_cpu = {role: builtin[role] for role in cpu_roles(spec, cond, bool(gpus))}
    needs = [memory_need(cfg.model, "cpu", ram_bytes) for cfg in on_cpu.values()]
    needs = [n for n in needs if n is not None]
    if needs and sum(n.need_bytes for n in needs) > needs[0].free_bytes:
        if len(needs) == 1:
            out.append(f"{needs[0].problem()}")
        else:
            gib = sum(n.need_bytes for n in needs) / (1 << 30)
            out.append(
                f"its servers ({', '.join(n.model for n in needs)}) need at least "
                f"{gib:.1f} GiB for their weights, more than the "
                f"{needs[0].free_bytes / (1 << 30):.1f} GiB of RAM available"
            )
    by_index = {str(g["index"]): g for g in gpus}
    first = by_index.get(cond.gpus[0]) if cond.gpus else None
    if first and first.get("memory_mib"):
        for role, cfg in builtin.items():
            if role in on_cpu:
                continue
            budget = int(first["memory_mib"] * (1 << 20) * cfg.gpu_memory_utilization)
            need = memory_need(cfg.model, "cuda", budget, cfg.tensor_parallel_size)
            if need is not None and need.problem():
                out.append(
                    f"{need.problem()} (gpu_memory_utilization "
                    f"{cfg.gpu_memory_utilization:g} of GPU {first['index']})"
                )
    return out


def problems(spec: Spec, conditions: list[Condition], gpu_state: dict[str, Any]) -> list[str]:
    """Every problem once, as 'cond-a, cond-b: what' (the conditions it stops, in order)."""
    ram = ram_available()
    by_problem: dict[str, list[str]] = {}
    for cond in conditions:
        for what in condition_problems(spec, cond, gpu_state, ram):
            names = by_problem.setdefault(what, [])
            if cond.name not in names:
                names.append(cond.name)
    return [
        f"{counted_names(names, NAMED_CONDITIONS)}: {what}" for what, names in by_problem.items()
    ]


# Past this many, a problem's conditions are counted and the first few named: a spec of 70
# conditions refused on a machine without a GPU named 57 of them in one line.
NAMED_CONDITIONS = 6
