"""The one place that picks a kernel. The model calls `ops.<kernel>(x, ...)`; on a CUDA tensor
with Triton present that is the Triton twin (`kernels/triton/`, same signature), anywhere
else the plain-torch reference (inside a KERNEL_RANGE range while a profiler records).
`COSERVE_KERNELS=reference` forces the references on the GPU too (to compare against them,
or to rule a twin out while debugging).

Only the twins are free of host synchronisation, so only they can be captured in a CUDA
graph: `graph_safe(device)` says whether this device's decode step is."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import torch

from coserve.engine.kernels import KERNEL_RANGE, activation, attention, fp8, fused, moe, rmsnorm
from coserve.engine.kernels import triton as twins


@cache
def twins_enabled() -> bool:
    return os.environ.get("COSERVE_KERNELS", "auto") != "reference" and twins.available()


def graph_safe(device: torch.device) -> bool:
    return device.type == "cuda" and twins_enabled()


def _dispatch(name: str, reference: Callable) -> Callable:
    label = KERNEL_RANGE + name

    def call(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and twins_enabled():
            return getattr(twins, name)(x, *args, **kwargs)
        # The range only while a profiler records: it costs ~10 us a call even when none does
        # (a CPU decode step runs a dozen references), the check ~0.1 us.
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(label):
                return reference(x, *args, **kwargs)
        return reference(x, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = reference.__doc__
    return call


rms_norm = _dispatch("rms_norm", rmsnorm.rms_norm)
fused_add_rms_norm = _dispatch("fused_add_rms_norm", fused.fused_add_rms_norm)
rms_norm_quant = _dispatch("rms_norm_quant", fused.rms_norm_quant)
qk_norm_rope = _dispatch("qk_norm_rope", fused.qk_norm_rope)
silu_and_mul = _dispatch("silu_and_mul", activation.silu_and_mul)
fp8_block_linear = _dispatch("fp8_block_linear", fp8.fp8_block_linear)
topk_softmax = _dispatch("topk_softmax", moe.topk_softmax)
fused_moe = _dispatch("fused_moe", moe.fused_moe)
paged_decode_attention = _dispatch("paged_decode_attention", attention.paged_decode_attention)
varlen_attention = _dispatch("varlen_attention", attention.varlen_attention)
