"""Paged decode attention with the work balanced over the whole batch's KV tiles.

A variant of `paged_attention.paged_decode_attention` (same signature, same math) for decode
batches whose contexts differ a lot (the study: C=512, contexts 30..542), where one program
per (sequence, KV head) ends in a tail: the long sequences' programs stream while most SMs
idle. Here each context is cut into tiles of BLOCK_N tokens, all sequences' tiles are laid
end to end, and a fixed grid of G programs per KV head takes equal consecutive ranges of
that list, so every program reads about the same bytes whatever the lengths:

1. Tile offsets: tiles per sequence and their prefix sum, T = total tiles; every program of
   both kernels computes them in registers from the B context lengths (no extra launch).
2. `_balanced_kernel`, grid (G, Hkv): program p takes tiles [p * T // G', (p+1) * T // G'),
   G' = min(G, T) so that no range is empty, walks the sequences they belong to (GQA group
   read once per tile, online softmax) and writes a sequence's output when its range holds
   all of it, else the unnormalised partial (acc, max, sum) in one of its two slots (0: its
   first sequence, 1: its last). FLAT=True walks the range in one loop whose sequence changes
   inside it (prefetch across sequence boundaries); the default has a loop per sequence.
3. `_merge_kernel`, grid (B, Hkv): merges the partials of a sequence that programs share
   (found by the same arithmetic), writes zeros for context_lens 0, else exits at once.

G depends on the SM count and Hkv, the partial buffers on G, Hkv, group and head_dim: no host
sync, CUDA-graph capturable, and a replay follows new lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coserve.engine.kernels.triton.sm_count import sm_count

_INT32_MAX = tl.constexpr(2**31 - 1)  # jitted code reads only constexpr globals


@triton.jit
def _tile_ends(context_lens_ptr, B, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr):
    """Per sequence (lanes >= B: int32 max), the end of its tiles in the batch's tile list,
    and the list's length (int64). Every program computes this itself from the B context
    lengths (a few KB from L2): no extra launch and no dependency between kernels."""
    i = tl.arange(0, B_PAD)
    live = i < B
    ctx = tl.load(context_lens_ptr + i, mask=live, other=0)
    tiles = (ctx + BLOCK_N - 1) // BLOCK_N
    ends = tl.cumsum(tiles, 0)
    return tl.where(live, ends, _INT32_MAX), tl.sum(tiles, 0).to(tl.int64)


@triton.jit
def _seq_tiles(ends, b, context_lens_ptr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr):
    """(first tile, end tile, context length) of sequence b."""
    last = tl.sum(tl.where(tl.arange(0, B_PAD) == b, ends, 0), 0)
    ctx = tl.load(context_lens_ptr + b)
    return last - (ctx + BLOCK_N - 1) // BLOCK_N, last, ctx


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_head,
    v_head,
    bt_row,
    s,
    ctx,
    scale_log2e,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with tokens s .. s + BLOCK_N of a sequence."""
    d = tl.arange(0, HEAD_DIM)
    t = s + tl.arange(0, BLOCK_N)
    tmask = t < ctx
    if BLOCK_SIZE % BLOCK_N == 0:
        # The whole tile lies in one cache block: one table lookup.
        blk = tl.load(bt_row + s // BLOCK_SIZE).to(tl.int64)
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
    pr = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _flush(
    acc,
    m_i,
    l_i,
    whole,
    b,
    slot,
    p,
    kvh,
    num_kv,
    out_ptr,
    part_o_ptr,
    part_ml_ptr,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Sequence b's output when this program saw all of it (`whole`), else its partial."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    gmask = g < GROUP
    if whole:
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(
            out_ptr + b * stride_ob + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :],
            (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )
    else:
        row = ((p * num_kv + kvh) * 2 + slot) * GROUP + g
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _balanced_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_o_ptr,
    part_ml_ptr,
    scale_log2e,
    B,
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
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    B_PAD: tl.constexpr,
    FLAT: tl.constexpr,
):
    p = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv = tl.num_programs(1)
    ends, total = _tile_ends(context_lens_ptr, B, BLOCK_N, B_PAD)
    # Never more programs than tiles, so that every range is non-empty (the merge relies on it).
    num_progs = tl.maximum(tl.minimum(tl.num_programs(0), total), 1)
    t0 = tl.minimum(p * total // num_progs, total).to(tl.int32)
    t1 = tl.minimum((p + 1) * total // num_progs, total).to(tl.int32)
    # First and last sequence of this range: count the sequences that end at or before.
    b0 = tl.sum((ends <= t0).to(tl.int32), 0)
    b1 = tl.sum((ends <= t1 - 1).to(tl.int32), 0)
    b1 = tl.where(t1 > t0, b1, b0 - 1)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    gmask = g < GROUP
    q_off = (kvh * GROUP + g)[:, None] * stride_qh + d[None, :]
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    if FLAT:
        # One loop over the range's tiles, sequence switches inside it, so that the
        # pipeliner's prefetch runs across sequence boundaries.
        for j in range(t0, t1):
            b = tl.sum((ends <= j).to(tl.int32), 0)
            first, last, ctx = _seq_tiles(ends, b, context_lens_ptr, BLOCK_N, B_PAD)
            q = tl.load(q_ptr + b * stride_qb + q_off, mask=gmask[:, None], other=0.0)
            m_i, l_i, acc = _attend_tile(
                q,
                m_i,
                l_i,
                acc,
                k_head,
                v_head,
                block_tables_ptr + b * stride_bt,
                (j - first) * BLOCK_N,
                ctx,
                scale_log2e,
                stride_kb,
                stride_ks,
                stride_vb,
                stride_vs,
                BLOCK_SIZE,
                BLOCK_N,
                HEAD_DIM,
            )
            done = (j == last - 1) | (j == t1 - 1)
            if done:
                whole = (first >= t0) & (last <= t1)
                slot = tl.where(b == b0, 0, 1)
                _flush(
                    acc,
                    m_i,
                    l_i,
                    whole,
                    b,
                    slot,
                    p,
                    kvh,
                    num_kv,
                    out_ptr,
                    part_o_ptr,
                    part_ml_ptr,
                    stride_ob,
                    stride_oh,
                    GROUP,
                    GROUP_PAD,
                    HEAD_DIM,
                )
            m_i = tl.where(done, float("-inf"), m_i)
            l_i = tl.where(done, 0.0, l_i)
            acc = tl.where(done, 0.0, acc)
    else:
        for b in range(b0, b1 + 1):
            first, last, ctx = _seq_tiles(ends, b, context_lens_ptr, BLOCK_N, B_PAD)
            lo = tl.maximum(t0, first)
            hi = tl.minimum(t1, last)
            q = tl.load(q_ptr + b * stride_qb + q_off, mask=gmask[:, None], other=0.0)
            m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            bt_row = block_tables_ptr + b * stride_bt
            for j in range(lo, hi):
                m_i, l_i, acc = _attend_tile(
                    q,
                    m_i,
                    l_i,
                    acc,
                    k_head,
                    v_head,
                    bt_row,
                    (j - first) * BLOCK_N,
                    ctx,
                    scale_log2e,
                    stride_kb,
                    stride_ks,
                    stride_vb,
                    stride_vs,
                    BLOCK_SIZE,
                    BLOCK_N,
                    HEAD_DIM,
                )
            if hi > lo:
                _flush(
                    acc,
                    m_i,
                    l_i,
                    (lo == first) & (hi == last),
                    b,
                    tl.where(b == b0, 0, 1),
                    p,
                    kvh,
                    num_kv,
                    out_ptr,
                    part_o_ptr,
                    part_ml_ptr,
                    stride_ob,
                    stride_oh,
                    GROUP,
                    GROUP_PAD,
                    HEAD_DIM,
                )


@triton.jit
def _merge_kernel(
    part_o_ptr,
    part_ml_ptr,
    context_lens_ptr,
    out_ptr,
    B,
    grid_progs,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    B_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv = tl.num_programs(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    gmask = g < GROUP
    out_ptrs = out_ptr + b * stride_ob + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :]
    ends, total = _tile_ends(context_lens_ptr, B, BLOCK_N, B_PAD)
    num_progs = tl.maximum(tl.minimum(grid_progs, total), 1)
    first, last, _ = _seq_tiles(ends, b, context_lens_ptr, BLOCK_N, B_PAD)
    if last == first:
        zeros = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        tl.store(out_ptrs, zeros.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        # program holding tile t: the largest p with p * total // num_progs <= t
        p_first = (((first + 1) * num_progs + total - 1) // total - 1).to(tl.int32)
        p_last = ((last * num_progs + total - 1) // total - 1).to(tl.int32)
        if p_first != p_last:
            m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            for p in range(p_first, p_last + 1):
                # slot 1 only where the sequence is not the first one of program p's range
                starts_before = (p == p_first) & (p * total // num_progs < first)
                slot = tl.where(starts_before, 1, 0)
                row = ((p * num_kv + kvh) * 2 + slot) * GROUP + g
                m_p = tl.load(part_ml_ptr + row * 2, mask=gmask, other=0.0)
                l_p = tl.load(part_ml_ptr + row * 2 + 1, mask=gmask, other=0.0)
                o_p = tl.load(
                    part_o_ptr + row[:, None] * HEAD_DIM + d[None, :],
                    mask=gmask[:, None],
                    other=0.0,
                )
                m_new = tl.maximum(m_i, m_p)
                alpha = tl.exp2(m_i - m_new)
                beta = tl.exp2(m_p - m_new)
                l_i = l_i * alpha + l_p * beta
                acc = acc * alpha[:, None] + o_p * beta[:, None]
                m_i = m_new
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            tl.store(
                out_ptrs, (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None]
            )


def num_programs(num_kv_heads: int, device: torch.device, programs_per_sm: int = 4) -> int:
    """G, the programs per KV head: about `programs_per_sm` x SMs in all; shapes only."""
    return max(1, triton.cdiv(programs_per_sm * sm_count(device, on_cpu=132), num_kv_heads))


def paged_decode_attention_balanced(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [B, max_blocks] int32; context_lens [B] int32 (0 for padding rows: output 0).
    Returns [B, Hq, D] in q's dtype. config: optional BLOCK_N, num_warps, num_stages, and
    PROGRAMS_PER_SM (G x Hkv ~ PROGRAMS_PER_SM x SMs; default 4) or PROGRAMS (G itself),
    FLAT (one loop over the range's tiles instead of one per sequence; default False).
    Raises ValueError on bad shapes."""
    B, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache/v_cache {tuple(k_cache.shape)}")
    if D & (D - 1) != 0:
        raise ValueError(f"head_dim {D} must be a power of two")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    if scale is None:
        scale = D**-0.5
    group = Hq // Hkv
    group_pad = max(16, triton.next_power_of_2(group))
    cfg = config or {}
    block_n = cfg.get("BLOCK_N", 64 if D <= 128 else 32)
    if block_size < block_n and block_n % block_size != 0:
        block_n = max(16, triton.next_power_of_2(block_size))
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    G = cfg.get("PROGRAMS") or num_programs(Hkv, q.device, cfg.get("PROGRAMS_PER_SM", 4))
    b_pad = triton.next_power_of_2(B)
    part_o = torch.empty(G * Hkv * 2 * group, D, device=q.device, dtype=torch.float32)
    part_ml = torch.empty(G * Hkv * 2 * group, 2, device=q.device, dtype=torch.float32)
    _balanced_kernel[(G, Hkv)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_o,
        part_ml,
        scale * 1.4426950408889634,
        B,
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
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=D,
        BLOCK_N=block_n,
        B_PAD=b_pad,
        FLAT=bool(cfg.get("FLAT", False)),
        num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3),
    )
    _merge_kernel[(B, Hkv)](
        part_o,
        part_ml,
        context_lens,
        out,
        B,
        G,
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=D,
        BLOCK_N=block_n,
        B_PAD=b_pad,
        num_warps=4,
    )
    return out
