"""`coserve plan`: the VRAM budget of a co-location, the gen model's KV capacity in tokens,
and the largest concurrency that fits a workload without queuing. The command line is
plan_command.py (`--fleet`: fleet_command.py).

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

import math
from dataclasses import dataclass
from typing import Any

from coserve.engine.types import EngineArgs
from coserve.model_size import ModelSize

ENGINE_MAX_NUM_SEQS: int = EngineArgs.__dataclass_fields__["max_num_seqs"].default
CPU_KV_CACHE_BYTES: int = EngineArgs.__dataclass_fields__["cpu_kv_cache_bytes"].default

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
        # engine.memory imports torch; this module must not: cli.py builds every command's
        # parser from it, `coserve serve` too (torch at import added seconds to each start)
        from coserve.engine.memory import kv_budget_bytes

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
        from coserve.engine.kv_cache import usable_blocks  # torch: see kv_bytes

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


def params_text(n: int) -> str:
    """A parameter count in B, M or K, with three significant figures at least: 30.53 B,
    22.7 M, 414 K (a tiny test model printed as "0.00 B")."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if v < 100 else f"{v:,.0f} {unit}"
    return f"{n:,}"


def budget_rows(p: Plan) -> list[tuple[str, str]]:
    """(component, GiB) rows; the Total row is the sum of every row above it."""
    parts = [
        (
            f"gen {p.gen.name} weights ({params_text(p.gen.params)} params; {p.gen.fmt})",
            p.gen.weight_bytes,
        ),
        (f"gen activations + outside torch ({p.reserve_source})", p.reserve_bytes),
        (
            "gen KV cache (a CPU server's byte budget, --kv-cache-bytes)"
            if p.cpu_kv_cache_bytes is not None
            else f"gen KV cache (gpu_memory_utilization {p.gen_util:g})",
            p.kv_bytes,
        ),
    ]
    if p.embed is not None:
        parts.append(
            (
                f"embed {p.embed.name} weights ({params_text(p.embed.params)} params; "
                f"{p.embed.fmt})",
                p.embed.weight_bytes,
            )
        )
    rows = [(name, gib(n)) for name, n in parts]
    if p.cpu_kv_cache_bytes is not None:  # host memory: no GPU total, no fractions of one
        rows.append(("**Total (every row above)**", f"**{gib(sum(n for _, n in parts))}**"))
        return rows
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
        if not p.fits(c):
            verdict = "does NOT fit: requests queue or are preempted"
        elif c > p.max_num_seqs:
            verdict = (
                f"its KV fits, but max_num_seqs {p.max_num_seqs} runs {p.max_num_seqs} at once "
                f"and {c - p.max_num_seqs:,} queue"
            )
        else:
            verdict = "fits without queuing"
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
