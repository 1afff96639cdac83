"""silu(gate) * up for x = [gate | up] along the last dim, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, n, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    g = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + c, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + c, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Twin of coserve.engine.kernels.activation.silu_and_mul: [..., 2I] -> [..., I]."""
    two_i = x.shape[-1]
    n = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    block = min(1024, triton.next_power_of_2(n))
    if rows > 0:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x2, y, n, x2.stride(0), BLOCK=block, num_warps=4
        )
    return y
