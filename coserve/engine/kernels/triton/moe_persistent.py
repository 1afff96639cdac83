"""Persistent variant of the MoE expert GEMM (moe.py's `_moe_gemm_kernel`), for decode shapes.

At decode (~32 routed rows per expert) a tile of the per-tile kernel streams 48-512 KB of
weights through a K loop of 3-16 steps, then runs its epilogue with none of its loads in
flight, and its grid is sized for the worst-case padding, so most M-blocks are launched only
to exit. Here a grid of `progs_per_sm` x #SMs programs walks the tiles that exist (the
M-blocks below num_post_pad, read on the device) in one loop over (tile, k-step), so that
Triton's software pipeliner issues the next tile's weight loads while the current tile's
epilogue runs. Two forms of that loop, both pipelined across tile boundaries:

    LOOP=1  a tile loop `tl.range(..., flatten=True)` around a k loop, fused into one loop by
            the compiler (the form of Triton's persistent matmul tutorial since 3.3)
    LOOP=2  one loop over tiles x k-steps written out, each tile's rows, expert and columns
            carried from iteration to iteration (the tutorial's form in Triton 3.0)

Arguments, FP8 block scales, epilogues (GATED / QUANT_OUT / MUL_WEIGHT) and foreign experts
are those of the per-tile kernel. A foreign tile (expert id = E) loads no weights: its product
is zero, so GEMM2 writes zeros for its pairs as the per-tile kernel does. The grid depends on
the device and T only (graph-capturable); under an SM partition it still counts every SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coserve.engine.kernels.triton.sm_count import sm_count

# programs per SM under Triton's interpreter (CPU): a few, so that each walks several tiles
_INTERPRETER_SMS = 2


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    gm = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % gm, (tile % group) // gm


@triton.jit
def _weight_cols(expert, num_experts, N, FOREIGN: tl.constexpr):
    """How many of the expert's N weight rows a tile may load: none for a foreign expert."""
    if FOREIGN:
        return tl.where(expert < num_experts, N, 0)
    return N


@triton.jit
def _zero_acc(GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's accumulators: gate (or the only one) and up; without GATED the second is a
    1x1 placeholder, so that the helpers keep one signature."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc2 = tl.zeros([1, 1], dtype=tl.float32)
    return acc, acc2


@triton.jit
def _k_step(
    acc,
    acc2,
    kb,
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    a_row,
    row_mask,
    expert,
    offs_n,
    b_mask,
    K,
    up_offset,
    stride_am,
    stride_asm,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsn,
    GATED: tl.constexpr,
    FP8: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One BLOCK_K step of a tile: acc (and, GATED, acc2 for the up rows) += A @ B^T. The
    weight offsets are formed here from the strides, not carried from the tile's start: the
    compiler then knows they are 16-byte aligned (a carried offset loses that, and the
    pipeliner leaves a load it cannot vectorise synchronous)."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    a = tl.load(
        a_ptr + a_row[:, None] * stride_am + offs_k[None, :],
        mask=row_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    bk_mask = b_mask[None, :] & k_mask[:, None]
    b = tl.load(b_ptrs, mask=bk_mask, other=0.0)
    if GATED:
        b2 = tl.load(b_ptrs + up_offset * stride_bn, mask=bk_mask, other=0.0)
    if FP8:
        a_s = tl.load(as_ptr + a_row * stride_asm + kb, mask=row_mask, other=0.0)
        bs_rows = expert * stride_bse + (offs_n // SCALE_GROUP) * stride_bsn + kb
        b_s = tl.load(bs_ptr + bs_rows, mask=b_mask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        if GATED:
            # up_offset (I) is a multiple of the FP8 group (fused_moe asserts it)
            up_s = (up_offset // SCALE_GROUP) * stride_bsn
            b2_s = tl.load(bs_ptr + bs_rows + up_s, mask=b_mask, other=0.0)
            acc2 += tl.dot(a, b2) * a_s[:, None] * b2_s[None, :]
    else:
        acc = tl.dot(a, b, acc)
        if GATED:
            acc2 = tl.dot(a, b2, acc2)
    return acc, acc2


@triton.jit
def _store_tile(
    acc,
    acc2,
    sorted_ids_ptr,
    pid_m,
    pid_n,
    num_valid,
    N,
    c_ptr,
    cs_ptr,
    topk_w_ptr,
    stride_cm,
    stride_csm,
    GATED: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The per-tile kernel's epilogue. The tile's pair ids are read again here rather than
    carried from the loads, which the pipeliner runs iterations ahead."""
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_valid
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + pair, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    c_row = pair.to(tl.int64)
    c_mask = row_mask[:, None] & n_mask[None, :]
    if QUANT_OUT:
        # BLOCK_N == 128, the FP8 group: one group per row of this tile
        amax = tl.max(tl.abs(tl.where(n_mask[None, :], acc, 0.0)), 1)
        s = tl.maximum(amax, 1e-10) / FP8_MAX
        q = tl.clamp(acc / s[:, None], -FP8_MAX, FP8_MAX)
        tl.store(
            c_ptr + c_row[:, None] * stride_cm + offs_n[None, :],
            q.to(c_ptr.dtype.element_ty),
            mask=c_mask,
        )
        tl.store(cs_ptr + c_row * stride_csm + pid_n, s, mask=row_mask)
    else:
        tl.store(
            c_ptr + c_row[:, None] * stride_cm + offs_n[None, :],
            acc.to(c_ptr.dtype.element_ty),
            mask=c_mask,
        )


@triton.jit
def _moe_gemm_persistent_kernel(
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
    num_pid_m_max,
    num_experts,
    stride_am,
    stride_asm,
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
    SCALE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    LOOP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.minimum(tl.load(num_post_pad_ptr) // BLOCK_M, num_pid_m_max)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_bn = tl.arange(0, BLOCK_N)
    tile_c = pid - NUM_PROGS  # the tile the epilogue stores (the loads run ahead of it)

    if LOOP == 1:
        for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=True, num_stages=NUM_STAGES):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            row_mask = pair < num_valid
            a_row = (pair // A_ROW_DIV).to(tl.int64)
            expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
            offs_n = pid_n * BLOCK_N + offs_bn
            b_mask = offs_n < _weight_cols(expert, num_experts, N, FOREIGN)
            acc, acc2 = _zero_acc(GATED, BLOCK_M, BLOCK_N)
            for kb in range(k_tiles):
                acc, acc2 = _k_step(
                    acc,
                    acc2,
                    kb,
                    a_ptr,
                    as_ptr,
                    b_ptr,
                    bs_ptr,
                    a_row,
                    row_mask,
                    expert,
                    offs_n,
                    b_mask,
                    K,
                    up_offset,
                    stride_am,
                    stride_asm,
                    stride_be,
                    stride_bn,
                    stride_bse,
                    stride_bsn,
                    GATED,
                    FP8,
                    SCALE_GROUP,
                    BLOCK_K,
                )
            tile_c += NUM_PROGS
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
            _store_tile(
                acc,
                acc2,
                sorted_ids_ptr,
                pid_m,
                pid_n,
                num_valid,
                N,
                c_ptr,
                cs_ptr,
                topk_w_ptr,
                stride_cm,
                stride_csm,
                GATED,
                QUANT_OUT,
                MUL_WEIGHT,
                FP8_MAX,
                BLOCK_M,
                BLOCK_N,
            )
    else:
        # num_tiles - pid > -NUM_PROGS, so this floor division sees no negative numerator
        my_tiles = (num_tiles - pid + NUM_PROGS - 1) // NUM_PROGS
        tile = pid - NUM_PROGS
        kb = k_tiles - 1  # so that the first iteration starts a tile
        # the tile state the loop carries, set at each tile's first k-step (typed here)
        a_row = tl.zeros([BLOCK_M], dtype=tl.int64)
        row_mask = a_row < 0
        expert = (pid * 0).to(tl.int64)
        offs_n = offs_bn
        b_mask = offs_bn < 0
        acc, acc2 = _zero_acc(GATED, BLOCK_M, BLOCK_N)
        for _ in tl.range(0, k_tiles * my_tiles, num_stages=NUM_STAGES):
            kb = tl.where(kb == k_tiles - 1, 0, kb + 1)
            if kb == 0:
                tile += NUM_PROGS
                pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
                pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
                row_mask = pair < num_valid
                a_row = (pair // A_ROW_DIV).to(tl.int64)
                expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
                offs_n = pid_n * BLOCK_N + offs_bn
                b_mask = offs_n < _weight_cols(expert, num_experts, N, FOREIGN)
            acc, acc2 = _k_step(
                acc,
                acc2,
                kb,
                a_ptr,
                as_ptr,
                b_ptr,
                bs_ptr,
                a_row,
                row_mask,
                expert,
                offs_n,
                b_mask,
                K,
                up_offset,
                stride_am,
                stride_asm,
                stride_be,
                stride_bn,
                stride_bse,
                stride_bsn,
                GATED,
                FP8,
                SCALE_GROUP,
                BLOCK_K,
            )
            if kb == k_tiles - 1:
                tile_c += NUM_PROGS
                pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
                _store_tile(
                    acc,
                    acc2,
                    sorted_ids_ptr,
                    pid_m,
                    pid_n,
                    num_valid,
                    N,
                    c_ptr,
                    cs_ptr,
                    topk_w_ptr,
                    stride_cm,
                    stride_csm,
                    GATED,
                    QUANT_OUT,
                    MUL_WEIGHT,
                    FP8_MAX,
                    BLOCK_M,
                    BLOCK_N,
                )
                acc = tl.zeros_like(acc)
                acc2 = tl.zeros_like(acc2)


def launch_persistent(
    args: tuple,
    meta: dict,
    device: torch.device,
    loop: int,
    progs_per_sm: int,
    max_tiles: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """Run `_moe_gemm_persistent_kernel` on the per-tile kernel's arguments: `args` its
    positional ones, `meta` its constexprs. loop: 1 or 2 (module docstring); the grid is
    progs_per_sm x the device's SMs, at most max_tiles (the tiles of the worst-case padding).
    Raises ValueError for another loop form or progs_per_sm < 1."""
    if loop not in (1, 2):
        raise ValueError(f"PERSISTENT1/PERSISTENT2 must be 0, 1 or 2, got {loop}")
    if progs_per_sm < 1:
        raise ValueError(f"progs_per_sm must be >= 1, got {progs_per_sm}")
    num_progs = max(1, min(progs_per_sm * sm_count(device, on_cpu=_INTERPRETER_SMS), max_tiles))
    _moe_gemm_persistent_kernel[(num_progs,)](
        *args,
        **meta,
        NUM_PROGS=num_progs,
        LOOP=loop,
        NUM_STAGES=num_stages,
        num_warps=num_warps,
        num_stages=num_stages,
    )
