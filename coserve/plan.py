"""`coserve plan`: the VRAM budget of a co-location, the gen model's KV capacity in tokens,
and the largest concurrency that fits a workload without queuing (`--fleet`: fleet_command.py).

The KV capacity is computed as coserve's built-in engine sizes its cache, with the engine's own
functions (`engine.memory.kv_budget_bytes`, `engine.kv_cache.usable_blocks`): the gen server
may use `gpu_memory_utilization` of the device's total memory as CUDA reports it; the cache gets
what is left after the torch allocator's peak (weights + the activations of a profiling pass at
full batch) and the memory CUDA holds outside torch, in whole blocks, less one null block.
Weights are counted from the model's config (the engine's own byte count). The activation and
outside-torch figures cannot be derived from the config: the default is what the engine
measured for qwen3-30b-a3b on an H200 (results/nvidia-h200-2026-11-25/engine/serve_gen.log);
give `--reserve-gib` for another model or setting. vLLM sizes its cache its own way: for the
study's setting the plan shows the study's measured vLLM figure (~322K tokens) beside ours.

A closed loop of C requests of `input + output` tokens needs C x that (rounded up to KV
blocks) at its peak; if that exceeds the KV capacity, requests queue (or are preempted) and
throughput drops: the study's reason for C=512 over C=1024.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

from coserve import fleet_command
from coserve.engine.kv_cache import usable_blocks
from coserve.engine.memory import kv_budget_bytes
from coserve.engine.types import EngineArgs
from coserve.model_size import DTYPE_BYTES, ModelSize, model_size

ENGINE_MAX_NUM_SEQS: int = EngineArgs.__dataclass_fields__["max_num_seqs"].default

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int  # the device total gpu_memory_utilization is a fraction of
    source: str  # where that total comes from


# The engine takes its fraction of the total that cudaMemGetInfo reports, a little less than
# NVML's (H200: 139.80 GiB against NVML's 140.4). Where a CUDA figure was recorded it is used.
GPUS: dict[str, Gpu] = {
    "h200": Gpu("NVIDIA H200", int(139.80 * GiB), "CUDA's total, logged by the engine on an H200"),
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3",
        int(79.18 * GiB),
        "CUDA's total, from an out-of-memory message on an H100",
    ),
    "h100-nvl": Gpu("NVIDIA H100 NVL", 95830 * MiB, "NVML's total (CUDA's is a little less)"),
    "a100-80gb": Gpu("NVIDIA A100 80GB", 81920 * MiB, "NVML's total (CUDA's is a little less)"),
    "a100-40gb": Gpu("NVIDIA A100 40GB", 40960 * MiB, "NVML's total (CUDA's is a little less)"),
    "l40s": Gpu("NVIDIA L40S", 46068 * MiB, "NVML's total (CUDA's is a little less)"),
}

# Measured by the built-in engine, qwen3-30b-a3b at 0.50 of an H200, max_num_batched_tokens
# 8192 (results/nvidia-h200-2026-11-25/engine/serve_gen.log: "32.16 GiB peak torch (weights +
# activations), 0.16 GiB outside torch -> 37.57 GiB for the KV cache"; 410,400 tokens).
MEASURED_MODEL = "qwen3-30b-a3b"
MEASURED_PEAK_TORCH_BYTES = int(32.16 * GiB)
MEASURED_NON_TORCH_BYTES = int(0.16 * GiB)
MEASURED_KV_TOKENS = 410_400
# The study's vLLM 0.15.1 reported "~322K tokens" of KV cache for the same model at 0.50 of an H200.
STUDY_VLLM_KV_TOKENS = 322_000


@dataclass
class Plan:
    gpu: Gpu
    gen: ModelSize
    embed: ModelSize | None
    gen_util: float
    embed_util: float
    reserve_bytes: int  # gen besides weights and KV: profiling-pass activations + outside torch
    reserve_source: str
    input_len: int
    output_len: int
    block_size: int
    max_num_seqs: int
    concurrency: list[int]
    cpu_kv_cache_bytes: int | None = None  # a CPU server: its KV cache is this byte budget

    @property
    def kv_bytes(self) -> int:
        """What the engine hands its KV cache (0 when nothing is left)."""
        if self.cpu_kv_cache_bytes is not None:
            return self.cpu_kv_cache_bytes
        return max(
            0,
            kv_budget_bytes(
                self.gpu.total_bytes, self.gen_util, self.gen.weight_bytes + self.reserve_bytes, 0
            ),
        )

    @property
    def kv_tokens(self) -> int:
        """Capacity in tokens as the engine reports it: whole blocks, less the null block."""
        if not self.gen.kv_bytes_per_token:
            return 0
        return (
            max(0, usable_blocks(self.kv_bytes, self.gen.kv_bytes_per_token, self.block_size))
            * self.block_size
        )

    @property
    def tokens_per_request(self) -> int:
        return self.input_len + self.output_len

    @property
    def blocks_per_request(self) -> int:
        return math.ceil(self.tokens_per_request / self.block_size)

    def tokens_needed(self, c: int) -> int:
        return c * self.blocks_per_request * self.block_size

    @property
    def max_concurrency(self) -> int:
        """The largest C whose peak KV demand fits the cache (max_num_seqs not applied)."""
        return self.kv_tokens // (self.blocks_per_request * self.block_size)

    def fits(self, c: int) -> bool:
        return self.tokens_needed(c) <= self.kv_tokens

    def study_vllm_kv_tokens(self) -> int | None:
        """The study's measured vLLM capacity, where this plan is the study's setting."""
        study = (
            self.gen.name == MEASURED_MODEL
            and self.gen_util == 0.50
            and self.cpu_kv_cache_bytes is None
            and self.gpu == GPUS["h200"]
        )
        return STUDY_VLLM_KV_TOKENS if study else None

    def problems(self) -> list[str]:
        out = []
        if self.gen_util + (self.embed_util if self.embed else 0) > 1.0 + 1e-9:
            out.append(
                f"the fractions add up to {self.gen_util + self.embed_util:.2f} > 1: "
                f"the two servers cannot both reserve their share"
            )
        if self.kv_tokens < self.tokens_per_request:
            one_request = (
                (self.blocks_per_request + 1) * self.block_size * self.gen.kv_bytes_per_token
            )  # + null block
            need = self.gen.weight_bytes + self.reserve_bytes + one_request
            if self.cpu_kv_cache_bytes is not None:
                fix = "raise --kv-cache-bytes"
            else:
                min_util = math.ceil(need / self.gpu.total_bytes * 100) / 100
                fix = (
                    f"raise gpu_memory_utilization to at least {min_util:.2f} (lowering the "
                    "embed server's to make room), use a GPU with more memory, or a smaller "
                    "gen model"
                )
            out.append(
                f"KV capacity {self.kv_tokens:,} tokens holds not even one request of "
                f"{self.tokens_per_request} tokens: {fix}; or shorten the requests (input/output "
                "length)"
            )
        if self.embed and self.embed.weight_bytes > self.embed_util * self.gpu.total_bytes:
            out.append(
                "the embed model's weights do not fit its fraction: raise its "
                "gpu_memory_utilization"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "gpu_bytes": self.gpu.total_bytes,
            "gpu_bytes_source": self.gpu.source,
            "gen": {
                "model": self.gen.name,
                "params": self.gen.params,
                "weight_bytes": self.gen.weight_bytes,
                "kv_bytes_per_token": self.gen.kv_bytes_per_token,
                "util": self.gen_util,
            },
            "embed": None
            if self.embed is None
            else {
                "model": self.embed.name,
                "params": self.embed.params,
                "weight_bytes": self.embed.weight_bytes,
                "util": self.embed_util,
            },
            "reserve_bytes": self.reserve_bytes,
            "reserve_source": self.reserve_source,
            "kv_bytes": self.kv_bytes,
            "kv_tokens": self.kv_tokens,
            "study_vllm_kv_tokens": self.study_vllm_kv_tokens(),
            "tokens_per_request": self.tokens_per_request,
            "max_concurrency": self.max_concurrency,
            "max_num_seqs": self.max_num_seqs,
            "concurrency": {
                str(c): {"tokens_needed": self.tokens_needed(c), "fits": self.fits(c)}
                for c in self.concurrency
            },
            "problems": self.problems(),
        }


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def budget_rows(p: Plan) -> list[tuple[str, str]]:
    """(component, GiB) rows; the Total row is the sum of every row above it."""
    parts = [
        (
            f"gen {p.gen.name} weights ({p.gen.params / 1e9:.2f} B params; {p.gen.fmt})",
            p.gen.weight_bytes,
        ),
        (f"gen activations + outside torch ({p.reserve_source})", p.reserve_bytes),
        (
            "gen KV cache (--kv-cache-bytes)"
            if p.cpu_kv_cache_bytes is not None
            else f"gen KV cache (gpu_memory_utilization {p.gen_util:g})",
            p.kv_bytes,
        ),
    ]
    if p.embed is not None:
        parts.append(
            (
                f"embed {p.embed.name} weights ({p.embed.params / 1e9:.2f} B params; "
                f"{p.embed.fmt})",
                p.embed.weight_bytes,
            )
        )
    rows = [(name, gib(n)) for name, n in parts]
    rows.append(
        (
            "**Total (every row above)**",
            f"**{gib(sum(n for _, n in parts))} / {gib(p.gpu.total_bytes)}**",
        )
    )
    reserved = p.gen_util + (p.embed_util if p.embed else 0)
    rows.append(
        (
            "Reserved by the fractions "
            f"({p.gen_util:g}{f' + {p.embed_util:g}' if p.embed else ''})",
            f"{gib(reserved * p.gpu.total_bytes)} / {gib(p.gpu.total_bytes)}",
        )
    )
    return rows


def lines(p: Plan) -> list[str]:
    out = [
        f"KV capacity (coserve's engine): {p.kv_tokens:,} tokens ({p.gen.kv_bytes_per_token:,} "
        "B/token: "
        f"{p.gen.kv_text}; blocks of {p.block_size}, one kept as the null block)."
    ]
    if p.study_vllm_kv_tokens():
        out.append(
            f"vLLM at this setting: ~{p.study_vllm_kv_tokens():,} tokens (the study's measured "
            "value "
            f"for vLLM 0.15.1; vLLM sizes its cache its own way)."
        )
    out.append(
        f"Per request: {p.input_len} in + {p.output_len} out = {p.tokens_per_request} tokens "
        f"({p.blocks_per_request * p.block_size} in blocks of {p.block_size})."
    )
    for c in p.concurrency:
        need = p.tokens_needed(c)
        share = (
            f"{need / p.kv_tokens:.0%} of the KV cache" if p.kv_tokens else "there is no KV cache"
        )
        verdict = (
            "fits without queuing" if p.fits(c) else "does NOT fit: requests queue or are preempted"
        )
        out.append(f"C={c} needs {need:,} tokens ({share}): {verdict}.")
    cap = (
        f"; max_num_seqs {p.max_num_seqs} caps it at {min(p.max_num_seqs, p.max_concurrency)}"
        if p.max_num_seqs < p.max_concurrency
        else ""
    )
    out.append(f"Largest concurrency that fits without queuing: C={p.max_concurrency:,}{cap}.")
    return out + [f"Problem: {x}" for x in p.problems()]


def sweep_rows(p: Plan, values: list[int]) -> list[tuple[str, str, str]]:
    def verdict(c: int) -> str:
        if not p.fits(c):
            return "no: KV cache overflows, requests queue"
        if c > p.max_num_seqs:
            return f"no: above max_num_seqs {p.max_num_seqs}, requests queue"
        return "yes"

    return [(str(c), f"{p.tokens_needed(c):,}", verdict(c)) for c in values]


# ------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coserve.server.command import parse_bytes

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
        "--gpu-memory-gib", type=float, default=None, help="GPU memory in GiB (overrides --gpu's)"
    )
    parser.add_argument(
        "--gen-util", type=float, default=None, help="gen gpu_memory_utilization (default 0.50)"
    )
    parser.add_argument(
        "--embed-util", type=float, default=None, help="embed gpu_memory_utilization (default 0.30)"
    )
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 30)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (default 512)")
    parser.add_argument(
        "--concurrency", default=None, help="C values to check, e.g. 256,512,1024 (default 512)"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help=f"gen max_num_seqs (default {ENGINE_MAX_NUM_SEQS}, the engine's)",
    )
    parser.add_argument(
        "--block-size", type=int, default=16, help="KV block size in tokens (the engine's: 16)"
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
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


def _reserve(gen: ModelSize, args: argparse.Namespace) -> tuple[int, str]:
    if args.kv_cache_bytes is not None:
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
    if args.spec:
        from coserve.spec import load_spec

        spec = load_spec(args.spec)
        g, e = spec.servers.get("gen"), spec.servers.get("embed")
        if g is None:
            raise ValueError(f"{args.spec} has no [servers.gen]: nothing to plan")
        gen_model, gen_util, mns = g.model, g.gpu_memory_utilization, g.max_num_seqs
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
    if args.concurrency:
        conc = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    if args.gpu:
        key = args.gpu.lower()
        if key not in GPUS:
            raise ValueError(
                f"--gpu {args.gpu}: expected one of {', '.join(GPUS)} (or --gpu-memory-gib)"
            )
        gpu = GPUS[key]
    else:
        gpu = _local_gpu() or GPUS["h200"]
    if args.gpu_memory_gib:
        gpu = Gpu(
            f"{args.gpu_memory_gib:g} GiB GPU", int(args.gpu_memory_gib * GiB), "--gpu-memory-gib"
        )
    dtype = args.dtype or ("float32" if args.kv_cache_bytes is not None else "bfloat16")
    embed = (
        None
        if embed_model in ("none", "", None)
        else model_size(embed_model, DTYPE_BYTES[dtype], embedding=True)
    )
    gen = model_size(gen_model, DTYPE_BYTES[dtype])
    reserve, source = _reserve(gen, args)
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
        args.block_size,
        mns,
        conc,
        args.kv_cache_bytes,
    )
    return plan, sweep


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if (code := fleet_command.dispatch(args)) is not None:
        return code
    console = Console()
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
    t = Table(
        title=f"VRAM budget on {plan.gpu.name}: {gib(plan.gpu.total_bytes)} ({plan.gpu.source})"
    )
    t.add_column("Component")
    t.add_column("VRAM", justify="right")
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
