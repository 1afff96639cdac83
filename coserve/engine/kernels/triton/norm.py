"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * w with float32 statistics (the reference rounds
the normalised x to x's dtype before the weight multiply; so does this), and the fused form
that first adds the residual stream: r = x + residual; y = rms_norm(r)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    r_out_ptr,
    n_rows,
    D,
    n_inner,
    stride_xo,
    stride_xi,
    stride_ro,
    stride_ri,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (d[None, :] < D)
    outer = (rows // n_inner).to(tl.int64)
    inner = (rows % n_inner).to(tl.int64)
    x_off = outer * stride_xo + inner * stride_xi
    x = tl.load(x_ptr + x_off[:, None] + d[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r_off = outer * stride_ro + inner * stride_ri
        res = tl.load(r_ptr + r_off[:, None] + d[None, :], mask=mask, other=0.0)
        x = x + res  # in the stream's dtype, as `h + f(h)` in the model
        tl.store(r_out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(
        y_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
    )


def _rows_view(x: torch.Tensor):
    """(tensor, n_rows, n_inner, stride_outer, stride_inner) addressing rows of x's last dim
    without a copy for 2-D and 3-D views with a unit last stride."""
    if x.stride(-1) != 1 or x.dim() > 3 or x.dim() == 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def _launch(x, residual, weight, eps):
    D = x.shape[-1]
    shape = x.shape
    xv, n_rows, n_inner, sxo, sxi = _rows_view(x)
    if residual is not None:
        rv, _, r_inner, sro, sri = _rows_view(residual)
        assert r_inner == n_inner
    else:
        rv, sro, sri = xv, 0, 0
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    r_out = torch.empty(shape, device=x.device, dtype=x.dtype) if residual is not None else y
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    if n_rows > 0:
        _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            xv,
            rv,
            weight,
            y,
            r_out,
            n_rows,
            D,
            n_inner,
            sxo,
            sxi,
            sro,
            sri,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=4 if block_d <= 2048 else 8,
        )
    return y, r_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Twin of coserve.engine.kernels.rmsnorm.rms_norm; x [..., D] (strided 2-D/3-D views are
    read in place, e.g. q and k split from a fused qkv output). Returns a contiguous tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    return _launch(x, residual, weight, eps)
