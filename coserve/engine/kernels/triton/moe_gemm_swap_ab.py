"""The MoE grouped GEMM with its operands swapped ("swap AB"): each program computes the
transposed tile C^T [BLOCK_N, BLOCK_M] = W[e] [BLOCK_N, K] @ A^T [K, BLOCK_M], so that the
expert's weight rows fill the tensor core's M side (64 rows a warpgroup on Hopper) and the few
tokens an expert gets at decode (T*k/E: 32 at the study's C=512) its N side, which may be as
small as 16. `_moe_gemm_kernel` (moe_gemm.py) puts the tokens on the M side, which Hopper's
warpgroup MMA takes 64 rows at a time, so at decode about half of each 64-row tile is padding
and its accumulators (64 x 128 per product) hold one program per SM. Here a 32-token tile's
products need half those registers and less shared memory per stage.

The same arguments as `_moe_gemm_kernel`, so that `moe_gemm.launch_gemm(swap_ab=True)` launches
either with one argument list; FP8, B_TMA, SCALAR_B_SCALE and the weights' pointer strides are
not read here: always FP8, the weights by TMA (tiled or row-major), one weight scale per K step
(BLOCK_N == 128). The same product as the unswapped GEMM up to float rounding order."""

from __future__ import annotations

import triton
import triton.language as tl

from .moe_gemm_parts import block_rows, store_tile, store_zeros
from .tile_order import grouped_tile


@triton.jit
def _moe_gemm_swap_ab_kernel(
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

    offs_m, pair, row_mask, a_row = block_rows(
        pid_m, sorted_ids_ptr, num_valid, A_ROW_DIV, A_SORTED, BLOCK_M
    )
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if FOREIGN:
        if expert >= num_experts:
            if MUL_WEIGHT:
                store_zeros(c_ptr, pair, row_mask, offs_n, n_mask, stride_cm, BLOCK_M, BLOCK_N)
            return
    offs_k = tl.arange(0, BLOCK_K)
    if not A_SORTED:
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    if TILED:
        k_tiles = K // BLOCK_K
        gate_tile = (expert * (b_rows // BLOCK_N) + pid_n) * k_tiles
        up_tile = gate_tile + (up_offset // BLOCK_N) * k_tiles
    else:
        b_row = (expert * b_rows + pid_n * BLOCK_N).to(tl.int32)
    # C^T's columns are the tokens: each K step scales column j by its token's activation
    # scale times the tile's one weight scale (BLOCK_N == SCALE_GROUP)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if GATED:
        acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    as_ptrs = as_ptr + a_row * stride_asm
    bs_base = bs_ptr + expert * stride_bse
    bs_ptrs = bs_base + (pid_n * BLOCK_N // SCALE_GROUP) * stride_bsn
    if GATED:
        bs2_ptrs = bs_base + ((pid_n * BLOCK_N + up_offset) // SCALE_GROUP) * stride_bsn

    for kb in range(0, K // BLOCK_K):
        if A_SORTED:
            # padding rows hold whatever was there: their columns of C^T are never stored
            a = a_ptr.load([(pid_m * BLOCK_M).to(tl.int32), kb * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        if TILED:
            w = b_ptr.load([((gate_tile + kb) * BLOCK_N).to(tl.int32), 0])
            if GATED:
                w2 = b_ptr.load([((up_tile + kb) * BLOCK_N).to(tl.int32), 0])
        else:
            w = b_ptr.load([b_row, kb * BLOCK_K])
            if GATED:
                w2 = b_ptr.load([b_row + up_offset, kb * BLOCK_K])
        a_s = tl.load(as_ptrs + kb * stride_asg, mask=row_mask, other=0.0)
        acc += tl.dot(w, a.T) * (a_s * tl.load(bs_ptrs + kb))[None, :]
        if GATED:
            acc2 += tl.dot(w2, a.T) * (a_s * tl.load(bs2_ptrs + kb))[None, :]
        if not A_SORTED:
            a_ptrs += BLOCK_K

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    store_tile(
        tl.trans(acc), c_ptr, cs_ptr, topk_w_ptr, offs_m, pair, row_mask, offs_n, n_mask, pid_n,
        stride_cm, stride_csm, MUL_WEIGHT, QUANT_OUT, C_SORTED, FP8_MAX,
    )  # fmt: skip
