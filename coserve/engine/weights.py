"""Getting a model's weights: from an HF directory (config.json + safetensors, one file or
sharded, FP8 `weight` + `weight_scale_inv` pairs) or random initialisation of a preset.
`load_model` resolves `--model` (preset name or directory) into a ready `LoadedModel`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coserve.engine.config import BertConfig, ModelConfig, parse_hf_config
from coserve.engine.kernels import ops
from coserve.engine.kernels.fp8 import FP8_DTYPE
from coserve.engine.layers import (
    dequantize_model_,
    init_random,
    missing_weights,
    tile_expert_weights_,
)
from coserve.engine.models import build_model
from coserve.engine.presets import get_preset
from coserve.engine.tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger("coserve.engine")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, tensor, weight_scale_inv or None) for every weight; scales travel with the
    FP8 weight they belong to, whichever shard holds them."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in checkpoint_files(model_dir)]
    where = {name: h for h in handles for name in h.keys()}
    for name, h in where.items():
        if name.endswith("_scale_inv"):
            continue
        tensor = h.get_tensor(name)
        scale = None
        if tensor.dtype == FP8_DTYPE:
            scale_name = name + "_scale_inv"
            if scale_name not in where:
                raise ValueError(f"{model_dir}: FP8 tensor {name} has no {scale_name}")
            scale = where[scale_name].get_tensor(scale_name)
        yield name, tensor, scale


def load_checkpoint(model: nn.Module, model_dir: Path, config: ModelConfig) -> list[str]:
    """Load every tensor the model uses; returns the names it had no use for."""
    block = getattr(getattr(config, "quant", None), "block", None)
    unused = []
    for name, tensor, scale in iter_checkpoint(model_dir):
        if not model.load_weight(name, tensor, scale, block):
            unused.append(name)
    return unused


@dataclass
class LoadedModel:
    name: str
    task: str  # "generate" | "embed"
    config: ModelConfig
    model: nn.Module
    tokenizer: Any  # None or encode/decode
    pooling: str | None  # "last" | "mean" (embed)
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    weight_bytes: int


def resolve_dtype(
    dtype: str | None, device: torch.device, hf_config: dict[str, Any]
) -> torch.dtype:
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from {sorted(_DTYPES)})")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if hf_config.get("torch_dtype") == "float16" else torch.bfloat16


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pooling_of(model_dir: Path | None, config: ModelConfig) -> str:
    """sentence-transformers' 1_Pooling/config.json when present, else the architecture's."""
    pool = _read_json(model_dir / "1_Pooling" / "config.json") if model_dir else None
    if pool:
        if pool.get("pooling_mode_lasttoken"):
            return "last"
        if pool.get("pooling_mode_mean_tokens"):
            return "mean"
        if pool.get("pooling_mode_cls_token"):
            return "cls"
    return "mean" if isinstance(config, BertConfig) else "last"


def load_model(
    model: str,
    *,
    task: str,
    random_weights: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
    keep_fp8: bool | None = None,
) -> LoadedModel:
    """`model` is a preset name or an HF model directory. FP8 weights stay FP8 on CUDA and
    are dequantised at load on CPU unless keep_fp8 says otherwise."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    preset = get_preset(model)
    model_dir = preset.model_dir if preset else None
    if preset is None:
        model_dir = Path(model)
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"--model {model!r} is neither a preset nor a directory with "
                f"config.json (presets: {', '.join(_preset_names())})"
            )
    if preset is not None and preset.task != task:
        kind = {"generate": "a generative", "embed": "an embedding"}
        raise ValueError(f"model {model!r} is {kind[preset.task]} model, not {kind[task]} one")
    where = f"preset {model!r}"
    if model_dir is not None:
        where = str(model_dir / "config.json")
        try:
            hf_config = json.loads((model_dir / "config.json").read_text())
        except ValueError as e:  # UnicodeDecodeError is one too
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(hf_config, dict):
            raise ValueError(f"{where}: not a JSON object")
    else:
        hf_config = preset.hf_config
        if not random_weights:
            raise ValueError(
                f"preset {model!r} ships no weights: use random weights "
                "(--random-weights) or pass an HF model directory"
            )
    gen_cfg = _read_json(model_dir / "generation_config.json") if model_dir else None
    try:
        config = parse_hf_config(hf_config, gen_cfg)
    except NotImplementedError as e:  # an architecture or format the engine lacks
        raise ValueError(f"{where}: {e}") from None
    except KeyError as e:
        raise ValueError(f"{where}: no {e.args[0]!r}") from None
    if task == "generate" and isinstance(config, BertConfig):
        raise ValueError(f"model {model!r} is an encoder; it can only embed")

    torch_dtype = resolve_dtype(dtype, dev, hf_config)
    quant = getattr(config, "quant", None)
    net = build_model(config, task=task, dtype=torch_dtype, device=dev, quant=quant)
    with torch.inference_mode():
        if random_weights:
            gen = torch.Generator(device=dev).manual_seed(seed)
            init_random(net, gen, float(hf_config.get("initializer_range", 0.02)))
        else:
            unused = load_checkpoint(net, model_dir, config)
            if unused:
                log.debug("unused checkpoint tensors: %s", unused[:20])
            missing = missing_weights(net)
            if missing:
                raise ValueError(
                    f"{model_dir}: checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}"
                )
        if quant is not None and not (keep_fp8 if keep_fp8 is not None else dev.type == "cuda"):
            dequantize_model_(net)
        if dev.type == "cuda" and ops.twins_enabled():
            tile_expert_weights_(net)
            torch.cuda.empty_cache()  # the row-major copies, so that KV sizing sees the memory
    net.eval()

    tokenizer = None
    if model_dir is not None:
        tokenizer = load_tokenizer(model_dir)
    elif preset.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    if isinstance(tokenizer, ByteTokenizer) and not getattr(config, "eos_token_ids", [1]):
        config.eos_token_ids = [ByteTokenizer.eos_token_id]

    limit = config.max_position_embeddings
    default_len = preset.max_model_len if preset and preset.max_model_len else None
    st = _read_json(model_dir / "sentence_bert_config.json") if model_dir else None
    if st and st.get("max_seq_length"):
        default_len = int(st["max_seq_length"])
    if max_model_len is not None:
        if max_model_len <= 0 or max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} must be in 1..{limit} "
                f"(the model's max_position_embeddings)"
            )
        mml = max_model_len
    else:
        mml = min(default_len or limit, limit)

    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    log.info(
        "loaded %s (%s, %s, %s) in %.1fs: %.2f GiB of weights",
        model,
        type(config).__name__,
        torch_dtype,
        "random" if random_weights else "checkpoint",
        time.perf_counter() - t0,
        weight_bytes / 2**30,
    )
    return LoadedModel(
        name=model,
        task=task,
        config=config,
        model=net,
        tokenizer=tokenizer,
        pooling=_pooling_of(model_dir, config) if task == "embed" else None,
        max_model_len=mml,
        dtype=torch_dtype,
        device=dev,
        weight_bytes=weight_bytes,
    )


def _preset_names() -> list[str]:
    from coserve.engine.presets import PRESETS

    return list(PRESETS)
