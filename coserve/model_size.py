"""How big a model is, from its config alone: parameters, weight bytes (FP8 block-quantised
where the config says so) and KV-cache bytes per token. `coserve plan` budgets with it;
memcheck compares it with what the engine allocates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from coserve.engine.presets import hf_config

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def engine_dtype(dtype: str | None, cpu: bool) -> str:
    """The dtype the built-in engine runs in: `dtype` when given, else float32 on a CPU and
    bfloat16 on a GPU (engine/weights.py resolve_dtype; 2 bytes either way where a config asks
    for float16)."""
    return dtype or ("float32" if cpu else "bfloat16")


@dataclass
class ModelSize:
    name: str
    params: int
    weight_bytes: int
    kv_bytes_per_token: int  # 0 for encoders (no KV cache)
    fmt: str  # how the weights are stored, in words
    kv_text: str = ""


def model_size(
    model: str, dtype_bytes: int = 2, embedding: bool = False, dequantised: bool = False
) -> ModelSize:
    """Parameters, weight bytes (FP8 block-quantised where the config says so) and KV bytes
    per token of a Qwen3 (dense or MoE) decoder or a BERT encoder. An `embedding` model
    (Qwen3-Embedding: pooled hidden states) has no lm_head. `dequantised`: every weight at
    `dtype_bytes`, as the engine holds an FP8 checkpoint on the CPU (it dequantises at load)."""
    c = hf_config(model)
    H, V = c["hidden_size"], c["vocab_size"]
    q = c.get("quantization_config") or {}
    fp8_checkpoint = q.get("quant_method") == "fp8"
    fp8 = fp8_checkpoint and not dequantised
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
        return ModelSize(
            model, params, sum(b for _, b in parts), 0, f"{8 * dtype_bytes}-bit, encoder"
        )
    L, nh, nkv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    parts.append((V * H, V * H * dtype_bytes))  # embed_tokens
    if not c.get("tie_word_embeddings") and not embedding:
        parts.append((V * H, V * H * dtype_bytes))  # lm_head (never FP8)
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
    parts.append((H, H * dtype_bytes))  # final norm
    params = sum(p for p, _ in parts)
    kv = 2 * L * nkv * hd * dtype_bytes
    width = "bf16" if dtype_bytes == 2 else f"{8 * dtype_bytes}-bit"
    if fp8:
        fmt = f"FP8 block {block[0]}x{block[1]}, embeddings/lm_head/router {width}"
    elif fp8_checkpoint:
        fmt = f"{width}: its FP8 weights dequantised at load, as on a CPU"
    else:
        fmt = width
    kv_text = f"{L} layers x {nkv} KV heads x {hd} dim x (K+V) x {dtype_bytes} B"
    return ModelSize(model, params, sum(b for _, b in parts), kv, fmt, kv_text)
