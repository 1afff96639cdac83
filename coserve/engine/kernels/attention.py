"""Attention references: dense variable-length attention and paged attention over a block KV
cache. Layouts (one token per row, sequences packed back to back):

    q            [T, num_heads, head_dim]
    k, v         [T, num_kv_heads, head_dim]          (grouped-query: heads share kv heads)
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache alike)
    slot_mapping [T]            slot = block_id * block_size + offset, where token t's k/v go
    block_tables [B, max_blocks] the cache blocks of each sequence, in order
    context_lens [B]            tokens of each sequence in the cache after this step

A Triton paged-decode kernel with `paged_decode_attention`'s signature replaces the decode
reference on the GPU; the references stay the ground truth for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's k/v into its slot of the paged cache."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None
) -> torch.Tensor:
    """One sequence: q [Lq, H, D], k/v [Lk, KVH, D]. With causal_offset = Lk - Lq, query i
    sees keys 0 .. causal_offset + i; None means bidirectional."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = None
    if causal_offset:
        qi = torch.arange(lq, device=q.device)[:, None] + causal_offset
        kj = torch.arange(lk, device=q.device)[None, :]
        mask = kj <= qi
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        is_causal=causal_offset == 0,
    )
    return out.transpose(0, 1)


def _length_groups(lens: list[int], waste: float = 2.0) -> list[list[int]]:
    """Sequence indices grouped by similar length, so that padding each group to its longest
    member costs at most `waste` x its real tokens."""
    groups: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in sorted(range(len(lens)), key=lens.__getitem__):
        n = lens[i]
        if cur and (len(cur) + 1) * n > waste * (tokens + n):
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        groups.append(cur)
    return groups


def _padded_attention(
    q, k, v, out, starts: list[int], lens: list[int], idx: list[int], scale: float, causal: bool
) -> None:
    """Sequences `idx` (token ranges starts[i] .. + lens[i] of q/k/v) padded to one batch and
    attended in a single SDPA call; results written into `out`."""
    dev = q.device
    glens = torch.tensor([lens[i] for i in idx], device=dev)
    longest = max(lens[i] for i in idx)
    pos = torch.arange(longest, device=dev)
    valid = pos[None, :] < glens[:, None]  # [B, L]
    tok = torch.tensor([starts[i] for i in idx], device=dev)[:, None] + pos[None, :]
    tok = torch.where(valid, tok, 0)  # [B, L] token index
    group = q.shape[1] // k.shape[1]
    qb = q[tok].transpose(1, 2)  # [B, H, L, D]
    kb = k[tok].repeat_interleave(group, dim=2).transpose(1, 2)
    vb = v[tok].repeat_interleave(group, dim=2).transpose(1, 2)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])[None, None]
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    out[tok[valid]] = ob.transpose(1, 2)[valid]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Dense attention of packed sequences without a cache (prefill, encoders). Sequences of
    similar length are padded into one batched call."""
    out = torch.empty_like(q)
    starts = [0]
    for n in seq_lens[:-1]:
        starts.append(starts[-1] + n)
    for idx in _length_groups(seq_lens):
        if len(idx) == 1:
            i = idx[0]
            sl = slice(starts[i], starts[i] + seq_lens[i])
            out[sl] = _sdpa(q[sl], k[sl], v[sl], scale, 0 if causal else None)
        else:
            _padded_attention(q, k, v, out, starts, seq_lens, idx, scale, causal)
    return out


def _gather_seq_kv(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    nblocks = -(-ctx_len // cache.shape[1])
    kv = cache[block_table[:nblocks]]  # [nblocks, block_size, KVH, D]
    return kv.reshape(-1, *cache.shape[2:])[:ctx_len]


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of new query tokens (a prompt, or a chunk of one) against everything
    their sequence has in the cache, new tokens included (store_kvcache ran first). k/v are
    this step's new tokens: a sequence with nothing cached before (query_len == context_len)
    attends to them directly, batched with the others; one with a cached prefix (a chunked
    prefill going on) reads its keys from the cache."""
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens[:-1]:
        starts.append(starts[-1] + n)
    fresh = [i for i, (lq, lk) in enumerate(zip(query_lens, context_lens, strict=True)) if lq == lk]
    if len(fresh) == len(query_lens):
        return varlen_attention(q, k, v, query_lens, scale, causal=True)
    for i, (lq, lk) in enumerate(zip(query_lens, context_lens, strict=True)):
        if lq == lk:
            continue
        sl = slice(starts[i], starts[i] + lq)
        kc = _gather_seq_kv(k_cache, block_tables[i], lk)
        vc = _gather_seq_kv(v_cache, block_tables[i], lk)
        out[sl] = _sdpa(q[sl], kc, vc, scale, lk - lq)
    for idx in _length_groups([query_lens[i] for i in fresh]):
        seqs = [fresh[j] for j in idx]
        if len(seqs) == 1:
            i = seqs[0]
            sl = slice(starts[i], starts[i] + query_lens[i])
            out[sl] = _sdpa(q[sl], k[sl], v[sl], scale, 0)
        else:
            _padded_attention(q, k, v, out, starts, query_lens, seqs, scale, True)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] attends to the first context_lens[b] cached
    tokens of its sequence. Shapes are static (B padded to a bucket, block_tables at full
    width); this reference reads only as many block columns as the longest context needs."""
    bsz, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = -(-int(context_lens.max()) // block_size)
    tables = block_tables[:, :max_blocks]
    k = k_cache[tables].reshape(bsz, -1, num_kv_heads, head_dim)  # [B, L, KVH, D]
    v = v_cache[tables].reshape(bsz, -1, num_kv_heads, head_dim)
    qg = q.view(bsz, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    valid = pos[None, :] < context_lens[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.reshape(bsz, num_heads, head_dim).to(q.dtype)
