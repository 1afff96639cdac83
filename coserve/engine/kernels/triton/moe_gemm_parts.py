"""Pieces both MoE grouped GEMMs share (`_moe_gemm_kernel` in moe_gemm.py, the swapped one in
moe_gemm_swap_ab.py): which rows an M-block holds, and how a finished tile is written.
Triton inlines them, so the kernels compile as if written out."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_rows(
    pid_m,
    sorted_ids_ptr,
    num_valid,
    A_ROW_DIV: tl.constexpr,
    A_SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """(offs_m, pair, row_mask, a_row) of M-block pid_m: its slots in the sorted order, the
    pair each slot holds (num_valid or more: padding), which are real, and the row of A each
    reads (the slot itself when A is stored in sorted order, else the pair's token)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_valid
    if A_SORTED:
        a_row = offs_m.to(tl.int64)
    else:
        a_row = (pair // A_ROW_DIV).to(tl.int64)
    return offs_m, pair, row_mask, a_row


@triton.jit
def store_zeros(
    c_ptr, pair, row_mask, offs_n, n_mask, stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Zeros into the pairs' output rows: the pairs of an expert another rank holds (expert
    parallelism) add nothing to the combine."""
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=c_ptr.dtype.element_ty)
    tl.store(
        c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
        zero,
        mask=row_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def store_tile(
    out,
    c_ptr,
    cs_ptr,
    topk_w_ptr,
    offs_m,
    pair,
    row_mask,
    offs_n,
    n_mask,
    pid_n,
    stride_cm,
    stride_csm,
    MUL_WEIGHT: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    C_SORTED: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """Write a finished tile out [BLOCK_M rows, BLOCK_N columns] (float32): times each pair's
    routing weight (MUL_WEIGHT), at the slot's row (C_SORTED) or the pair's, re-quantised to
    FP8 with one scale per row (QUANT_OUT: BLOCK_N == 128, one 1x128 group a row) or cast."""
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + pair, mask=row_mask, other=0.0)
        out = out * w[:, None]
    c_row = offs_m.to(tl.int64) if C_SORTED else pair.to(tl.int64)
    mask = row_mask[:, None] & n_mask[None, :]
    if QUANT_OUT:
        amax = tl.max(tl.abs(tl.where(n_mask[None, :], out, 0.0)), 1)
        s = tl.maximum(amax, 1e-10) / FP8_MAX
        q = tl.clamp(out / s[:, None], -FP8_MAX, FP8_MAX)
        tl.store(
            c_ptr + c_row[:, None] * stride_cm + offs_n[None, :],
            q.to(c_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(cs_ptr + c_row * stride_csm + pid_n, s, mask=row_mask)
    else:
        tl.store(
            c_ptr + c_row[:, None] * stride_cm + offs_n[None, :],
            out.to(c_ptr.dtype.element_ty),
            mask=mask,
        )
