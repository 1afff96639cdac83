"""BERT encoder (post-norm), HF-compatible, as all-MiniLM-L6-v2 uses it:

    h = LN(word[ids] + pos[positions] + type[0])
    h = LN(h + o(attn(q(h), k(h), v(h))))        bidirectional, per sequence
    h = LN(h + fc2(gelu(fc1(h))))

Sequences are packed [T, hidden]; `AttnMetadata.dense(query_lens, causal=False)` separates them.
Tensor parallel: heads and fc1's channels split across ranks (o and fc2 all-reduce), word
embeddings split by vocabulary rows; norms, position and type embeddings replicated."""

from __future__ import annotations

import re

import torch
from torch import nn

from coserve.engine import parallel
from coserve.engine.attention import Attention, AttnMetadata
from coserve.engine.config import BertConfig
from coserve.engine.kernels.activation import gelu
from coserve.engine.layers import LayerNorm, Linear, Tensors, vocab_parallel_embedding


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig, dtype, device) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        h0, self.num_heads = parallel.split(c.num_heads, "num_attention_heads")
        self.head_dim = d = c.head_dim
        heads = (h0 * d, self.num_heads * d)
        inter = parallel.split(c.intermediate_size, "intermediate_size")
        self.qkv_proj = Linear(
            c.hidden_size, [c.hidden_size] * 3, bias=True, out_shards=[heads] * 3, **kw
        )
        self.o_proj = Linear(
            c.hidden_size, [c.hidden_size], bias=True, in_shard=heads, reduce=True, **kw
        )
        self.attn_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.fc1 = Linear(c.hidden_size, [c.intermediate_size], bias=True, out_shards=[inter], **kw)
        self.fc2 = Linear(
            c.intermediate_size, [c.hidden_size], bias=True, in_shard=inter, reduce=True, **kw
        )
        self.ffn_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.attn = Attention(self.num_heads, self.num_heads, d)

    def forward(self, h: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = (
            x.reshape(t, self.num_heads, self.head_dim) for x in self.qkv_proj(h).chunk(3, -1)
        )
        a = self.attn(q, k, v, meta).reshape(t, -1)
        h = self.attn_norm(h + self.o_proj(a))
        return self.ffn_norm(h + self.fc2(gelu(self.fc1(h))))


_HF = {  # HF suffix inside encoder.layer.N -> (our module, shard)
    "attention.self.query": ("qkv_proj", 0),
    "attention.self.key": ("qkv_proj", 1),
    "attention.self.value": ("qkv_proj", 2),
    "attention.output.dense": ("o_proj", 0),
    "intermediate.dense": ("fc1", 0),
    "output.dense": ("fc2", 0),
    "attention.output.LayerNorm": ("attn_norm", None),
    "output.LayerNorm": ("ffn_norm", None),
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


class BertModel(nn.Module):
    def __init__(self, c: BertConfig, *, dtype, device) -> None:
        super().__init__()
        self.config = c
        kw = dict(dtype=dtype, device=device)
        self.embeddings = Tensors()
        self.vocab_rows = parallel.padded_split(c.vocab_size)
        self.embeddings.add(
            "word", (c.vocab_size, c.hidden_size), "normal", rows=self.vocab_rows, **kw
        )
        self.embeddings.add("position", (c.max_position_embeddings, c.hidden_size), "normal", **kw)
        self.embeddings.add("token_type", (c.type_vocab_size, c.hidden_size), "normal", **kw)
        self.emb_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.layers = nn.ModuleList(BertLayer(c, dtype, device) for _ in range(c.num_layers))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        e = self.embeddings
        h = (
            vocab_parallel_embedding(input_ids, e.word, self.vocab_rows[0])
            + e.position[positions]
            + e.token_type[0]
        )
        h = self.emb_norm(h)
        for layer in self.layers:
            h = layer(h, meta)
        return h

    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers]

    def load_weight(self, name: str, tensor: torch.Tensor, scale=None, block=None) -> bool:
        name = name.removeprefix("bert.")
        kind_of = {"gamma": "weight", "beta": "bias"}
        if name.startswith("embeddings."):
            rest = name.removeprefix("embeddings.")
            emb = {
                "word_embeddings.weight": "word",
                "position_embeddings.weight": "position",
                "token_type_embeddings.weight": "token_type",
            }
            if rest in emb:
                self.embeddings.load(emb[rest], tensor)
                return True
            if rest.startswith("LayerNorm."):
                kind = rest.split(".")[1]
                self.emb_norm.load(kind_of.get(kind, kind), tensor)
                return True
            return False  # position_ids buffer
        m = _LAYER.match(name)
        if not m or m.group(2) not in _HF:
            return False  # pooler, heads
        layer = self.layers[int(m.group(1))]
        target, shard = _HF[m.group(2)]
        kind = kind_of.get(m.group(3), m.group(3))
        module = getattr(layer, target)
        if shard is None:
            module.load(kind, tensor)
        else:
            module.load_shard(shard, kind, tensor, scale, block)
        return True
