"""Model architectures. `build_model(config, task, ...)` returns an nn.Module with
`forward(input_ids, positions, meta) -> hidden [T, H]` and `load_weight(hf_name, tensor,
scale, block)`; generation models add `compute_logits(hidden) -> [N, vocab]` (model dtype)."""

from __future__ import annotations

import torch
from torch import nn

from coserve.engine.config import BertConfig, DecoderConfig, ModelConfig, QuantConfig


def build_model(
    config: ModelConfig, *, task: str, dtype: torch.dtype, device, quant: QuantConfig | None
) -> nn.Module:
    if isinstance(config, BertConfig):
        from coserve.engine.models.bert import BertModel

        return BertModel(config, dtype=dtype, device=device)
    if isinstance(config, DecoderConfig):
        from coserve.engine.models.qwen3 import Qwen3ForCausalLM

        return Qwen3ForCausalLM(
            config, with_lm_head=(task == "generate"), dtype=dtype, device=device, quant=quant
        )
    raise TypeError(f"no model for {type(config).__name__}")
