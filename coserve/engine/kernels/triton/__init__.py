"""Triton twins of the plain-torch kernels in `coserve.engine.kernels` (CUDA only).

Each public function here has the same signature as its reference and computes the same
thing, faster on a Hopper GPU. Nothing in this package imports Triton until a kernel is
asked for, so `import coserve.engine.kernels.triton` works on a CPU-only machine; call
`available()` before dispatching here.

    twin                     reference it replaces (same signature)
    paged_decode_attention   coserve.engine.kernels.attention.paged_decode_attention
    varlen_attention         coserve.engine.kernels.attention.varlen_attention
    fused_moe                coserve.engine.kernels.moe.fused_moe  (FP8 block-quantised experts)
    topk_softmax             coserve.engine.kernels.moe.topk_softmax  (ids come back int32)
    fp8_block_linear         coserve.engine.kernels.fp8.fp8_block_linear
    rms_norm                 coserve.engine.kernels.rmsnorm.rms_norm
    rms_norm_quant           coserve.engine.kernels.fused.rms_norm_quant  (and the normed rows
                             quantised for the FP8 GEMM after it)
    apply_rotary             coserve.engine.kernels.rotary.apply_rotary
    silu_and_mul             coserve.engine.kernels.activation.silu_and_mul
extras with no reference twin (the lead may wire them where they pay):
    fp8_linear(x, weight, weight_scale_inv, bias)   fp8_block_linear without `block`
    fused_add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    qk_norm_rope(qkv, Hq, Hkv, D, q_w, k_w, eps, positions, cos_sin, k_cache, v_cache, slots)
        -> (q, k, v): q_norm + k_norm + both rotaries + store_kvcache in one launch
    per_token_group_quant_fp8, moe_align, moe_sum   building blocks of the above
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

_EXPORTS = {
    "paged_decode_attention": "paged_attention",
    "varlen_attention": "varlen_attention",
    "fused_moe": "moe",
    "topk_softmax": "moe_routing",
    "moe_align": "moe_routing",
    "moe_sum": "moe_routing",
    "fp8_block_linear": "fp8",
    "fp8_linear": "fp8",
    "per_token_group_quant_fp8": "fp8",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "rms_norm_quant": "norm",
    "apply_rotary": "rotary",
    "silu_and_mul": "activation",
    "qk_norm_rope": "qk_norm_rope",
}

__all__ = ["available", *_EXPORTS]


@cache
def available() -> bool:
    """True when Triton is importable and a CUDA device is present."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = fn
    return fn
