"""FP8 block-quantised dense layer, as Qwen3-*-FP8 checkpoints store it.

Weight W [N, K] float8_e4m3fn with `weight_scale_inv` S [ceil(N/128), ceil(K/128)]:
    W_real[n, k] = W[n, k] * S[n // 128, k // 128]
Activations are quantised on the fly per token and per group of 128 channels:
    x[m, k] ~= xq[m, k] * xs[m, k // 128],   xs = max|x[m, group]| / 448
and the product is accumulated per 128-wide K block with both scales applied:
    y[m, n] = sum_kb xs[m, kb] * S[n // 128, kb] * sum_{k in kb} xq[m, k] * W[n, k]

Two back ends compute this: cuBLAS through torch's blockwise `scaled_mm` (1x128 activation
scales, 128x128 weight scales; Hopper, cuBLAS >= 12.9) and a Triton block-scaled GEMM.
benchmarks/kernels.py times both (docs/kernels.md): cuBLAS is faster from M=64 up (1.5x at
M=512), refuses M=1, and ties Triton below M=64; so `fp8_linear` uses cuBLAS for M >= 16 and
Triton below, or wherever cuBLAS refuses a shape (COSERVE_FP8_LINEAR=triton|cublas forces one).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..fp8 import Fp8Activation
from .tile_order import grouped_tile

FP8_MAX = 448.0
GROUP = 128


# ---------------------------------------------------------------------------------------------
# Activation quantisation: one program per row, all of its 128-wide groups at once.
@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sg,
    NUM_GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    m = tl.program_id(0)
    g = tl.arange(0, GROUPS_PAD)
    c = tl.arange(0, GROUP_SIZE)
    cols = g[:, None] * GROUP_SIZE + c[None, :]
    mask = (g[:, None] < NUM_GROUPS) & (cols < K)
    x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    scale = tl.maximum(amax, 1e-10) / FP8_MAX
    q = tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + m * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * stride_sm + g * stride_sg, scale, mask=g < NUM_GROUPS)


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = GROUP, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq float8_e4m3fn [..., K], scales fp32 [..., ceil(K/group)]).

    column_major_scales lays the 2-D scale matrix out with stride (1, M), as cuBLAS's
    blockwise scaled_mm wants it (only for 2-D x)."""
    assert group_size == GROUP
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    ng = triton.cdiv(K, group_size)
    xq = torch.empty(x2.shape, device=x.device, dtype=torch.float8_e4m3fn)
    if column_major_scales:
        xs = torch.empty(ng, M, device=x.device, dtype=torch.float32).t()
    else:
        xs = torch.empty(M, ng, device=x.device, dtype=torch.float32)
    if M > 0:
        _quant_rows_kernel[(M,)](
            x2,
            xq,
            xs,
            K,
            x2.stride(0),
            xq.stride(0),
            xs.stride(0),
            xs.stride(1),
            NUM_GROUPS=ng,
            GROUPS_PAD=triton.next_power_of_2(ng),
            GROUP_SIZE=group_size,
            FP8_MAX=FP8_MAX,
            num_warps=4 if K <= 4096 else 8,
        )
    if column_major_scales:
        return xq.view(x.shape), xs
    return xq.view(x.shape), xs.view(*x.shape[:-1], ng)


# ---------------------------------------------------------------------------------------------
# Triton block-scaled GEMM: C[M, N] = (A * As) @ (B * Bs)^T, A [M, K] fp8, B [N, K] fp8.
@triton.jit
def _block_fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :],
        c,
        mask=m_mask[:, None] & n_mask[None, :],
    )


def _gemm_config(M: int, N: int) -> dict:
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=4)
    if M <= 1024:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def block_fp8_matmul_triton(
    xq,
    xs,
    weight,
    weight_scale_inv,
    bias=None,
    out_dtype=torch.bfloat16,
    config: dict | None = None,
):
    """xq [M, K] fp8, xs [M, K/128] fp32 (any strides), weight [N, K] fp8, scales [N/128, K/128]."""
    M, K = xq.shape
    N = weight.shape[0]
    out = torch.empty(M, N, device=xq.device, dtype=out_dtype)
    cfg = dict(_gemm_config(M, N), **(config or {}))
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    # the scale pointer arithmetic uses (row stride, group stride = 1) for weight scales and
    # (row stride) + kb * group stride for activations: make activation scales row-major.
    if xs.stride(1) != 1:
        xs = xs.contiguous()
    _block_fp8_gemm_kernel[grid](
        xq,
        xs,
        weight,
        weight_scale_inv,
        out,
        bias if bias is not None else out,
        M,
        N,
        K,
        xq.stride(0),
        xs.stride(0),
        weight.stride(0),
        weight_scale_inv.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=GROUP,
        GROUP_M=8,
        **cfg,
    )
    return out


# ---------------------------------------------------------------------------------------------
# cuBLAS blockwise path (torch >= 2.10 on Hopper).
def _cublas_weight_scale(weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """[N/128, K/128] row-major -> [round_up(K/128, 4), N/128] with stride (1, round_up)."""
    nb, kb = weight_scale_inv.shape
    kb4 = (kb + 3) // 4 * 4
    if kb4 == kb and weight_scale_inv.stride(1) == 1 and weight_scale_inv.stride(0) == kb:
        return weight_scale_inv.t()
    padded = torch.zeros(nb, kb4, device=weight_scale_inv.device, dtype=torch.float32)
    padded[:, :kb] = weight_scale_inv
    return padded.t()


def block_fp8_matmul_cublas(
    xq, xs_col_major, weight, weight_scale_inv, bias=None, out_dtype=torch.bfloat16
):
    from torch.nn.functional import ScalingType, scaled_mm

    def recipe(*names):  # the enum's spelling changed between torch releases
        for n in names:
            if hasattr(ScalingType, n):
                return getattr(ScalingType, n)
        raise NotImplementedError(f"torch has no ScalingType.{names[0]}")

    out = scaled_mm(
        xq,
        weight.t(),
        xs_col_major,
        recipe("BlockWise1x128", "Blockwise_1x128"),
        _cublas_weight_scale(weight_scale_inv),
        recipe("BlockWise128x128", "Blockwise_128x128"),
        output_dtype=out_dtype,
    )
    if bias is not None:
        out = out + bias
    return out


_BACKEND = os.environ.get("COSERVE_FP8_LINEAR", "auto")  # auto | cublas | triton
# cuBLAS's blockwise kernels refuse small M (CUBLAS_STATUS_NOT_SUPPORTED at M=1 on H100 with
# cuBLAS 13.0); below this M, and for any shape it once refused, auto uses Triton.
CUBLAS_MIN_M = int(os.environ.get("COSERVE_FP8_CUBLAS_MIN_M", "16"))
_cublas_refused: set[tuple[int, int, int]] = set()


def _use_cublas(M: int, N: int, K: int, device: torch.device) -> bool:
    if _BACKEND == "triton" or device.type != "cuda":
        return False
    if _BACKEND == "cublas":
        return True
    return M >= CUBLAS_MIN_M and N % 128 == 0 and K % 128 == 0 and (M, N, K) not in _cublas_refused


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_fp8: Fp8Activation | None = None,
) -> torch.Tensor:
    """y = x @ dequant(weight)^T (+ bias); x [..., K] bf16/fp16/fp32, weight [N, K] fp8 e4m3,
    weight_scale_inv [ceil(N/128), ceil(K/128)] fp32. Returns [..., N] in x's dtype (bf16 for
    fp32 inputs is not promised: output dtype follows x). `x_fp8`, x already quantised
    ([M, K] with M the rows of x), saves the quantisation launch; its scales are best
    column-major (cuBLAS's layout, what `rms_norm_quant` writes), else they are copied."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if x_fp8 is not None:
        x_fp8.check_stands_for(M, K)
    if _use_cublas(M, N, K, x.device):
        if x_fp8 is None:
            xq, xs = per_token_group_quant_fp8(x2, column_major_scales=True)
        else:
            xq, xs = x_fp8.values, x_fp8.scales
            if xs.stride(0) != 1:
                xs = xs.t().contiguous().t()
        try:
            y = block_fp8_matmul_cublas(xq, xs, weight, weight_scale_inv, bias, out_dtype)
        except (RuntimeError, NotImplementedError, ImportError, ValueError, AttributeError):
            if _BACKEND == "cublas":
                raise
            _cublas_refused.add((M, N, K))
            y = block_fp8_matmul_triton(xq, xs, weight, weight_scale_inv, bias, out_dtype)
    elif x_fp8 is None:
        xq, xs = per_token_group_quant_fp8(x2)
        y = block_fp8_matmul_triton(xq, xs, weight, weight_scale_inv, bias, out_dtype)
    else:
        y = block_fp8_matmul_triton(
            x_fp8.values, x_fp8.scales, weight, weight_scale_inv, bias, out_dtype
        )
    return y.view(*x.shape[:-1], N).to(x.dtype)


def fp8_block_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    x_fp8: Fp8Activation | None = None,
) -> torch.Tensor:
    """Twin of coserve.engine.kernels.fp8.fp8_block_linear: y = x @ dequant(q, scale)^T (+ bias)
    with x quantised per 1x128 group on the fly, or taken from `x_fp8` (128x128 weight
    blocks only)."""
    assert tuple(block) == (GROUP, GROUP), "the FP8 GPU path supports 128x128 blocks only"
    return fp8_linear(x, q, scale, bias, x_fp8)
