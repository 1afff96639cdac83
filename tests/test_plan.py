"""`coserve plan`: the study's VRAM budget, KV capacity and the concurrency that fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from coserve import plan as P

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    P.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_study_numbers_on_h200():
    plan, _ = P.make_plan(args(gpu="h200"))
    # the study: ~30 GB FP8 weights, ~30 GB KV cache at 0.50, ~17 GB embed model, ~77 GB total
    assert plan.gen.weight_bytes / 1e9 == pytest.approx(31.2, abs=0.1)
    assert plan.embed.weight_bytes / 1e9 == pytest.approx(15.1, abs=0.1)
    assert plan.gen.kv_bytes_per_token == 98304  # 48 layers x 4 KV heads x 128 x K+V x bf16
    # "KV cache capacity at gpu_mem_util=0.50 is ~322K tokens"
    assert plan.kv_tokens == pytest.approx(322_000, rel=0.01)
    # "At C=512 with ~542 tokens/request ... peak demand is ~278K tokens, fitting comfortably"
    assert plan.tokens_per_request == 542
    assert plan.tokens_needed(512) == pytest.approx(278_000, rel=0.01)
    assert plan.fits(512) and not plan.fits(1024)  # "C=1024 overflows the KV cache"
    assert 512 < plan.max_concurrency < 1024
    total = plan.gen.weight_bytes + plan.kv_bytes + plan.embed.weight_bytes
    assert total / 1e9 == pytest.approx(77, abs=2)
    assert plan.problems() == []


def test_weights_match_the_engines_own_model():
    """The plan's byte count is the engine's: build the presets on the meta device."""
    torch = pytest.importorskip("torch")
    from coserve.engine.presets import get_preset
    from coserve.engine.weights import build_model, parse_hf_config

    for name, task in (("qwen3-30b-a3b", "generate"), ("qwen3-embedding-8b", "embed"),
                       ("tiny-moe", "generate")):
        cfg = parse_hf_config(get_preset(name).hf_config, None)
        net = build_model(cfg, task=task, dtype=torch.bfloat16, device=torch.device("meta"),
                          quant=getattr(cfg, "quant", None))
        engine_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        assert P.model_size(name, embedding=task == "embed").weight_bytes == engine_bytes, name


def test_h100_has_no_room_for_the_studys_kv_cache():
    plan, _ = P.make_plan(args(gpu="h100"))
    assert plan.kv_tokens == 0
    assert any("no room for a KV cache" in p for p in plan.problems())
    bigger, _ = P.make_plan(args(gpu="h100", gen_util=0.7, embed_util=0.25, concurrency="128,256"))
    assert bigger.kv_tokens > 0 and bigger.fits(128)


def test_overcommitted_fractions_are_a_problem():
    plan, _ = P.make_plan(args(gpu="h200", gen_util=0.8, embed_util=0.3))
    assert any("add up to 1.10" in p for p in plan.problems())


def test_plan_from_a_spec_checks_its_sweep():
    plan, sweep = P.make_plan(args(spec=str(EXPERIMENTS / "seed-single-gpu.toml"), gpu="h200"))
    assert sweep == [256, 512, 1024]
    rows = dict((c, v) for c, _, v in P.sweep_rows(plan, sweep))
    assert rows["512"] == "yes" and rows["1024"].startswith("no: KV cache overflows")


def test_cli(capsys):
    from coserve.cli import main

    assert main(["plan", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "VRAM budget" in out and "321,472 tokens" in out and "C=512 needs 278,528 tokens" in out
    assert main(["plan", "--gpu", "h200", "--json", "--concurrency", "512,1024"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["concurrency"]["512"]["fits"] and not d["concurrency"]["1024"]["fits"]
    assert main(["plan", "--gen", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().out
    assert main(["plan", "--gen", "tiny-moe", "--embed", "all-minilm-l6-v2", "--gpu-memory-gib", "8",
                 "--runtime-gb", "0.5", "--input-len", "16", "--output-len", "32"]) == 0
