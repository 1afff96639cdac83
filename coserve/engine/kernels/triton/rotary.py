"""Rotary position embedding, neox layout (Qwen3): the head dim splits in halves (x1, x2),
rotated by pos * inv_freq[i]: (x1 cos - x2 sin, x2 cos + x1 sin), in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr,
    pos_ptr,
    cs_ptr,
    y_ptr,
    H,
    stride_xt,
    stride_xh,
    stride_cs,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF)
    hmask = (h < H)[:, None]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + i)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i)[None, :]
    base = x_ptr + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh
    x1 = tl.load(base + i[None, :], mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i[None, :], mask=hmask, other=0.0).to(tl.float32)
    out = y_ptr + (t.to(tl.int64) * H + h[:, None]) * (2 * HALF)
    tl.store(out + i[None, :], (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=hmask)
    tl.store(out + HALF + i[None, :], (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=hmask)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Twin of coserve.engine.kernels.rotary.apply_rotary: x [T, heads, head_dim] (any strides
    with a unit last stride), positions [T], cos_sin [max_pos, head_dim] float32 (cos | sin).
    Returns a contiguous tensor of x's dtype."""
    T, H, D = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    if cos_sin.stride(1) != 1:
        cos_sin = cos_sin.contiguous()
    y = torch.empty(T, H, D, device=x.device, dtype=x.dtype)
    if T > 0:
        _rotary_kernel[(T,)](
            x,
            positions,
            cos_sin,
            y,
            H,
            x.stride(0),
            x.stride(1),
            cos_sin.stride(0),
            HALF=D // 2,
            H_PAD=triton.next_power_of_2(H),
            num_warps=4,
        )
    return y
