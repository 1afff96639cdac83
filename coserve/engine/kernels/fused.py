"""References of the fused kernels: each is the composition of plain-torch references that
its Triton twin computes in one launch, so the model calls the fused form on every device.

    fused_add_rms_norm   r = x + residual; (rms_norm(r), r)
    rms_norm_quant       the same (or rms_norm alone), and the twin also quantises the
                         normed rows for the FP8 GEMM after it
    qk_norm_rope         Qwen3's attention prologue: per-head q/k RMSNorm, rotary on both,
                         and (given a paged cache) the k/v cache write"""

from __future__ import annotations

import torch

from coserve.engine.kernels.attention import store_kvcache
from coserve.engine.kernels.fp8 import Fp8Activation
from coserve.engine.kernels.rmsnorm import rms_norm
from coserve.engine.kernels.rotary import apply_rotary


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r = x + residual
    return rms_norm(r, weight, eps), r


def rms_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    column_major_scales: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Fp8Activation | None]:
    """(y, r, y_fp8): r = x + residual (x itself without a residual), y = rms_norm(r), and
    y quantised per 1x128 group for an FP8 GEMM (`Fp8Activation`, its scales in the layout
    asked for): None here, since the reference GEMMs compute in x's dtype; the twin fills
    it."""
    if residual is None:
        return rms_norm(x, weight, eps), x, None
    y, r = fused_add_rms_norm(x, residual, weight, eps)
    return y, r, None


def qk_norm_rope(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) * D] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
    t = qkv.shape[0]
    kv = num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv, kv], dim=-1)
    q = apply_rotary(rms_norm(q.reshape(t, num_heads, head_dim), q_weight, eps), positions, cos_sin)
    k = apply_rotary(
        rms_norm(k.reshape(t, num_kv_heads, head_dim), k_weight, eps), positions, cos_sin
    )
    v = v.reshape(t, num_kv_heads, head_dim)
    if k_cache is not None:
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v
