"""Qwen3 decoder, dense and MoE (Qwen3-MoE), HF-compatible. Per layer:

    h = h + o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))     q|k|v = qkv_proj(rms(h))
    h = h + mlp(rms(h))       mlp = down(silu(gate(x)) * up(x))  or  top-k experts of it

Tokens of all sequences in a step are packed along one dimension [T, hidden]; `AttnMetadata`
says where each sequence starts and where its KV lives. Used for generation (with lm_head)
and as an embedding model (Qwen3-Embedding: last-token hidden state after the final norm).

Tensor parallel (Megatron style): each rank holds a slice of the query heads and of their kv
heads (kv heads replicated when there are fewer than ranks), a slice of every MLP's or
expert's intermediate dimension, and a slice of the vocabulary (embedding rows, lm_head
rows). o_proj, down_proj, the experts and the embedding lookup end in an all-reduce; the
logits are all-gathered. Norms and the router are replicated."""

from __future__ import annotations

import re

import torch
from torch import nn

from coserve.engine import parallel
from coserve.engine.attention import Attention, AttnMetadata
from coserve.engine.config import DecoderConfig, QuantConfig
from coserve.engine.kernels import ops
from coserve.engine.kernels.fp8 import Fp8Activation
from coserve.engine.kernels.rotary import rope_cos_sin_cache
from coserve.engine.layers import Linear, RMSNorm, Tensors, vocab_parallel_embedding
from coserve.engine.moe_weights import FusedMoEWeights


def _q(quant: QuantConfig | None, module_name: str) -> QuantConfig | None:
    return quant if quant is not None and quant.applies_to(module_name) else None


class Qwen3Attention(nn.Module):
    def __init__(self, c: DecoderConfig, prefix: str, quant, dtype, device) -> None:
        super().__init__()
        d = self.head_dim = c.head_dim
        q0, self.num_heads = parallel.split(c.num_heads, "num_attention_heads")
        kv0, self.num_kv_heads = parallel.kv_head_split(c.num_heads, c.num_kv_heads)
        q_size, kv_size = c.num_heads * d, c.num_kv_heads * d
        kv_rows = (kv0 * d, self.num_kv_heads * d)
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj = Linear(
            c.hidden_size,
            [q_size, kv_size, kv_size],
            bias=c.attention_bias,
            quant=_q(quant, prefix + ".q_proj"),
            **kw,
            out_shards=[(q0 * d, self.num_heads * d), kv_rows, kv_rows],
        )
        self.o_proj = Linear(
            q_size,
            [c.hidden_size],
            bias=c.attention_bias,
            quant=_q(quant, prefix + ".o_proj"),
            **kw,
            in_shard=(q0 * d, self.num_heads * d),
            reduce=True,
        )
        self.q_norm = RMSNorm(d, c.rms_norm_eps, **kw)
        self.k_norm = RMSNorm(d, c.rms_norm_eps, **kw)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d)
        self.cos_sin: torch.Tensor | None = None  # shared table, set by the model

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        meta: AttnMetadata,
        x_fp8: Fp8Activation | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        paged = meta.mode != "dense"
        # norms, rotary and (paged) the cache write in one kernel on the GPU
        q, k, v = ops.qk_norm_rope(
            self.qkv_proj(x, x_fp8),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.q_norm.weight,
            self.k_norm.weight,
            self.q_norm.eps,
            positions,
            self.cos_sin,
            self.attn.k_cache if paged else None,
            self.attn.v_cache if paged else None,
            meta.slot_mapping if paged else None,
        )
        o = self.attn(q, k, v, meta, kv_stored=paged)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    # the FP8 input its gate_up GEMM (cuBLAS) takes: scales column-major
    column_major_scales = True

    def __init__(self, hidden: int, inter: int, prefix: str, quant, dtype, device) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        part = parallel.split(inter, "intermediate_size")
        self.gate_up_proj = Linear(
            hidden,
            [inter, inter],
            quant=_q(quant, prefix + ".gate_proj"),
            out_shards=[part, part],
            **kw,
        )
        self.down_proj = Linear(
            inter,
            [hidden],
            quant=_q(quant, prefix + ".down_proj"),
            in_shard=part,
            reduce=True,
            **kw,
        )

    def takes_fp8(self, tokens: int) -> bool:
        return self.gate_up_proj.quant is not None

    def forward(self, x: torch.Tensor, x_fp8: Fp8Activation | None = None) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x, x_fp8)))


class Qwen3MoE(nn.Module):
    """Tensor parallel: a slice of every expert per rank, or (expert parallel) whole experts,
    an even share per rank; the router is replicated and the output all-reduced either way."""

    # GEMM1 reads x's FP8 scales row-major: on an H200 (2026-12-02, fused_prologues.py)
    # column-major ones cost fused_moe ~5 us at T=512
    column_major_scales = False
    # Below this many tokens the experts quantise x themselves: on an H200 (2026-12-02,
    # fused_prologues.py, three calls) x from the norm saved 0.6 us at T=16, 0.8-1.1 at
    # T=64, 0.8 at T=512, but cost 2.8-3.0 us at T=1 (not traced; T=2..15 not measured)
    fp8_from_norm_min_tokens = 16

    def __init__(self, c: DecoderConfig, prefix: str, quant, dtype, device) -> None:
        super().__init__()
        self.top_k, self.renormalize = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Linear(c.hidden_size, [c.num_experts], quant=None, dtype=dtype, device=device)
        self.expert_parallel = parallel.state().expert_parallel
        if self.expert_parallel:
            shards = dict(expert_shard=parallel.split(c.num_experts, "num_experts"))
        else:
            shards = dict(
                inter_shard=parallel.split(c.moe_intermediate_size, "moe_intermediate_size")
            )
        self.experts = FusedMoEWeights(
            c.num_experts,
            c.hidden_size,
            c.moe_intermediate_size,
            quant=_q(quant, prefix + ".experts"),
            dtype=dtype,
            device=device,
            **shards,
        )

    def takes_fp8(self, tokens: int) -> bool:
        return self.experts.quant is not None and tokens >= self.fp8_from_norm_min_tokens

    def forward(self, x: torch.Tensor, x_fp8: Fp8Activation | None = None) -> torch.Tensor:
        weights, ids = ops.topk_softmax(self.gate(x), self.top_k, self.renormalize)
        e = self.experts
        kw = {}
        if self.expert_parallel:  # local expert ids; those of other ranks become E
            first, held = e.expert_shard
            ids = ids - first
            ids = ids.masked_fill((ids < 0) | (ids >= held), held)
            kw["foreign"] = True
        out = ops.fused_moe(
            x,
            e.w13,
            e.w2,
            weights,
            ids,
            e.w13_scale,
            e.w2_scale,
            e.quant.block if e.quant is not None else None,
            x_fp8=x_fp8,
            **kw,
        )
        return parallel.all_reduce(out)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig, i: int, quant, dtype, device) -> None:
        super().__init__()
        prefix = f"model.layers.{i}"
        kw = dict(dtype=dtype, device=device)
        self.self_attn = Qwen3Attention(c, prefix + ".self_attn", quant, dtype, device)
        if c.is_moe_layer(i):
            self.mlp = Qwen3MoE(c, prefix + ".mlp", quant, dtype, device)
        else:
            self.mlp = Qwen3MLP(
                c.hidden_size, c.intermediate_size, prefix + ".mlp", quant, dtype, device
            )
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttnMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (this layer's mlp output, the residual stream before it); the
        stream is h + residual, added inside the next norm (one fused kernel on the GPU)."""
        # on the GPU each norm also quantises its output for the FP8 GEMM after it
        h, residual, h_fp8 = self.input_layernorm.prologue(
            h, residual, self.self_attn.qkv_proj.quant is not None
        )
        h = self.self_attn(positions, h, meta, h_fp8)
        h, residual, h_fp8 = self.post_attention_layernorm.prologue(
            h, residual, self.mlp.takes_fp8(h.shape[0]), self.mlp.column_major_scales
        )
        return self.mlp(h, h_fp8), residual


class Qwen3Model(nn.Module):
    def __init__(self, c: DecoderConfig, quant, dtype, device) -> None:
        super().__init__()
        self.embed_tokens = Tensors()
        self.vocab_rows = parallel.padded_split(c.vocab_size)
        self.embed_tokens.add(
            "weight",
            (c.vocab_size, c.hidden_size),
            "normal",
            dtype=dtype,
            device=device,
            rows=self.vocab_rows,
        )
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(c, i, quant, dtype, device) for i in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, device=device)
        cos_sin = rope_cos_sin_cache(c.head_dim, c.max_position_embeddings, c.rope_theta, device)
        for layer in self.layers:
            layer.self_attn.cos_sin = cos_sin

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        h = vocab_parallel_embedding(input_ids, self.embed_tokens.weight, self.vocab_rows[0])
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, meta)
        return self.norm(h, residual)[0]


_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
    "gate": ("gate", 0),
}
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LINEAR = re.compile(r"(.*)\.(\w+)\.(weight|bias)$")


class Qwen3ForCausalLM(nn.Module):
    def __init__(
        self, c: DecoderConfig, *, with_lm_head: bool, dtype, device, quant: QuantConfig | None
    ) -> None:
        super().__init__()
        self.config = c
        self.model = Qwen3Model(c, quant, dtype, device)
        self.lm_head: Linear | None = None
        if with_lm_head and not c.tie_word_embeddings:
            self.lm_head = Linear(
                c.hidden_size,
                [c.vocab_size],
                quant=_q(quant, "lm_head"),
                dtype=dtype,
                device=device,
                out_shards=[parallel.padded_split(c.vocab_size)],
            )
        self.with_lm_head = with_lm_head

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, vocab] in the model's dtype (greedy sampling needs no float32 copy of them);
        under tensor parallelism every rank computes its vocabulary slice and gets them all."""
        if self.lm_head is None:
            logits = nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return parallel.gather_last_dim(logits, self.config.vocab_size)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N] int64: argmax of the logits of `hidden` [N, H], as `compute_logits(...).argmax`
        gives, without gathering the logits across ranks (each rank reduces its slice)."""
        if self.lm_head is None:
            logits = nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return parallel.argmax_last_dim(logits, self.model.vocab_rows[0], self.config.vocab_size)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weight(
        self,
        name: str,
        tensor: torch.Tensor,
        scale: torch.Tensor | None = None,
        block: tuple[int, int] | None = None,
    ) -> bool:
        """Route one HF tensor to its place; False if this model has no use for it."""
        if not name.startswith(("model.", "lm_head.")):
            name = "model." + name  # checkpoints saved from the bare Qwen3Model
        if name == "lm_head.weight":
            if self.lm_head is None:
                return False
            self.lm_head.load_shard(0, "weight", tensor, scale, block)
            return True
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            self.get_submodule(name.rsplit(".", 1)[0]).load("weight", tensor)
            return True
        if m := _EXPERT.match(name):
            experts = self.get_submodule(m.group(1))
            experts.load_expert(int(m.group(2)), m.group(3), tensor, scale, block)
            return True
        if m := _FUSED_EXPERTS.match(name):  # transformers 5 in-memory layout [E, 2I, H], [E, H, I]
            experts = self.get_submodule(m.group(1))
            for e in range(tensor.shape[0]):
                if m.group(2) == "down_proj":
                    experts.load_expert(e, "down", tensor[e])
                else:
                    gate, up = tensor[e].chunk(2, dim=0)
                    experts.load_expert(e, "gate", gate)
                    experts.load_expert(e, "up", up)
            return True
        if m := _LINEAR.match(name):
            parent, leaf, kind = m.groups()
            if leaf in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"):
                self.get_submodule(f"{parent}.{leaf}").load("weight", tensor)
                return True
            if leaf in _STACKED:
                target, shard = _STACKED[leaf]
                self.get_submodule(f"{parent}.{target}").load_shard(
                    shard, kind, tensor, scale, block
                )
                return True
        return False
