"""Model configurations as dataclasses, parsed from an HF `config.json` dict (both the
transformers 4.x spelling, e.g. `rope_theta`/`num_experts`, and the 5.x one,
`rope_parameters`/`num_local_experts`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class QuantConfig:
    """FP8 block quantisation as Qwen3-*-FP8 checkpoints declare it."""

    block: tuple[int, int] = (128, 128)
    modules_to_not_convert: list[str] = field(default_factory=list)

    def applies_to(self, module_name: str) -> bool:
        """False for modules the checkpoint keeps unquantised. Entries name a module in full
        ("model.layers.0.mlp.gate") or by its trailing part ("mlp.gate", "lm_head")."""
        return not any(
            module_name == s or module_name.endswith("." + s) for s in self.modules_to_not_convert
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


@dataclass
class DecoderConfig:
    """Qwen3 (dense) and Qwen3-MoE decoders."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MoE (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    quant: QuantConfig | None = None
    arch: str = "qwen3"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    arch: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ModelConfig = DecoderConfig | BertConfig


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise NotImplementedError(f"rope type {kind!r} is not supported (only default rope)")
    return float(d.get("rope_theta", params.get("rope_theta", 10000.0)))


def _quant(d: dict[str, Any]) -> QuantConfig | None:
    q = d.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or not q.get("weight_block_size"):
        raise NotImplementedError(
            f"unsupported quantization_config {q!r}: only FP8 with "
            "weight_block_size (as Qwen3-*-FP8) is supported"
        )
    return QuantConfig(
        block=tuple(q["weight_block_size"]),
        modules_to_not_convert=list(q.get("modules_to_not_convert") or []),
    )


def parse_hf_config(
    d: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelConfig:
    model_type = d.get("model_type", "")
    if model_type == "bert":
        return BertConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=d.get("hidden_act", "gelu"),
        )
    if model_type not in ("qwen3", "qwen3_moe"):
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported (supported: qwen3, qwen3_moe, bert)"
        )
    eos = _eos_list((generation_config or {}).get("eos_token_id")) or _eos_list(
        d.get("eos_token_id")
    )
    is_moe = model_type == "qwen3_moe"
    return DecoderConfig(
        arch=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        max_position_embeddings=d["max_position_embeddings"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        num_experts=(d.get("num_experts") or d.get("num_local_experts") or 0) if is_moe else 0,
        num_experts_per_tok=d.get("num_experts_per_tok", 0) if is_moe else 0,
        moe_intermediate_size=d.get("moe_intermediate_size", 0) if is_moe else 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=d.get("decoder_sparse_step", 1) or 1,
        mlp_only_layers=list(d.get("mlp_only_layers") or []),
        eos_token_ids=eos,
        quant=_quant(d),
    )
