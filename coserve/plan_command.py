"""`coserve plan`'s command line: flags, the plan from a spec and flags (plan.py computes it),
and its table; `--fleet` is handed to fleet_command.py."""

from __future__ import annotations

import argparse
import json

from coserve import fleet_command
from coserve.bench.config import MAX_CONCURRENCY, MAX_LEN
from coserve.engine.presets import PRESETS
from coserve.experiment.preflight import on_cpu
from coserve.model_size import DTYPE_BYTES, ModelSize, engine_dtype, model_size
from coserve.plan import (
    CPU_KV_CACHE_BYTES,
    ENGINE_MAX_NUM_SEQS,
    GPUS,
    MEASURED_MODEL,
    MEASURED_NON_TORCH_BYTES,
    MEASURED_PEAK_TORCH_BYTES,
    GiB,
    Gpu,
    MiB,
    Plan,
    budget_rows,
    gib,
    lines,
    sweep_rows,
)
from coserve.term import stdout_console

BLOCK_SIZE = 16  # the engine's (engine/ranks.py, not imported here: it loads torch)


def _length(text: str) -> int:
    """A request length in tokens: bench's and the spec's bound (a length of 1e20 was planned
    as needing a gpu_memory_utilization of 6.5e13)."""
    from coserve.server.serve_flags import number

    return number(int, text, f"an integer from 1 to {MAX_LEN:,}", lambda v: 1 <= v <= MAX_LEN)


def _concurrencies(text: str) -> list[int]:
    """ "256,512,1024" -> [256, 512, 1024]: at least one, each a positive integer no larger
    than the bench drives (a larger one was planned: '1e20 needs ...% of the KV cache')."""
    from coserve.server.serve_flags import number

    what = f"an integer in [1, {MAX_CONCURRENCY:,}]"
    values = [
        number(int, x.strip(), what, lambda c: 1 <= c <= MAX_CONCURRENCY)
        for x in text.split(",")
        if x.strip()
    ]
    if not values:
        raise argparse.ArgumentTypeError(f"no concurrency given in {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coserve.server.serve_flags import (
        fraction,
        non_negative_float,
        parse_bytes,
        positive_float,
        positive_int,
    )

    parser.add_argument(
        "--spec", metavar="SPEC.toml", help="take models, fractions, lengths and sweep from a spec"
    )
    parser.add_argument(
        "--gen",
        default=None,
        metavar="MODEL",
        help="gen preset or model dir (default qwen3-30b-a3b)",
    )
    parser.add_argument(
        "--embed",
        default=None,
        metavar="MODEL",
        help="embed preset or model dir (default qwen3-embedding-8b; 'none' for gen alone)",
    )
    parser.add_argument(
        "--gpu", default=None, help=f"{', '.join(GPUS)} (default: this machine's GPU, else h200)"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=positive_float,
        default=None,
        help="GPU memory in GiB (overrides --gpu's)",
    )
    parser.add_argument(
        "--gen-util", type=fraction, default=None, help="gen gpu_memory_utilization (default 0.50)"
    )
    parser.add_argument(
        "--embed-util",
        type=fraction,
        default=None,
        help="embed gpu_memory_utilization (default 0.30)",
    )
    parser.add_argument(
        "--input-len",
        type=_length,
        default=None,
        help=f"prompt tokens, 1 to {MAX_LEN:,} (default 30)",
    )
    parser.add_argument(
        "--output-len",
        type=_length,
        default=None,
        help=f"output tokens, 1 to {MAX_LEN:,} (default 512)",
    )
    parser.add_argument(
        "--concurrency",
        type=_concurrencies,
        default=None,
        help=f"C values to check, each 1 to {MAX_CONCURRENCY:,}, e.g. 256,512,1024 (default 512)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=None,
        help=f"gen max_num_seqs (default {ENGINE_MAX_NUM_SEQS}, the engine's)",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=None,  # None until given: --fleet refuses it
        help=f"KV block size in tokens (the engine's: {BLOCK_SIZE})",
    )
    parser.add_argument(
        "--reserve-gib",
        type=non_negative_float,
        default=None,
        help="gen memory besides weights and KV cache: profiling-pass activations + outside torch "
        f"(default: what the engine measured for {MEASURED_MODEL} on an H200)",
    )
    parser.add_argument(
        "--kv-cache-bytes",
        type=parse_bytes,
        default=None,
        metavar="BYTES",
        help="plan a CPU server: its KV cache is this budget (serve's --kv-cache-bytes)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default=None,
        help="weights and KV dtype (default as the engine: float32 on CPU, else bfloat16)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    fleet_command.add_arguments(parser)


def _local_gpu() -> Gpu | None:
    from coserve.gpu import nvml as nv

    try:
        with nv.nvml_session() as lib:
            try:
                g = nv.gpu_info(lib, 0, with_mig_profiles=False)
            except lib.NVMLError:  # NVML loads but has no GPU 0: plan for the default GPU instead
                return None
    except nv.NvmlUnavailable:
        return None
    if not g.memory_mib:
        return None
    return Gpu(
        g.name, g.memory_mib * MiB, "NVML's total of this machine's GPU 0 (CUDA's is a little less)"
    )


def _reserve(
    gen: ModelSize, args: argparse.Namespace, kv_cache_bytes: int | None
) -> tuple[int, str]:
    if kv_cache_bytes is not None:
        return 0, "not counted: a CPU server's KV cache is a byte budget"
    if args.reserve_gib is not None:
        return int(args.reserve_gib * GiB), "--reserve-gib"
    measured = (
        MEASURED_PEAK_TORCH_BYTES
        - model_size(MEASURED_MODEL).weight_bytes
        + MEASURED_NON_TORCH_BYTES
    )
    if gen.name == MEASURED_MODEL:
        return measured, "measured by the engine on an H200"
    return measured, f"assumed: {MEASURED_MODEL}'s measured figure; give --reserve-gib"


def make_plan(args: argparse.Namespace) -> tuple[Plan, list[int]]:
    gen_model, embed_model = "qwen3-30b-a3b", "qwen3-embedding-8b"
    gen_util, embed_util, inp, outp, conc, sweep = 0.50, 0.30, 30, 512, [512], []
    mns = ENGINE_MAX_NUM_SEQS
    kv_cache_bytes, gen_cfg = args.kv_cache_bytes, None
    if args.spec:
        from coserve.spec import load_spec

        spec = load_spec(args.spec)
        g, e = spec.servers.get("gen"), spec.servers.get("embed")
        if g is None:
            raise ValueError(f"{args.spec} has no [servers.gen]: nothing to plan")
        gen_model, gen_util, mns = g.model, g.gpu_memory_utilization, g.max_num_seqs
        gen_cfg = g
        embed_model, embed_util = (e.model, e.gpu_memory_utilization) if e else ("none", 0.0)
        inp, outp, conc = spec.load.input_len, spec.load.output_len, [spec.load.gen_concurrency]
        if spec.sweep is not None and spec.sweep.role == "gen":
            sweep = list(spec.sweep.concurrency)
    gen_model = args.gen or gen_model
    embed_model = args.embed or embed_model
    gen_util = args.gen_util if args.gen_util is not None else gen_util
    embed_util = args.embed_util if args.embed_util is not None else embed_util
    inp = args.input_len or inp
    outp = args.output_len or outp
    mns = args.max_num_seqs or mns
    conc = args.concurrency or conc
    if args.gpu:
        key = args.gpu.lower()
        if key not in GPUS:
            raise ValueError(
                f"--gpu {args.gpu}: expected one of {', '.join(GPUS)} (or --gpu-memory-gib)"
            )
        gpu = GPUS[key]
    else:
        local = _local_gpu()
        # The spec's gen server on a CPU (said, or `auto` where there is no GPU): its KV cache
        # is the engine's CPU byte budget, not a fraction of some GPU's memory.
        cpu = gen_cfg is not None and on_cpu(gen_cfg, have_gpus=local is not None)
        if cpu and kv_cache_bytes is None and not args.gpu_memory_gib:
            kv_cache_bytes = CPU_KV_CACHE_BYTES
        gpu = local or GPUS["h200"]
    if args.gpu_memory_gib:
        gpu = Gpu(
            f"{args.gpu_memory_gib:g} GiB GPU", int(args.gpu_memory_gib * GiB), "--gpu-memory-gib"
        )
    for role, name, task in (("gen", gen_model, "generate"), ("embed", embed_model, "embed")):
        if (preset := PRESETS.get(name)) is not None and preset.task != task:
            # the budget came out with no KV cache and advice no fraction could meet
            kind = {"generate": "a generative", "embed": "an embedding"}
            which = f"--{role}" if getattr(args, role) else f"the spec's servers.{role}.model"
            raise ValueError(f"{which} {name!r} is {kind[preset.task]} model, not {kind[task]} one")
    cpu_server = kv_cache_bytes is not None  # the CPU engine keeps no FP8: it dequantises
    dtype = engine_dtype(args.dtype, cpu_server)
    embed = (
        None
        if embed_model in ("none", "", None)
        else model_size(embed_model, DTYPE_BYTES[dtype], embedding=True, dequantised=cpu_server)
    )
    gen = model_size(gen_model, DTYPE_BYTES[dtype], dequantised=cpu_server)
    if not gen.kv_bytes_per_token:
        raise ValueError(
            f"gen model {gen_model!r} is an encoder: it has no KV cache, it can only embed"
        )
    reserve, source = _reserve(gen, args, kv_cache_bytes)
    plan = Plan(
        gpu,
        gen,
        embed,
        gen_util,
        embed_util,
        reserve,
        source,
        inp,
        outp,
        args.block_size or BLOCK_SIZE,
        mns,
        conc,
        kv_cache_bytes,
    )
    return plan, sweep


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    if (code := fleet_command.dispatch(args)) is not None:
        return code
    console = stdout_console()
    try:
        plan, sweep = make_plan(args)
    except (ValueError, OSError) as e:
        console.print(f"[red]plan:[/red] {e}")
        return 2
    if args.json:
        d = plan.to_dict()
        d["sweep"] = {
            str(c): {"tokens_needed": plan.tokens_needed(c), "fits": plan.fits(c)} for c in sweep
        }
        print(json.dumps(d, indent=2))
        return 0
    cpu = plan.cpu_kv_cache_bytes is not None
    t = Table(
        title="Memory of a CPU server (host RAM)"
        if cpu
        else f"VRAM budget on {plan.gpu.name}: {gib(plan.gpu.total_bytes)} ({plan.gpu.source})"
    )
    t.add_column("Component")
    t.add_column("RAM" if cpu else "VRAM", justify="right")
    for name, val in budget_rows(plan):
        t.add_row(name.replace("**", ""), val.replace("**", ""))
    console.print(t)
    for line in lines(plan):
        console.print(line, highlight=False)
    if sweep:
        s = Table(title="Concurrency sweep of the spec")
        for h in ("C", "KV tokens needed", "fits"):
            s.add_column(h, justify="right")
        for row in sweep_rows(plan, sweep):
            s.add_row(*row)
        console.print(s)
    return 1 if plan.problems() else 0
