"""Paged decode attention for grouped-query attention (one new token per sequence).

One program per (sequence, KV head, split). The program loads the GROUP = Hq / Hkv query heads
that share its KV head as one [GROUP_PAD, D] tile, walks the sequence's KV cache in tiles of
BLOCK_N tokens through the block table, and keeps an online softmax (running max `m`, running
sum `l`, accumulator `acc`), so each K and V row is read from memory exactly once per step.

When the grid (batch x KV heads) is too small to fill the GPU, the context is split into
NUM_SPLITS equal ranges (flash-decoding); a second kernel merges the partial results. The
split count depends only on tensor shapes, never on their values: no host sync, and the
call can be captured in a CUDA graph.

Math per query head h (the reference computes the same thing densely):
    s_t = scale * <q_h, k_t>,   p_t = softmax_t(s_t) over t < context_len,   out_h = sum_t p_t v_t
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from coserve.engine.kernels.triton.sm_count import sm_count


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_o_ptr,
    part_ml_ptr,
    scale_log2e,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    tokens_per_split,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    start = sp * tokens_per_split
    end = tl.minimum(ctx, start + tokens_per_split)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    gmask = g < GROUP
    qh = kvh * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh

    for s in range(start, end, BLOCK_N):
        t = s + n
        tmask = t < end
        if BLOCK_SIZE % BLOCK_N == 0:
            # The whole tile lies in one cache block: one table lookup.
            blk = tl.load(bt_row + s // BLOCK_SIZE).to(tl.int64)
            k_off = blk * stride_kb + (t % BLOCK_SIZE) * stride_ks
            v_off = blk * stride_vb + (t % BLOCK_SIZE) * stride_vs
        else:
            blk = tl.load(bt_row + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            k_off = blk * stride_kb + (t % BLOCK_SIZE) * stride_ks
            v_off = blk * stride_vb + (t % BLOCK_SIZE) * stride_vs
        k = tl.load(k_head + k_off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(v_head + v_off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2e
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        tl.store(
            out_ptr + b * stride_ob + qh[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )
    else:
        # partials: o [B, Hq, S, D] (unnormalised), ml [B, Hq, S, 2] (max, sum), fp32.
        row = (b * (GROUP * tl.num_programs(1)) + qh) * NUM_SPLITS + sp
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr,
    part_ml_ptr,
    out_ptr,
    num_heads,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    smask = sp < NUM_SPLITS
    row = (b * num_heads + h) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l_ = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    w = tl.where(smask & (l_ > 0), w, 0.0)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(l_ * w, 0)
    den = tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, (num / den).to(out_ptr.dtype.element_ty))


def choose_num_splits(
    batch: int, num_kv_heads: int, max_tokens: int, device: torch.device, block_n: int = 64
) -> int:
    """Splits per sequence so that the grid covers the GPU about twice; shapes only."""
    programs = batch * num_kv_heads
    target = 2 * sm_count(device, on_cpu=132)
    if programs >= target:
        return 1
    splits = math.ceil(target / programs)
    # Keep at least a few tiles per split.
    return max(1, min(splits, max_tokens // (4 * block_n), 32))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [B, max_blocks] int32; context_lens [B] int32 (0 for padding rows: output 0).
    Returns [B, Hq, D] in q's dtype. config: optional BLOCK_N / num_warps / num_stages."""
    B, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and q.stride(2) == 1
    assert D & (D - 1) == 0, "head_dim must be a power of two"
    if scale is None:
        scale = D**-0.5
    group = Hq // Hkv
    group_pad = max(16, triton.next_power_of_2(group))
    cfg = config or {}
    block_n = cfg.get("BLOCK_N", 64 if D <= 128 else 32)
    if block_size < block_n and block_n % block_size != 0:
        block_n = max(16, triton.next_power_of_2(block_size))
    max_tokens = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, max_tokens, q.device, block_n)
    tokens_per_split = triton.cdiv(triton.cdiv(max_tokens, num_splits), block_n) * block_n
    if out is None:
        out = torch.empty_like(q)
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, D, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(B, Hq, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out  # unused
    grid = (B, Hkv, num_splits)
    _paged_decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_o,
        part_ml,
        scale * 1.4426950408889634,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        tokens_per_split,
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=D,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3),
    )
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](
            part_o,
            part_ml,
            out,
            Hq,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=D,
            num_warps=4,
        )
    return out
