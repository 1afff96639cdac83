"""`coserve plan`: KV capacity as the built-in engine sizes it, checked against what the engine
measured (an H200 record, a CPU server's own report); the VRAM budget and the concurrency that
fits."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from coserve import plan as P
from coserve import plan_command as PC
from coserve.server.command import parse_bytes

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    PC.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_the_engines_measured_kv_capacity_on_h200():
    """The built-in engine at the study's setting reported 410,400 tokens of KV cache on an H200
    (results/nvidia-h200-2026-11-25/engine/serve_gen.log and gen.txt: 25,650 blocks x 16). Its
    log gives the memory figures to 0.01 GiB (+-0.0125 GiB in all, 8.5 blocks of 1.5 MiB), so
    the plan may differ by up to 9 blocks; the cache it allocated, 37.575 GiB (to 0.001 GiB, with
    the null block), gives the capacity exactly."""
    plan, _ = PC.make_plan(args(gpu="h200"))
    assert plan.gen.kv_bytes_per_token == 98304  # 48 layers x 4 KV heads x 128 x K+V x bf16
    assert plan.gen.weight_bytes / 2**30 == pytest.approx(
        29.0, abs=0.05
    )  # gen.txt: "weights 29.0 GiB"
    assert abs(plan.kv_tokens - P.MEASURED_KV_TOKENS) <= 9 * 16
    allocated, _ = PC.make_plan(
        args(
            gen="qwen3-30b-a3b", embed="none", dtype="bfloat16", kv_cache_bytes=int(37.575 * 2**30)
        )
    )
    assert allocated.kv_tokens == P.MEASURED_KV_TOKENS == 410_400
    # vLLM's own figure is shown as the study's, not derived
    assert plan.study_vllm_kv_tokens() == 322_000
    assert PC.make_plan(args(gpu="h100"))[0].study_vllm_kv_tokens() is None
    # "At C=512 with ~542 tokens/request ... peak demand is ~278K tokens"; C=1024 overflows
    assert plan.tokens_per_request == 542
    assert plan.tokens_needed(512) == pytest.approx(278_000, rel=0.01)
    assert plan.fits(512) and not plan.fits(1024)
    assert plan.max_concurrency == plan.kv_tokens // 544
    assert plan.embed.weight_bytes / 1e9 == pytest.approx(15.1, abs=0.1)
    assert plan.problems() == []


def test_plan_equals_a_cpu_servers_own_kv_capacity():
    """A real `coserve serve gen` on CPU reports its KV capacity in its ready line; the plan for
    the same model, budget and block size must predict it exactly."""
    from test_server_util import coserve_serve

    for model, budget in (("tiny-dense", "16M"), ("tiny-moe", "3000000")):
        with coserve_serve(
            "gen",
            "--model",
            model,
            "--random-weights",
            "--device",
            "cpu",
            "--max-model-len",
            "256",
            "--kv-cache-bytes",
            budget,
        ) as srv:
            served = int(re.search(r"KV cache capacity (\d+) tokens", srv.ready_line).group(1))
        plan, _ = PC.make_plan(args(gen=model, embed="none", kv_cache_bytes=parse_bytes(budget)))
        assert plan.kv_tokens == served, (model, budget)


def test_budget_total_is_every_row_above_it_in_one_unit():
    plan, _ = PC.make_plan(args(gpu="h200"))
    rows = P.budget_rows(plan)
    total_at = next(i for i, (name, _) in enumerate(rows) if name.startswith("**Total"))
    above = [float(v.split()[0].replace(",", "")) for _, v in rows[:total_at]]
    total = float(rows[total_at][1].strip("*").split()[0].replace(",", ""))
    assert total == pytest.approx(sum(above), abs=0.01 * len(above))
    every_value = " ".join(v for _, v in rows)
    assert "GiB" in every_value and " GB" not in every_value


def test_max_num_seqs_default_is_the_engines():
    from coserve.engine.types import EngineArgs

    plan, _ = PC.make_plan(args(gpu="h200"))
    assert plan.max_num_seqs == EngineArgs(model="x").max_num_seqs
    assert f"max_num_seqs {plan.max_num_seqs} caps it" in "\n".join(P.lines(plan))


def test_weights_match_the_engines_own_model():
    """The plan's byte count is the engine's: build the presets on the meta device."""
    torch = pytest.importorskip("torch")
    from coserve.engine.presets import get_preset
    from coserve.engine.weights import build_model, parse_hf_config

    for name, task in (
        ("qwen3-30b-a3b", "generate"),
        ("qwen3-embedding-8b", "embed"),
        ("tiny-moe", "generate"),
    ):
        cfg = parse_hf_config(get_preset(name).hf_config, None)
        net = build_model(
            cfg,
            task=task,
            dtype=torch.bfloat16,
            device=torch.device("meta"),
            quant=getattr(cfg, "quant", None),
        )
        engine_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        assert PC.model_size(name, embedding=task == "embed").weight_bytes == engine_bytes, name


def test_a_cpu_plan_counts_the_weights_the_cpu_engine_holds():
    """On a CPU the engine dequantises an FP8 checkpoint at load (float32 by default): the
    plan counted FP8 bytes there, 30 GiB for qwen3-30b-a3b's 114 GiB, and said 'FP8 block'
    (a new user's pass, 2026-12-01)."""
    torch = pytest.importorskip("torch")
    from coserve.engine.layers import dequantize_model_
    from coserve.engine.presets import get_preset
    from coserve.engine.weights import build_model, parse_hf_config

    for name in ("tiny-moe", "qwen3-30b-a3b"):
        cfg = parse_hf_config(get_preset(name).hf_config, None)
        net = build_model(
            cfg, task="generate", dtype=torch.float32, device=torch.device("meta"), quant=cfg.quant
        )
        dequantize_model_(net)  # as weights.py does on a CPU
        engine_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        plan, _ = PC.make_plan(args(gen=name, embed="none", kv_cache_bytes=256 << 20))
        assert plan.gen.weight_bytes == engine_bytes, name
        assert "FP8 block" not in plan.gen.fmt and "dequantised" in plan.gen.fmt


def test_no_room_for_a_kv_cache_names_the_fix():
    plan, _ = PC.make_plan(args(gpu="h100", gen_util=0.40, embed_util=0.30))
    assert plan.kv_tokens == 0
    [problem] = plan.problems()
    fix = re.search(r"raise gpu_memory_utilization to at least (0\.\d\d)", problem)
    assert fix and "KV capacity 0 tokens" in problem
    # the fraction it names is enough, and a hundredth less is not
    enough, _ = PC.make_plan(args(gpu="h100", gen_util=float(fix.group(1)), embed_util=0.30))
    assert enough.kv_tokens >= enough.tokens_per_request and enough.problems() == []
    short, _ = PC.make_plan(args(gpu="h100", gen_util=float(fix.group(1)) - 0.01, embed_util=0.30))
    assert short.kv_tokens < short.tokens_per_request
    cpu, _ = PC.make_plan(args(gen="tiny-dense", embed="none", kv_cache_bytes=4096))
    assert cpu.kv_tokens == 0 and "raise --kv-cache-bytes" in cpu.problems()[0]


def test_overcommitted_fractions_are_a_problem():
    plan, _ = PC.make_plan(args(gpu="h200", gen_util=0.8, embed_util=0.3))
    assert any("add up to 1.10" in p for p in plan.problems())


def test_plan_from_a_spec_checks_its_sweep():
    plan, sweep = PC.make_plan(args(spec=str(EXPERIMENTS / "seed-single-gpu.toml"), gpu="h200"))
    assert sweep == [256, 512, 1024]
    rows = dict((c, v) for c, _, v in P.sweep_rows(plan, sweep))
    assert rows["512"] == "yes" and rows["1024"].startswith("no: KV cache overflows")


def test_cli(capsys):
    from coserve.cli import main

    assert main(["plan", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "VRAM budget" in out and "C=512 needs 278,528 tokens" in out
    assert f"{PC.make_plan(args(gpu='h200'))[0].kv_tokens:,} tokens" in out
    assert "~322,000 tokens (the study's measured value" in out
    assert main(["plan", "--gpu", "h200", "--json", "--concurrency", "512,1024"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["concurrency"]["512"]["fits"] and not d["concurrency"]["1024"]["fits"]
    assert main(["plan", "--gen", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().out
    assert (
        main(
            [
                "plan",
                "--gen",
                "tiny-moe",
                "--embed",
                "all-minilm-l6-v2",
                "--gpu-memory-gib",
                "8",
                "--reserve-gib",
                "0.5",
                "--input-len",
                "16",
                "--output-len",
                "32",
            ]
        )
        == 0
    )


def test_a_spec_whose_gen_runs_on_a_cpu_is_planned_as_one(tmp_path, monkeypatch, capsys):
    """device = "cpu" (or "auto" on a machine without a GPU): the KV cache is the engine's CPU
    byte budget and the table speaks of host RAM, not of a GPU's VRAM and fractions."""
    spec = (EXPERIMENTS / "demo.toml").read_text()
    cpu = tmp_path / "cpu.toml"
    cpu.write_text(spec.replace('device = "auto"', 'device = "cpu"'))
    plan, _ = PC.make_plan(args(spec=str(cpu)))
    assert plan.cpu_kv_cache_bytes == 256 << 20  # EngineArgs.cpu_kv_cache_bytes
    assert PC.run(args(spec=str(cpu))) == 0
    out = capsys.readouterr().out
    assert "host RAM" in out and "VRAM" not in out and "Reserved by the fractions" not in out
    monkeypatch.setattr(PC, "_local_gpu", lambda: None)
    auto, _ = PC.make_plan(args(spec=str(EXPERIMENTS / "demo.toml")))
    assert auto.cpu_kv_cache_bytes == 256 << 20
    on_h200, _ = PC.make_plan(args(spec=str(EXPERIMENTS / "demo.toml"), gpu="h200"))
    assert on_h200.cpu_kv_cache_bytes is None  # --gpu asks for a GPU plan


def test_a_concurrency_above_max_num_seqs_is_not_said_to_fit_without_queuing():
    plan, _ = PC.make_plan(args(gpu="h200", concurrency=[200, 512]))
    said = P.lines(plan)
    assert "C=200 needs 108,800 tokens (27% of the KV cache): fits without queuing." in said
    c512 = next(line for line in said if line.startswith("C=512"))
    assert "without queuing" not in c512
    assert "max_num_seqs 256 runs 256 at once and 256 queue" in c512


def test_a_tiny_models_params_in_millions_or_thousands():
    assert [P.params_text(n) for n in (30_532_000_000, 22_566_000, 414_000, 999)] == [
        "30.53 B",
        "22.57 M",
        "414 K",
        "999",
    ]
    plan, _ = PC.make_plan(args(spec=str(EXPERIMENTS / "demo.toml")))
    names = " ".join(name for name, _ in P.budget_rows(plan))
    assert "0.00 B params" not in names and "22.57 M params" in names
