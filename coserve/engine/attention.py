"""What an attention layer needs to know about the batch (`AttnMetadata`), and the layer
that picks the kernel: dense variable-length attention when there is no cache (encoders,
embedding models), paged prefill (prompts or prompt chunks) or paged decode (one token per
sequence, static shapes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from coserve.engine.kernels import attention as ref
from coserve.engine.kernels import ops


@dataclass
class AttnMetadata:
    mode: str  # "dense" (no cache) | "prefill" (new prompt tokens, maybe decodes) | "decode"
    causal: bool = True
    # dense and prefill: tokens per sequence in this batch (host ints, no device sync)
    query_lens: list[int] | None = None
    # paged (prefill and decode)
    slot_mapping: torch.Tensor | None = None  # [T] int64
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32 (decode; prefill: its decodes)
    context_lens_host: list[int] | None = None  # prefill
    # prefill: the first num_decode sequences are decodes (one token each, first in the batch)
    num_decode: int = 0

    @staticmethod
    def dense(query_lens: list[int], causal: bool) -> AttnMetadata:
        return AttnMetadata(mode="dense", causal=causal, query_lens=query_lens)


class Attention(nn.Module):
    """Scaled dot-product attention over q [T, H, D], k/v [T, KVH, D]. The KV cache tensors
    are bound by the engine after it sizes the cache (`k_cache`, `v_cache`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttnMetadata,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """kv_stored: the caller already wrote this step's k/v into the cache."""
        if meta.mode == "dense":
            return ops.varlen_attention(q, k, v, meta.query_lens, self.scale, meta.causal)
        if not kv_stored:
            ref.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.mode == "prefill":
            d = meta.num_decode
            if d == 0:
                return ref.paged_prefill_attention(
                    q,
                    k,
                    v,
                    self.k_cache,
                    self.v_cache,
                    meta.block_tables,
                    meta.query_lens,
                    meta.context_lens_host,
                    self.scale,
                )
            out = torch.empty_like(q)
            out[:d] = ops.paged_decode_attention(
                q[:d],
                self.k_cache,
                self.v_cache,
                meta.block_tables[:d],
                meta.context_lens,
                self.scale,
            )
            out[d:] = ref.paged_prefill_attention(
                q[d:],
                k[d:],
                v[d:],
                self.k_cache,
                self.v_cache,
                meta.block_tables[d:],
                meta.query_lens[d:],
                meta.context_lens_host[d:],
                self.scale,
            )
            return out
        return ops.paged_decode_attention(
            q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale
        )
