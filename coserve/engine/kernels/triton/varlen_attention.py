"""Dense attention of packed variable-length sequences, no KV cache (embedding models,
encoders): the twin of `coserve.engine.kernels.attention.varlen_attention`.

One program per (sequence, tile of BLOCK_M queries, KV head). It takes the queries of the
GROUP query heads that share its KV head as one tile of GROUP x BLOCK_M rows, walks the
sequence's keys in tiles of BLOCK_N with an online softmax (running max `m`, sum `l`,
accumulator `acc`), so each K/V tile is read once for the whole group, and writes its rows
of the packed output: no padding, no gathered copies of q/k/v, no repeat of the KV heads,
and no host synchronisation. The reference pads sequences of similar length into one SDPA
call; on qwen3-embedding-8b's 8,192-token passes of 32-token inputs its gathers, KV-head
repeats and scatter took ~23 ms a pass beside ~11 ms of SDPA, this kernel 2.6 ms in all
(benchmarks/engine_embed.py --profile-steps, nvidia-h200, 2026-12-01).

Math per query head h and query i of a sequence (s_ij over its own keys j; causal: j <= i):
    s_ij = scale * <q_i, k_j>,   p_ij = softmax_j(s_ij),   out_i = sum_j p_ij v_j
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from coserve.engine.host_copy import to_device


@triton.jit
def _varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_seqlens_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    b = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    kvh = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + b)
    length = tl.load(cu_seqlens_ptr + b + 1) - start
    if m0 >= length:
        return
    # one row per (query head of this KV head's group, query): head-major, so that the
    # group's GROUP_PAD x BLOCK_M rows share each K/V tile
    r = tl.arange(0, GROUP_PAD * BLOCK_M)
    head = kvh * GROUP + r // BLOCK_M
    offs_m = m0 + r % BLOCK_M
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_r = (offs_m < length) & (r // BLOCK_M < GROUP)
    mask_d = offs_d < HEAD_DIM
    rows = (start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD * BLOCK_M], tl.float32)
    acc = tl.zeros([GROUP_PAD * BLOCK_M, HEAD_DIM_PAD], tl.float32)
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        keys = (start + offs_n).to(tl.int64)
        kt = tl.load(
            k_ptr + keys[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt) * scale_log2e
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows past the sequence's end (or the group's) see no key: keep their max finite
        m_new = tl.where(mask_r, m_new, 0.0)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_ptr + keys[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    out = acc / tl.where(mask_r, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (H a multiple of KVH), sequences of `seq_lens` tokens
    packed back to back (sum = T) -> out [T, H, D] in q's dtype. Raises ValueError when the
    lengths do not add up to T or the heads do not group."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if sum(seq_lens) != t or k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"sequence lengths add up to {sum(seq_lens)}, q/k/v have {t} tokens")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    out = torch.empty_like(q)
    if t == 0:
        return out
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + n)
    cu_seqlens = to_device(cu, torch.int32, q.device)
    longest = max(seq_lens)
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    # tiles no longer than the longest sequence (32-token inputs waste no half-empty tile),
    # and at most 128 rows of queries a program with the group's heads
    block = max(16, min(64, triton.next_power_of_2(longest), 128 // group_pad))
    grid = (len(seq_lens), triton.cdiv(longest, block), kv_heads)
    _varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=d,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block,
        BLOCK_N=block,
        CAUSAL=causal,
    )
    return out
