"""Tensor parallelism on 2 GPUs (NCCL): the decode steps replay CUDA graphs that hold the
all-reduces, and give the logits a TP=1 engine gives (to bf16 tolerance). Skipped without
2 GPUs and Triton.

The MoE case uses tiny-moe with a 256-wide expert dimension: each rank's 128 columns then
stay FP8 (tiny-moe's own 128 split in two is dequantised, and bf16 experts skip the FP8
activation quantisation the TP=1 engine does, a difference of up to 0.7 in these logits)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from coserve.engine.gen_engine import GenEngine
from coserve.engine.kernels import ops
from coserve.engine.presets import PRESETS
from coserve.engine.types import EngineArgs, SamplingParams

pytestmark = pytest.mark.gpu
if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and ops.twins_enabled()):
    pytest.skip("needs 2 CUDA GPUs and Triton", allow_module_level=True)


def _decode_logits(tp: int, model: str, ep: bool = False) -> tuple[list[torch.Tensor], dict]:
    engine = GenEngine(EngineArgs(model=model, random_weights=True, device="cuda:0",
                                  gpu_memory_utilization=0.2, max_model_len=512, max_num_seqs=16,
                                  tensor_parallel_size=tp, enable_expert_parallel=ep))
    try:
        rng = random.Random(0)
        for i in range(6):
            prompt = [rng.randrange(256) for _ in range(rng.randint(3, 40))]
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0,
                                                               ignore_eos=True))
        while engine.scheduler.waiting:
            engine.step()
        out = []
        while engine.has_unfinished():
            batch = engine.scheduler.schedule()
            logits = engine.runner.run(batch).float().cpu()
            out.append(logits)
            engine.scheduler.postprocess(batch, logits.argmax(-1).tolist(), set(),
                                         engine.max_model_len)
        return out, dict(engine.runner.steps)
    finally:
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()


def _moe_256(tmp_path) -> str:
    config = dict(PRESETS["tiny-moe"].hf_config, moe_intermediate_size=256)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe", "tiny-moe-ep"])
def test_tp2_graph_replays_match_tp1(model, tmp_path):
    """tiny-moe-ep: expert parallel (4 whole experts of 8 per rank, the Triton MoE skipping
    the other rank's pairs)."""
    ep = model == "tiny-moe-ep"
    if model == "tiny-moe":
        model = _moe_256(tmp_path)
    elif ep:
        model = "tiny-moe"
    tp2, steps2 = _decode_logits(2, model, ep)
    tp1, _ = _decode_logits(1, model)
    assert steps2["graph"] > 0
    assert len(tp2) == len(tp1) > 0
    for a, b in zip(tp1, tp2, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_tp2_async_scheduling_gives_the_sync_tokens():
    """Greedy decode steps fed from the device (CUDA graphs, two GPUs) give the tokens of
    steps that read each token back first. One length for all: the batches (and so the
    graphs, whose bf16 numerics depend on the bucket) are the same in both modes."""
    engine = GenEngine(EngineArgs(model="tiny-moe", random_weights=True, device="cuda:0",
                                  gpu_memory_utilization=0.2, max_model_len=512, max_num_seqs=16,
                                  tensor_parallel_size=2))
    try:
        rng = random.Random(1)
        prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(6)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        out = {}
        for async_on in (True, False):
            engine.async_scheduling = async_on
            fed = engine.runner.fed_steps
            out[async_on] = [r.token_ids for r in engine.generate(prompts, params)]
            assert (engine.runner.fed_steps > fed) == async_on
        assert out[True] == out[False]
    finally:
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
