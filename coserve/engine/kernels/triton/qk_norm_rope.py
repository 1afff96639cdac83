"""Qwen3 attention prologue in one kernel: from the fused q|k|v projection output, per token,
    q = rope(rms_norm(q_h) * q_weight),  k = rope(rms_norm(k_h) * k_weight)   (every head)
and, when a paged cache is given, k and v written into their cache slots (store_kvcache).
It replaces q_norm, k_norm, two apply_rotary and the two cache writes (six launches) with
one; the roundings follow the references (normalised x rounded to the dtype, times weight
rounded, rotated in float32, rounded). Slots < 0 are skipped (padding rows)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(
    x_ptr, w_ptr, cos, sin, h, hmask, i, eps, HALF: tl.constexpr, OUT_DTYPE: tl.constexpr
):
    x1 = tl.load(x_ptr + h[:, None] * (2 * HALF) + i[None, :], mask=hmask, other=0.0)
    x2 = tl.load(x_ptr + h[:, None] * (2 * HALF) + HALF + i[None, :], mask=hmask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)
    w1 = tl.load(w_ptr + i).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + i).to(tl.float32)[None, :]
    n1 = ((f1 * rstd[:, None]).to(OUT_DTYPE).to(tl.float32) * w1).to(OUT_DTYPE).to(tl.float32)
    n2 = ((f2 * rstd[:, None]).to(OUT_DTYPE).to(tl.float32) * w2).to(OUT_DTYPE).to(tl.float32)
    return (n1 * cos - n2 * sin).to(OUT_DTYPE), (n2 * cos + n1 * sin).to(OUT_DTYPE)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    qw_ptr,
    kw_ptr,
    pos_ptr,
    cs_ptr,
    q_out_ptr,
    k_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_t,
    stride_cs,
    stride_cb,
    stride_cs_slot,
    stride_ch,
    block_size,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    STORE_CACHE: tl.constexpr,
    WRITE_K: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    D: tl.constexpr = 2 * HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + i)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i)[None, :]
    row = qkv_ptr + t * stride_t

    hq = tl.arange(0, HQ_PAD)
    qmask = (hq < HQ)[:, None]
    y1, y2 = _norm_rope_heads(row, qw_ptr, cos, sin, hq, qmask, i, eps, HALF, OUT_DTYPE)
    q_out = q_out_ptr + (t * HQ + hq[:, None]) * D
    tl.store(q_out + i[None, :], y1, mask=qmask)
    tl.store(q_out + HALF + i[None, :], y2, mask=qmask)

    hk = tl.arange(0, HKV_PAD)
    kmask = (hk < HKV)[:, None]
    k1, k2 = _norm_rope_heads(row + HQ * D, kw_ptr, cos, sin, hk, kmask, i, eps, HALF, OUT_DTYPE)
    if WRITE_K:
        k_out = k_out_ptr + (t * HKV + hk[:, None]) * D
        tl.store(k_out + i[None, :], k1, mask=kmask)
        tl.store(k_out + HALF + i[None, :], k2, mask=kmask)
    if STORE_CACHE:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            off = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs_slot
            kc = k_cache_ptr + off + hk[:, None] * stride_ch
            tl.store(kc + i[None, :], k1, mask=kmask)
            tl.store(kc + HALF + i[None, :], k2, mask=kmask)
            v_src = row + (HQ + HKV) * D + hk[:, None] * D
            v1 = tl.load(v_src + i[None, :], mask=kmask, other=0.0)
            v2 = tl.load(v_src + HALF + i[None, :], mask=kmask, other=0.0)
            vc = v_cache_ptr + off + hk[:, None] * stride_ch
            tl.store(vc + i[None, :], v1, mask=kmask)
            tl.store(vc + HALF + i[None, :], v2, mask=kmask)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def qk_norm_rope(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) * D] (rows may be strided) -> (q [T, Hq, D], k [T, Hkv, D],
    v [T, Hkv, D] (a view of qkv)). With k_cache/v_cache [num_blocks, block_size, Hkv, D] and
    slot_mapping [T], k and v also land in the cache, as store_kvcache would put them.
    Equals: q = apply_rotary(rms_norm(q), ...), k likewise, store_kvcache(k, v, ...)."""
    T = qkv.shape[0]
    D = head_dim
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D and qkv.stride(1) == 1
    q = torch.empty(T, num_heads, D, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(T, num_kv_heads, D, device=qkv.device, dtype=qkv.dtype)
    v = qkv[:, (num_heads + num_kv_heads) * D :].view(T, num_kv_heads, D)
    store = k_cache is not None
    if cos_sin.stride(1) != 1:
        cos_sin = cos_sin.contiguous()
    if T > 0:
        _qk_norm_rope_kernel[(T,)](
            qkv,
            q_weight,
            k_weight,
            positions,
            cos_sin,
            q,
            k,
            k_cache if store else q,
            v_cache if store else q,
            slot_mapping if store else positions,
            qkv.stride(0),
            cos_sin.stride(0),
            k_cache.stride(0) if store else 0,
            k_cache.stride(1) if store else 0,
            k_cache.stride(2) if store else 0,
            k_cache.shape[1] if store else 1,
            eps,
            HQ=num_heads,
            HKV=num_kv_heads,
            HQ_PAD=triton.next_power_of_2(num_heads),
            HKV_PAD=triton.next_power_of_2(num_kv_heads),
            HALF=D // 2,
            STORE_CACHE=store,
            WRITE_K=True,
            OUT_DTYPE=_TL_DTYPES[qkv.dtype],
            num_warps=4,
        )
    return q, k, v
