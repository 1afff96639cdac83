"""The grouped GEMM of the Triton MoE (moe.py): one program per (M-block of one expert's
sorted pairs, N tile), A gathered by the pairs' rows (or read in sorted order by TMA), the
expert's weights by pointers or TMA, row-major or stored tile by tile (expert_layout.py),
FP8 block scales applied per 128-wide K step. GEMM 1 (GATED) computes gate and up and
writes silu(gate) * up, re-quantised to FP8 per 1x128 group (QUANT_OUT); GEMM 2 multiplies
by the pair's routing weight (MUL_WEIGHT). `launch_gemm` picks the weight path and launches
it, or the same GEMM with swapped operands (moe_gemm_swap_ab.py); fused_moe calls it twice."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..expert_layout import expert_shape, is_tiled
from .fp8 import FP8_MAX
from .moe_gemm_parts import block_rows, store_tile, store_zeros
from .moe_gemm_swap_ab import _moe_gemm_swap_ab_kernel
from .tile_order import grouped_tile


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    cs_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    N,
    K,
    up_offset,
    num_valid,
    num_pid_m,
    num_experts,
    b_rows,
    stride_am,
    stride_asm,
    stride_asg,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsn,
    stride_cm,
    stride_csm,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    FP8: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FOREIGN: tl.constexpr,
    B_TMA: tl.constexpr,
    TILED: tl.constexpr,
    A_SORTED: tl.constexpr,
    C_SORTED: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALAR_B_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return

    # with A_SORTED, a_ptr is a descriptor over A's rows in sorted order (GEMM1 wrote them so)
    offs_m, pair, row_mask, a_row = block_rows(
        pid_m, sorted_ids_ptr, num_valid, A_ROW_DIV, A_SORTED, BLOCK_M
    )
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if FOREIGN:
        if expert >= num_experts:
            # pairs of experts another rank holds: no product; the output GEMM writes zeros
            if MUL_WEIGHT:
                store_zeros(c_ptr, pair, row_mask, offs_n, n_mask, stride_cm, BLOCK_M, BLOCK_N)
            return
    offs_k = tl.arange(0, BLOCK_K)

    if not A_SORTED:
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    if TILED:
        # b_ptr is a descriptor over the tiles stacked as rows, [E * b_rows * K/BLOCK_K, BLOCK_K]:
        # tile (n, k) of expert e starts at row ((e * b_rows/BLOCK_N + n) * K/BLOCK_K + k) * BLOCK_N
        k_tiles = K // BLOCK_K
        gate_tile = (expert * (b_rows // BLOCK_N) + pid_n) * k_tiles
        up_tile = gate_tile + (up_offset // BLOCK_N) * k_tiles
    elif B_TMA:
        # b_ptr is a descriptor over the weights as [E * b_rows, K]; N is a multiple of
        # BLOCK_N, so a tile never reaches into the next expert's rows
        b_row = (expert * b_rows + pid_n * BLOCK_N).to(tl.int32)
    else:
        b_base = b_ptr + expert * stride_be
        b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None]
        if GATED:
            b2_ptrs = b_ptrs + up_offset * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FP8:
        as_ptrs = as_ptr + a_row * stride_asm
        bs_base = bs_ptr + expert * stride_bse
        if SCALAR_B_SCALE:
            # BLOCK_N == SCALE_GROUP: the tile's columns share one weight scale per K step, so
            # one scalar load instead of BLOCK_N (the same product: (dot * a_s) * b_s)
            bs_ptrs = bs_base + (pid_n * BLOCK_N // SCALE_GROUP) * stride_bsn
            if GATED:
                bs2_ptrs = bs_base + ((pid_n * BLOCK_N + up_offset) // SCALE_GROUP) * stride_bsn
        else:
            bs_ptrs = bs_base + (offs_n // SCALE_GROUP) * stride_bsn
            if GATED:
                bs2_ptrs = bs_base + ((offs_n + up_offset) // SCALE_GROUP) * stride_bsn

    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        if A_SORTED:
            # padding rows hold whatever was there: their products stay in their own rows,
            # which are never stored
            a = a_ptr.load([(pid_m * BLOCK_M).to(tl.int32), kb * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if TILED:
            b = b_ptr.load([((gate_tile + kb) * BLOCK_N).to(tl.int32), 0]).T
            if GATED:
                b2 = b_ptr.load([((up_tile + kb) * BLOCK_N).to(tl.int32), 0]).T
        elif B_TMA:
            b = b_ptr.load([b_row, kb * BLOCK_K]).T
            if GATED:
                b2 = b_ptr.load([b_row + up_offset, kb * BLOCK_K]).T
        else:
            b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            if GATED:
                b2 = tl.load(b2_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if FP8:
            a_s = tl.load(as_ptrs + kb * stride_asg, mask=row_mask, other=0.0)
            if SCALAR_B_SCALE:
                acc += tl.dot(a, b) * a_s[:, None] * tl.load(bs_ptrs + kb)
                if GATED:
                    acc2 += tl.dot(a, b2) * a_s[:, None] * tl.load(bs2_ptrs + kb)
            else:
                b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
                if GATED:
                    b2_s = tl.load(bs2_ptrs + kb, mask=n_mask, other=0.0)
                    acc2 += tl.dot(a, b2) * a_s[:, None] * b2_s[None, :]
        else:
            acc = tl.dot(a, b, acc)
            if GATED:
                acc2 = tl.dot(a, b2, acc2)
        if not A_SORTED:
            a_ptrs += BLOCK_K
        if not (B_TMA or TILED):
            b_ptrs += BLOCK_K
            if GATED:
                b2_ptrs += BLOCK_K

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    store_tile(
        acc, c_ptr, cs_ptr, topk_w_ptr, offs_m, pair, row_mask, offs_n, n_mask, pid_n,
        stride_cm, stride_csm, MUL_WEIGHT, QUANT_OUT, C_SORTED, FP8_MAX,
    )  # fmt: skip


def tma_fits(b: torch.Tensor, N: int, K: int, up_offset: int, block_n: int, block_k: int) -> bool:
    """Whether weights b [E, rows, K] can be read by TMA tiles of [block_n, block_k]: contiguous
    (one 2-D view), 16-byte aligned rows (TMA's rule), and tiles that never straddle two experts
    or the gate/up boundary. Otherwise the GEMM keeps its pointer loads."""
    return (
        b.is_contiguous()
        and (K * b.element_size()) % 16 == 0
        and b.data_ptr() % 16 == 0
        and N % block_n == 0
        and K % block_k == 0
        and up_offset % block_n == 0
        and b.shape[1] % block_n == 0
    )


def _tiled_descriptor(b: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor:
    """A TMA descriptor over tiled weights b [E, N/bn, K/bk, bn, bk] seen as rows of bk.
    Raises ValueError if the stored tile is not the GEMM's tile."""
    bn, bk = b.shape[3:]
    if (bn, bk) != (block_n, block_k) or not b.is_contiguous():
        raise ValueError(
            f"expert weights stored in {bn}x{bk} tiles (contiguous: {b.is_contiguous()}) "
            f"cannot feed a GEMM of {block_n}x{block_k} tiles: set BLOCK_N to {bn}"
        )
    return TensorDescriptor.from_tensor(b.view(-1, bk), [block_n, block_k])


def launch_gemm(
    a,
    a_s,
    b,
    b_s,
    c,
    c_s,
    topk_w,
    sorted_ids,
    expert_ids,
    num_post_pad,
    N,
    K,
    up_offset,
    num_valid,
    a_row_div,
    gated,
    quant_out,
    mul_weight,
    block_m,
    block_n,
    group_m,
    num_warps,
    num_stages,
    foreign=False,
    b_tma=False,
    a_sorted=False,
    c_sorted=False,
    scalar_b_scale=False,
    swap_ab=False,
):
    """Launch one grouped GEMM (arguments as `_moe_gemm_kernel`'s). `scalar_b_scale` (FP8,
    block_n 128 only; ignored otherwise) loads each K step's weight scale as one scalar.
    `swap_ab` launches `_moe_gemm_swap_ab_kernel` (moe_gemm_swap_ab.py) instead where it
    applies: FP8, block_n 128, weights tiled or fit for TMA (`tma_fits`); else it is ignored."""
    fp8 = b.dtype == torch.float8_e4m3fn
    block_k = 128 if fp8 else 64
    num_pid_m = sorted_ids.shape[0] // block_m
    grid = (num_pid_m * triton.cdiv(N, block_n),)
    dummy = c
    tiled = is_tiled(b)
    num_experts, b_rows, _ = expert_shape(b)
    fits = not tiled and tma_fits(b, N, K, up_offset, block_n, block_k)
    swap_ab = swap_ab and fp8 and block_n == 128 and (tiled or fits)
    if tiled:
        b_arg, b_tma = _tiled_descriptor(b, block_n, block_k), False
    elif (b_tma or swap_ab) and fits:
        b_arg = TensorDescriptor.from_tensor(b.view(-1, K), [block_n, block_k])
        b_tma = True
    else:
        b_arg, b_tma = b, False
    a_arg = TensorDescriptor.from_tensor(a, [block_m, block_k]) if a_sorted else a
    kernel = _moe_gemm_swap_ab_kernel if swap_ab else _moe_gemm_kernel
    kernel[grid](
        a_arg,
        a_s if a_s is not None else dummy,
        b_arg,
        b_s if b_s is not None else dummy,
        c,
        c_s if c_s is not None else dummy,
        topk_w if topk_w is not None else dummy,
        sorted_ids,
        expert_ids,
        num_post_pad,
        N,
        K,
        up_offset,
        num_valid,
        num_pid_m,
        num_experts,
        b_rows,
        a.stride(0),
        a_s.stride(0) if a_s is not None else 0,
        a_s.stride(1) if a_s is not None else 0,
        b.stride(0),
        b.stride(1),
        b_s.stride(0) if b_s is not None else 0,
        b_s.stride(1) if b_s is not None else 0,
        c.stride(0),
        c_s.stride(0) if c_s is not None else 0,
        A_ROW_DIV=a_row_div,
        GATED=gated,
        FP8=fp8,
        QUANT_OUT=quant_out,
        MUL_WEIGHT=mul_weight,
        FOREIGN=foreign,
        B_TMA=b_tma,
        TILED=tiled,
        A_SORTED=a_sorted,
        C_SORTED=c_sorted,
        FP8_MAX=FP8_MAX,
        SCALE_GROUP=128,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        SCALAR_B_SCALE=scalar_b_scale and fp8 and block_n == 128,
        num_warps=num_warps,
        num_stages=num_stages,
    )
