"""What an attention layer needs to know about the batch (`AttnMetadata`), and the layer
that picks the kernel: dense variable-length attention when there is no cache (encoders,
embedding models), paged prefill (prompts or prompt chunks) or paged decode (one token per
sequence, static shapes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from coserve.engine.kernels import attention as ops


@dataclass
class AttnMetadata:
    mode: str  # "dense" (no cache) | "prefill" | "decode"
    causal: bool = True
    # dense and prefill: tokens per sequence in this batch (host ints, no device sync)
    query_lens: list[int] | None = None
    # paged (prefill and decode)
    slot_mapping: torch.Tensor | None = None   # [T] int64
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None   # [B] int32 (decode)
    context_lens_host: list[int] | None = None  # prefill

    @staticmethod
    def dense(query_lens: list[int], causal: bool) -> AttnMetadata:
        return AttnMetadata(mode="dense", causal=causal, query_lens=query_lens)


class Attention(nn.Module):
    """Scaled dot-product attention over q [T, H, D], k/v [T, KVH, D]. The KV cache tensors
    are bound by the engine after it sizes the cache (`k_cache`, `v_cache`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        if meta.mode == "dense":
            return ops.varlen_attention(q, k, v, meta.query_lens, self.scale, meta.causal)
        ops.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.mode == "prefill":
            return ops.paged_prefill_attention(q, k, v, self.k_cache, self.v_cache, meta.block_tables,
                                               meta.query_lens, meta.context_lens_host, self.scale)
        return ops.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                          meta.context_lens, self.scale)
