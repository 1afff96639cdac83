"""Our models against transformers' reference implementations, same random weights, fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coserve.engine.attention import AttnMetadata
from coserve.engine.embed_engine import EmbedEngine
from coserve.engine.kernels.fp8 import block_dequant, block_quant
from coserve.engine.types import EngineArgs
from coserve.engine.weights import load_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits.float()


def _our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    with torch.inference_mode():
        h = model(ids.flatten(), torch.arange(t).repeat(b), AttnMetadata.dense([t] * b, True))
        return model.compute_logits(h).view(b, t, -1)


def _qwen3_config(**kw):
    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    return {**base, **kw}


def _moe_config(**kw):
    return _qwen3_config(
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **kw
    )


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))


def _save(hf, path: Path, **kw) -> Path:
    hf.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_dense_logits_match_transformers(tmp_path, ids, tied):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**_qwen3_config(tie_word_embeddings=tied))
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    lm = load_model(str(_save(hf, tmp_path)), task="generate")
    ref, ours = _hf_logits(hf, ids), _our_logits(lm.model, ids)
    assert (ref - ours).abs().max() < ATOL


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_logits_match_transformers(tmp_path, ids, norm_topk_prob):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        **{**_moe_config(), "norm_topk_prob": norm_topk_prob}, mlp_only_layers=[1]
    )  # one MoE layer, one dense layer
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    lm = load_model(str(_save(hf, tmp_path)), task="generate")
    assert lm.config.is_moe_layer(0) and not lm.config.is_moe_layer(1)
    ref, ours = _hf_logits(hf, ids), _our_logits(lm.model, ids)
    assert (ref - ours).abs().max() < ATOL


def test_sharded_checkpoint_loads(tmp_path, ids):
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**_moe_config())).eval()
    _save(hf, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    lm = load_model(str(tmp_path), task="generate")
    assert (_hf_logits(hf, ids) - _our_logits(lm.model, ids)).abs().max() < ATOL


@pytest.mark.parametrize(
    "text, said",
    [
        ("garbage", "config.json: not valid JSON"),
        ("[1]", "config.json: not a JSON object"),
        ("{}", "config.json: model_type '' is not supported"),
        ('{"model_type": "qwen3"}', "config.json: no 'vocab_size'"),
    ],
)
def test_a_config_json_it_cannot_use_is_a_value_error_naming_it(tmp_path, text, said):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=said):
        load_model(str(tmp_path), task="generate", random_weights=True)


@pytest.mark.parametrize(
    "model, task, said",
    [
        ("tiny-dense", "embed", "'tiny-dense' is a generative model, not an embedding one"),
        ("tiny-embed", "generate", "'tiny-embed' is an embedding model, not a generative one"),
    ],
)
def test_a_preset_of_the_other_task_is_named_in_english(model, task, said):
    """It said "is a generate model, not a embed one"."""
    with pytest.raises(ValueError, match=said):
        load_model(model, task=task, random_weights=True)


def test_missing_weights_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_qwen3_config())).eval()
    _save(hf, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        load_model(str(tmp_path), task="generate")


def _fp8_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """An HF Qwen3-MoE checkpoint whose attention, MLP and expert projections are FP8
    block-quantised the way Qwen3-*-FP8 stores them (router and lm_head not), and the HF
    model loaded from the same weights dequantised."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    # hidden 192: partial 128-blocks; k/v 64 rows: q|k|v cannot share scale blocks
    cfg = transformers.Qwen3MoeConfig(
        **{
            **_moe_config(),
            "hidden_size": 192,
            "head_dim": 32,
            "moe_intermediate_size": 128,
            "intermediate_size": 256,
        },
        mlp_only_layers=[1],
    )
    ref_dir, fp8_dir = tmp_path / "ref", tmp_path / "fp8"
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(ref_dir)
    fp8_dir.mkdir()
    sd = load_file(ref_dir / "model.safetensors")
    out = {}
    for name, w in sd.items():
        if name.endswith("proj.weight"):
            q, s = block_quant(w, (128, 128))
            out[name], out[name + "_scale_inv"] = q, s
            sd[name] = block_dequant(q, s, (128, 128))
        else:
            out[name] = w
    save_file(sd, ref_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(out, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((ref_dir / "config.json").read_text())
    conf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "mlp.gate"],
    }
    (fp8_dir / "config.json").write_text(json.dumps(conf))
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(ref_dir).eval()
    return hf, fp8_dir


@pytest.mark.parametrize("keep_fp8", [True, False])
def test_fp8_checkpoint_matches_dequantised_reference(tmp_path, ids, keep_fp8):
    hf, path = _fp8_checkpoint(tmp_path)
    lm = load_model(str(path), task="generate", keep_fp8=keep_fp8)
    layer0 = lm.model.model.layers[0]
    fp8 = torch.float8_e4m3fn
    if keep_fp8:
        assert layer0.mlp.experts.w13.dtype == fp8 and layer0.self_attn.o_proj.weight.dtype == fp8
        assert layer0.self_attn.qkv_proj.weight.dtype == torch.float32  # unaligned parts
        assert lm.model.model.layers[1].mlp.gate_up_proj.weight.dtype == fp8
    else:
        assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert (_hf_logits(hf, ids) - _our_logits(lm.model, ids)).abs().max() < ATOL


def test_random_fp8_preset_same_numerics_kept_or_dequantised(ids):
    kept = load_model("tiny-moe", task="generate", random_weights=True, keep_fp8=True)
    deq = load_model("tiny-moe", task="generate", random_weights=True, keep_fp8=False)
    assert kept.model.model.layers[0].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert kept.weight_bytes < deq.weight_bytes
    a, b = _our_logits(kept.model, ids), _our_logits(deq.model, ids)
    assert (a - b).abs().max() < 1e-5


def test_bert_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), task="embed")
    assert lm.pooling == "mean"
    seqs = [[101, 5, 9, 17, 102], [101, 33, 102], [101] + list(range(40, 60)) + [102]]
    with torch.inference_mode():
        ours = lm.model(
            torch.tensor([t for s in seqs for t in s]),
            torch.cat([torch.arange(len(s)) for s in seqs]),
            AttnMetadata.dense([len(s) for s in seqs], causal=False),
        )
    start = 0
    for s in seqs:
        with torch.no_grad():
            ref = hf(torch.tensor([s])).last_hidden_state[0]
        assert (ref - ours[start : start + len(s)]).abs().max() < ATOL
        start += len(s)


def test_qwen3_embedding_is_last_token_pooled_hidden_state(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Qwen3Model(transformers.Qwen3Config(**_qwen3_config())).eval()
    hf.save_pretrained(tmp_path)  # a bare Qwen3Model: names without the "model." prefix
    engine = EmbedEngine(EngineArgs(model=str(tmp_path)))
    seqs = [[1, 2, 3, 4], [7] * 9, [200, 3]]
    ours = torch.tensor(engine.embed(seqs))
    for i, s in enumerate(seqs):
        with torch.no_grad():
            h = hf(torch.tensor([s])).last_hidden_state[0, -1]
        ref = torch.nn.functional.normalize(h, dim=-1)
        assert (ref - ours[i]).abs().max() < ATOL
    assert engine.dim == 64


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "Stock markets fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm():
    return EmbedEngine(EngineArgs(model="all-minilm-l6-v2"))


def test_minilm_matches_sentence_transformers_mean_pooling(minilm):
    from coserve.engine.presets import get_preset

    model_dir = get_preset("all-minilm-l6-v2").model_dir
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.BertModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    ours = torch.tensor(minilm.embed(SENTENCES))
    cos = (ref * ours).sum(-1)
    assert cos.min() > 0.9999, cos
    assert minilm.dim == 384 and minilm.max_model_len == 256
    assert (
        minilm.tokenizer.encode(SENTENCES[0])
        == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    )


def test_minilm_similar_sentences_score_higher(minilm):
    v = torch.tensor(minilm.embed(SENTENCES[:2] + SENTENCES[-1:]))
    sim = v @ v.T
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert sim[0, 1] > 0.5 > sim[0, 2]
    assert sim[0, 1] > sim[1, 2]


def test_fp8_config_with_a_module_stored_plain_still_loads(tmp_path, ids):
    """modules_to_not_convert may not name everything a checkpoint keeps unquantised."""
    hf, path = _fp8_checkpoint(tmp_path)
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"]["modules_to_not_convert"] = []  # lm_head, routers are plain
    (path / "config.json").write_text(json.dumps(conf))
    lm = load_model(str(path), task="generate", keep_fp8=True)
    assert lm.model.lm_head.weight.dtype == torch.float32
    assert lm.model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert (_hf_logits(hf, ids) - _our_logits(lm.model, ids)).abs().max() < ATOL
