"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * w with float32 statistics (the reference rounds
the normalised x to x's dtype before the weight multiply; so does this), the fused form
that first adds the residual stream: r = x + residual; y = rms_norm(r), and either of them
also quantising y per 1x128 group for the FP8 GEMM that reads it next (`rms_norm_quant`),
which saves that GEMM its own quantisation launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8 import Fp8Activation
from .fp8 import FP8_MAX, GROUP


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    r_out_ptr,
    q_ptr,
    s_ptr,
    n_rows,
    D,
    n_inner,
    stride_xo,
    stride_xi,
    stride_ro,
    stride_ri,
    stride_sm,
    stride_sg,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
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
    y = (normed * w[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], y, mask=mask)
    if QUANT:
        # what per_token_group_quant_fp8 computes from the stored y, bit for bit
        NG: tl.constexpr = BLOCK_D // GROUP_SIZE
        groups = tl.reshape(y.to(tl.float32), [BLOCK_R, NG, GROUP_SIZE])
        scale = tl.maximum(tl.max(tl.abs(groups), 2), 1e-10) / FP8_MAX
        q = tl.clamp(groups / scale[:, :, None], -FP8_MAX, FP8_MAX)
        q = tl.reshape(q, [BLOCK_R, BLOCK_D])
        tl.store(
            q_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
            q.to(q_ptr.dtype.element_ty),
            mask=mask,
        )
        g = tl.arange(0, NG)
        tl.store(
            s_ptr + rows.to(tl.int64)[:, None] * stride_sm + g[None, :] * stride_sg,
            scale,
            mask=rmask[:, None] & (g[None, :] < D // GROUP_SIZE),
        )


def _rows_view(x: torch.Tensor):
    """(tensor, n_rows, n_inner, stride_outer, stride_inner) addressing rows of x's last dim
    without a copy for 2-D and 3-D views with a unit last stride."""
    if x.stride(-1) != 1 or x.dim() > 3 or x.dim() == 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def _launch(x, residual, weight, eps, quant=False, column_major_scales=True):
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
    if quant:
        q = torch.empty(n_rows, D, device=x.device, dtype=torch.float8_e4m3fn)
        if column_major_scales:
            s = torch.empty(D // GROUP, n_rows, device=x.device, dtype=torch.float32).t()
        else:
            s = torch.empty(n_rows, D // GROUP, device=x.device, dtype=torch.float32)
    else:
        q, s = y, y
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    if n_rows > 0:
        _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            xv,
            rv,
            weight,
            y,
            r_out,
            q,
            s,
            n_rows,
            D,
            n_inner,
            sxo,
            sxi,
            sro,
            sri,
            s.stride(0) if quant else 0,
            s.stride(1) if quant else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            QUANT=quant,
            GROUP_SIZE=GROUP,
            FP8_MAX=FP8_MAX,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=4 if block_d <= 2048 else 8,
        )
    return y, r_out, (Fp8Activation(q, s) if quant else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Twin of coserve.engine.kernels.rmsnorm.rms_norm; x [..., D] (strided 2-D/3-D views are
    read in place, e.g. q and k split from a fused qkv output). Returns a contiguous tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    return _launch(x, residual, weight, eps)[:2]


def rms_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    column_major_scales: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Fp8Activation | None]:
    """Twin of coserve.engine.kernels.fused.rms_norm_quant: (y, r, y_fp8) with r = x +
    residual (x itself without a residual) and y = rms_norm(r), in one pass that also
    quantises y per 1x128 group (scales [T, D/128], column-major as cuBLAS's blockwise GEMM
    takes them, or row-major as the MoE's GEMM1 reads them fastest). y_fp8 is None where D
    is not a multiple of 128 or x is not 2-D."""
    quant = x.dim() == 2 and x.shape[-1] % GROUP == 0
    y, r, y_fp8 = _launch(x, residual, weight, eps, quant, column_major_scales)
    return y, (x if residual is None else r), y_fp8
