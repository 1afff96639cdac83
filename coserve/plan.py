"""`coserve plan`: the VRAM budget of a co-location, the gen model's KV capacity in tokens,
and the largest concurrency that fits a workload without queuing.

The model: as vLLM means `gpu_memory_utilization`, the gen server may use that fraction of
the whole GPU; its KV cache gets what is left after the weights and the runtime's own memory
(activations of the profiling pass, CUDA graphs, memory outside torch). The runtime figure
cannot be derived from the config; the default (12.6 GB) is what the study's own numbers
imply: Qwen3-30B-A3B-FP8 at 0.50 of an H200 gave ~322K tokens of KV cache. Give
`--runtime-gb` for another engine or setting.

A closed loop of C requests of `input + output` tokens needs C x that (rounded up to KV
blocks) at its peak; if that exceeds the KV capacity, requests queue (or are preempted) and
throughput drops: the study's reason for C=512 (~278K of ~322K tokens) over C=1024.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9
MiB = 1 << 20
# Total memory as NVML reports it (what gpu_memory_utilization is a fraction of).
GPUS: dict[str, tuple[str, int]] = {
    "h200": ("NVIDIA H200 (141 GB)", 143771 * MiB),
    "h100": ("NVIDIA H100 80GB HBM3", 81559 * MiB),
    "h100-nvl": ("NVIDIA H100 NVL (94 GB)", 95830 * MiB),
    "a100-80gb": ("NVIDIA A100 80GB", 81920 * MiB),
    "a100-40gb": ("NVIDIA A100 40GB", 40960 * MiB),
    "l40s": ("NVIDIA L40S (48 GB)", 46068 * MiB),
}
DEFAULT_RUNTIME_GB = 12.6
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class ModelSize:
    name: str
    params: int
    weight_bytes: int
    kv_bytes_per_token: int  # 0 for encoders (no KV cache)
    fmt: str                 # how the weights are stored, in words
    kv_text: str = ""


def _hf_config(model: str) -> dict[str, Any]:
    """The HF config of a preset or a model directory."""
    from coserve.engine.presets import get_preset

    preset = get_preset(model)
    if preset is not None:
        if preset.hf_config:
            return dict(preset.hf_config)
        if preset.model_dir is not None:
            return json.loads((Path(preset.model_dir) / "config.json").read_text())
    path = Path(model) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    from coserve.engine.presets import PRESETS

    raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) "
                     f"nor a directory with a config.json")


def model_size(model: str, dtype_bytes: int = 2, embedding: bool = False) -> ModelSize:
    """Parameters, weight bytes (FP8 block-quantised where the config says so) and KV bytes
    per token of a Qwen3 (dense or MoE) decoder or a BERT encoder. An `embedding` model
    (Qwen3-Embedding: pooled hidden states) has no lm_head."""
    c = _hf_config(model)
    H, V = c["hidden_size"], c["vocab_size"]
    q = c.get("quantization_config") or {}
    fp8 = q.get("quant_method") == "fp8"
    block = (q.get("weight_block_size") or [128, 128]) if fp8 else None

    def linear(n_out: int, n_in: int, quantised: bool) -> tuple[int, int]:
        p = n_out * n_in
        if quantised and fp8:
            scales = math.ceil(n_out / block[0]) * math.ceil(n_in / block[1])
            return p, p + 4 * scales
        return p, p * dtype_bytes

    parts: list[tuple[int, int]] = []
    if c.get("model_type") == "bert":
        L, inter = c["num_hidden_layers"], c["intermediate_size"]
        emb = (V + c.get("max_position_embeddings", 512) + c.get("type_vocab_size", 2)) * H + 2 * H
        parts.append((emb, emb * dtype_bytes))
        per = 4 * (H * H + H) + (H * inter + inter) + (inter * H + H) + 4 * H
        parts.append((L * per, L * per * dtype_bytes))  # (the pooler is not served: not counted)
        params = sum(p for p, _ in parts)
        return ModelSize(model, params, sum(b for _, b in parts), 0, f"{8 * dtype_bytes}-bit, encoder")
    L, nh, nkv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    parts.append((V * H, V * H * dtype_bytes))                       # embed_tokens
    if not c.get("tie_word_embeddings") and not embedding:
        parts.append((V * H, V * H * dtype_bytes))                   # lm_head (never FP8)
    experts = c.get("num_experts") or 0
    mlp_only = set(c.get("mlp_only_layers") or [])
    step = c.get("decoder_sparse_step") or 1
    for layer in range(L):
        for n_out, n_in in ((nh * hd, H), (nkv * hd, H), (nkv * hd, H), (H, nh * hd)):
            parts.append(linear(n_out, n_in, True))
        norms = 2 * H + 2 * hd
        parts.append((norms, norms * dtype_bytes))
        if experts and layer not in mlp_only and (layer + 1) % step == 0:
            Im = c["moe_intermediate_size"]
            parts.append((experts * H, experts * H * dtype_bytes))  # router (mlp.gate, not FP8)
            for _ in range(experts):
                for n_out, n_in in ((Im, H), (Im, H), (H, Im)):
                    parts.append(linear(n_out, n_in, True))
        else:
            Id = c["intermediate_size"]
            for n_out, n_in in ((Id, H), (Id, H), (H, Id)):
                parts.append(linear(n_out, n_in, True))
    parts.append((H, H * dtype_bytes))                               # final norm
    params = sum(p for p, _ in parts)
    kv = 2 * L * nkv * hd * dtype_bytes
    fmt = (f"FP8 block {block[0]}x{block[1]}, embeddings/lm_head/router bf16" if fp8
           else f"{'bf16' if dtype_bytes == 2 else f'{8 * dtype_bytes}-bit'}")
    kv_text = f"{L} layers x {nkv} KV heads x {hd} dim x (K+V) x {dtype_bytes} B"
    return ModelSize(model, params, sum(b for _, b in parts), kv, fmt, kv_text)


@dataclass
class Plan:
    gpu_name: str
    gpu_bytes: int
    gen: ModelSize
    embed: ModelSize | None
    gen_util: float
    embed_util: float
    runtime_bytes: int
    input_len: int
    output_len: int
    block_size: int
    max_num_seqs: int | None
    concurrency: list[int]

    @property
    def gen_budget(self) -> int:
        return int(self.gen_util * self.gpu_bytes)

    @property
    def kv_bytes(self) -> int:
        return max(0, self.gen_budget - self.gen.weight_bytes - self.runtime_bytes)

    @property
    def kv_tokens(self) -> int:
        """Capacity in tokens, whole blocks only (as a paged cache allocates it)."""
        per_block = self.gen.kv_bytes_per_token * self.block_size
        return (self.kv_bytes // per_block) * self.block_size if per_block else 0

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

    def problems(self) -> list[str]:
        out = []
        if self.gen_util + (self.embed_util if self.embed else 0) > 1.0 + 1e-9:
            out.append(f"the fractions add up to {self.gen_util + self.embed_util:.2f} > 1: "
                       f"the two servers cannot both reserve their share")
        if self.kv_bytes <= 0:
            out.append("the gen model's weights and runtime do not fit its fraction: no room for a KV cache")
        if self.embed and self.embed.weight_bytes > self.embed_util * self.gpu_bytes:
            out.append("the embed model's weights do not fit its fraction")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu_name, "gpu_bytes": self.gpu_bytes,
            "gen": {"model": self.gen.name, "params": self.gen.params, "weight_bytes": self.gen.weight_bytes,
                    "kv_bytes_per_token": self.gen.kv_bytes_per_token, "util": self.gen_util},
            "embed": None if self.embed is None else {
                "model": self.embed.name, "params": self.embed.params,
                "weight_bytes": self.embed.weight_bytes, "util": self.embed_util},
            "runtime_bytes": self.runtime_bytes, "kv_bytes": self.kv_bytes, "kv_tokens": self.kv_tokens,
            "tokens_per_request": self.tokens_per_request, "max_concurrency": self.max_concurrency,
            "concurrency": {str(c): {"tokens_needed": self.tokens_needed(c), "fits": self.fits(c)}
                            for c in self.concurrency},
            "problems": self.problems(),
        }


def gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


def budget_rows(p: Plan) -> list[tuple[str, str]]:
    rows = [
        (f"gen {p.gen.name} weights ({p.gen.params / 1e9:.2f} B params; {p.gen.fmt})", gb(p.gen.weight_bytes)),
        (f"gen KV cache (gpu_memory_utilization {p.gen_util:g})", gb(p.kv_bytes)),
        ("gen runtime: activations, CUDA graphs, outside torch (estimate)", gb(p.runtime_bytes)),
    ]
    if p.embed is not None:
        rows.append((f"embed {p.embed.name} weights ({p.embed.params / 1e9:.2f} B params; {p.embed.fmt})",
                     gb(p.embed.weight_bytes)))
    three = p.gen.weight_bytes + p.kv_bytes + (p.embed.weight_bytes if p.embed else 0)
    rows.append(("**Total (weights + KV cache + the other model)**", f"**{gb(three)} / {gb(p.gpu_bytes)}**"))
    reserved = p.gen_util + (p.embed_util if p.embed else 0)
    rows.append((f"Reserved by the fractions ({p.gen_util:g}{f' + {p.embed_util:g}' if p.embed else ''})",
                 f"{gb(reserved * p.gpu_bytes)} / {gb(p.gpu_bytes)}"))
    return rows


def lines(p: Plan) -> list[str]:
    out = [f"KV capacity: {p.kv_tokens:,} tokens ({p.gen.kv_bytes_per_token:,} B/token: {p.gen.kv_text}; "
           f"blocks of {p.block_size}).",
           f"Per request: {p.input_len} in + {p.output_len} out = {p.tokens_per_request} tokens "
           f"({p.blocks_per_request * p.block_size} in blocks of {p.block_size})."]
    for c in p.concurrency:
        need = p.tokens_needed(c)
        share = f"{need / p.kv_tokens:.0%} of the KV cache" if p.kv_tokens else "there is no KV cache"
        verdict = "fits without queuing" if p.fits(c) else "does NOT fit: requests queue or are preempted"
        out.append(f"C={c} needs {need:,} tokens ({share}): {verdict}.")
    cap = f"; max_num_seqs {p.max_num_seqs} caps it at {min(p.max_num_seqs, p.max_concurrency)}" \
        if p.max_num_seqs and p.max_num_seqs < p.max_concurrency else ""
    out.append(f"Largest concurrency that fits without queuing: C={p.max_concurrency:,}{cap}.")
    return out + [f"Problem: {x}" for x in p.problems()]


def sweep_rows(p: Plan, values: list[int]) -> list[tuple[str, str, str]]:
    def verdict(c: int) -> str:
        if not p.fits(c):
            return "no: KV cache overflows, requests queue"
        if p.max_num_seqs and c > p.max_num_seqs:
            return f"no: above max_num_seqs {p.max_num_seqs}, requests queue"
        return "yes"

    return [(str(c), f"{p.tokens_needed(c):,}", verdict(c)) for c in values]


# ------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", metavar="SPEC.toml", help="take models, fractions, lengths and sweep from a spec")
    parser.add_argument("--gen", default=None, metavar="MODEL", help="gen preset or model dir (default qwen3-30b-a3b)")
    parser.add_argument("--embed", default=None, metavar="MODEL",
                        help="embed preset or model dir (default qwen3-embedding-8b; 'none' for gen alone)")
    parser.add_argument("--gpu", default=None, help=f"{', '.join(GPUS)} (default: this machine's GPU, else h200)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="GPU memory in GiB (overrides --gpu's)")
    parser.add_argument("--gen-util", type=float, default=None, help="gen gpu_memory_utilization (default 0.50)")
    parser.add_argument("--embed-util", type=float, default=None, help="embed gpu_memory_utilization (default 0.30)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 30)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (default 512)")
    parser.add_argument("--concurrency", default=None, help="C values to check, e.g. 256,512,1024 (default 512)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="gen max_num_seqs (default 512)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (vLLM: 16)")
    parser.add_argument("--runtime-gb", type=float, default=DEFAULT_RUNTIME_GB,
                        help=f"gen memory besides weights and KV (default {DEFAULT_RUNTIME_GB}, the study's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _local_gpu() -> tuple[str, int] | None:
    from coserve.gpu import nvml as nv

    try:
        lib = nv.open_nvml()
    except nv.NvmlUnavailable:
        return None
    try:
        g = nv.gpu_info(lib, 0, with_mig_profiles=False)
        return g.name, g.memory_mib * MiB
    except Exception:
        return None
    finally:
        nv.close_nvml(lib)


def make_plan(args: argparse.Namespace) -> tuple[Plan, list[int]]:
    gen_model, embed_model = "qwen3-30b-a3b", "qwen3-embedding-8b"
    gen_util, embed_util, inp, outp, mns, conc, sweep = 0.50, 0.30, 30, 512, 512, [512], []
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
            raise ValueError(f"--gpu {args.gpu}: expected one of {', '.join(GPUS)} (or --gpu-memory-gib)")
        gpu_name, gpu_bytes = GPUS[key]
    else:
        gpu_name, gpu_bytes = _local_gpu() or GPUS["h200"]
    if args.gpu_memory_gib:
        gpu_name, gpu_bytes = f"{args.gpu_memory_gib:g} GiB GPU", int(args.gpu_memory_gib * (1 << 30))
    embed = None if embed_model in ("none", "", None) else model_size(embed_model, embedding=True)
    plan = Plan(gpu_name, gpu_bytes, model_size(gen_model), embed, gen_util, embed_util,
                int(args.runtime_gb * GB), inp, outp, args.block_size, mns, conc)
    return plan, sweep


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        plan, sweep = make_plan(args)
    except (ValueError, OSError) as e:
        console.print(f"[red]plan:[/red] {e}")
        return 2
    if args.json:
        d = plan.to_dict()
        d["sweep"] = {str(c): {"tokens_needed": plan.tokens_needed(c), "fits": plan.fits(c)} for c in sweep}
        print(json.dumps(d, indent=2))
        return 0
    t = Table(title=f"VRAM budget on {plan.gpu_name}: {gb(plan.gpu_bytes)} as NVML reports it")
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
