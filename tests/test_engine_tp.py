"""Tensor parallelism on CPU (gloo, 2 ranks): a TP=2 engine computes what a TP=1 engine does
(logits, greedy tokens, embeddings) to fp32 tolerance; weight windows keep FP8 blocks whole;
worker ranks stop with the engine."""

from __future__ import annotations

import random

import pytest
import torch

from coserve.engine import parallel
from coserve.engine.config import QuantConfig
from coserve.engine.embed_engine import EmbedEngine
from coserve.engine.gen_engine import GenEngine
from coserve.engine.kernels.fp8 import FP8_DTYPE, block_dequant
from coserve.engine.layers import Linear
from coserve.engine.moe_weights import FusedMoEWeights
from coserve.engine.types import EngineArgs, SamplingParams


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _logits_of_steps(engine: GenEngine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits of the first `steps` steps (a prefill, then decodes), sampled greedily."""
    for i, p in enumerate(prompts):
        engine.add_request(f"l{i}", p, _greedy(steps))
    out = []
    for _ in range(steps):
        batch = engine.scheduler.schedule()
        logits = engine.runner.run(batch).float()
        out.append(logits)
        engine.scheduler.postprocess(batch, logits.argmax(-1).tolist(), set(), engine.max_model_len)
    assert not engine.has_unfinished()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
def test_tp2_generation_matches_tp1(model):
    prompts = _prompts(5)
    results = {}
    for tp in (1, 2):
        engine = GenEngine(
            EngineArgs(model=model, random_weights=True, max_num_seqs=8, tensor_parallel_size=tp)
        )
        try:
            logits = _logits_of_steps(engine, prompts, 3)
            tokens = [r.token_ids for r in engine.generate(prompts, _greedy(12))]
            steps = dict(engine.runner.steps)
            workers = engine.workers.procs if engine.workers else []
        finally:
            engine.shutdown()
        assert all(not p.is_alive() and p.exitcode == 0 for p in workers)
        results[tp] = logits, tokens, steps
    (l1, t1, s1), (l2, t2, s2) = results[1], results[2]
    for a, b in zip(l1, l2, strict=True):
        assert a.shape == b.shape == (len(prompts), 512)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert t2 == t1
    assert s2 == s1 and s1["varlen"] > 0 and s1["static eager"] > 0  # both paths crossed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["tiny-embed", "all-minilm-l6-v2"])
def test_tp2_embeddings_match_tp1(model):
    texts = ["the cat sat on the mat", "tensor parallel embeddings", "a"]
    out = {}
    for tp in (1, 2):
        engine = EmbedEngine(
            EngineArgs(
                model=model, random_weights=model.startswith("tiny"), tensor_parallel_size=tp
            )
        )
        try:
            out[tp] = torch.tensor(engine.embed(texts))
        finally:
            engine.shutdown()
    torch.testing.assert_close(out[2], out[1], rtol=1e-4, atol=1e-5)


def _as_rank(rank: int, size: int):
    """Build layers as rank `rank` of `size` would (no process group: nothing runs)."""

    class _Rank:
        def __enter__(self):
            parallel._state = parallel.TPState(rank, size)

        def __exit__(self, *exc):
            parallel._state = parallel.TPState()

    return _Rank()


_Q = QuantConfig(block=(128, 128))


def _linear(out_sizes, in_features, **kw) -> Linear:
    layer = Linear(in_features, out_sizes, quant=_Q, dtype=torch.float32, device="cpu", **kw)
    layer.init_random(torch.Generator().manual_seed(0), 0.02)
    return layer


def _weight(layer) -> torch.Tensor:
    if layer.quant is None:
        return layer.weight.data
    return block_dequant(layer.weight.data, layer.weight_scale_inv.data, layer.quant.block)


@pytest.mark.parametrize("per_rank, stays_fp8", [(256, True), (64, False)])
def test_column_and_row_windows_keep_fp8_blocks_whole(per_rank, stays_fp8):
    full = _weight(_linear([2 * per_rank, 2 * per_rank], 512))
    full_row = _weight(_linear([256], 2 * per_rank))
    for rank in range(2):
        with _as_rank(rank, 2):
            w = (rank * per_rank, per_rank)
            col = _linear([2 * per_rank, 2 * per_rank], 512, out_shards=[w, w])
            row = _linear([256], 2 * per_rank, in_shard=w, reduce=True)
        assert (col.weight.dtype == FP8_DTYPE) == stays_fp8
        assert (row.weight.dtype == FP8_DTYPE) == stays_fp8
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        want = torch.cat([full[rows], full[2 * per_rank :][rows]])
        torch.testing.assert_close(_weight(col), want, rtol=0, atol=0)
        torch.testing.assert_close(_weight(row), full_row[:, rows], rtol=0, atol=0)


@pytest.mark.parametrize("inter, stays_fp8", [(512, True), (128, False)])
def test_expert_windows_split_the_intermediate_dim(inter, stays_fp8):
    def experts(**kw):
        e = FusedMoEWeights(2, 256, inter, quant=_Q, dtype=torch.float32, device="cpu", **kw)
        e.init_random(torch.Generator().manual_seed(0), 0.02)
        if e.quant is None:
            return e.w13.data, e.w2.data, e
        b = e.quant.block
        return (
            block_dequant(e.w13.data, e.w13_scale.data, b),
            block_dequant(e.w2.data, e.w2_scale.data, b),
            e,
        )

    w13, w2, _ = experts()
    half = inter // 2
    for rank in range(2):
        with _as_rank(rank, 2):
            s13, s2, e = experts(inter_shard=parallel.split(inter, "moe_intermediate_size"))
        assert (e.w13.dtype == FP8_DTYPE) == stays_fp8
        rows = slice(rank * half, (rank + 1) * half)
        torch.testing.assert_close(
            s13, torch.cat([w13[:, rows], w13[:, inter:][:, rows]], 1), rtol=0, atol=0
        )
        torch.testing.assert_close(s2, w2[:, :, rows], rtol=0, atol=0)


def test_kv_heads_split_or_replicate():
    # 32 query heads, 4 kv heads (Qwen3-30B-A3B): split at TP 2 and 4, replicated at TP 8
    got = {}
    for size in (2, 4, 8):
        for rank in range(size):
            with _as_rank(rank, size):
                got[size, rank] = parallel.kv_head_split(32, 4)
    assert [got[2, r] for r in range(2)] == [(0, 2), (2, 2)]
    assert [got[8, r] for r in range(8)] == [(r // 2, 1) for r in range(8)]
    with _as_rank(0, 3), pytest.raises(ValueError, match="divisible"):
        parallel.kv_head_split(32, 4)


def test_vocab_rows_cover_the_vocabulary_once():
    spans = []
    for rank in range(4):
        with _as_rank(rank, 4):
            spans.append(parallel.padded_split(151665))
    assert spans[0][0] == 0 and all(
        a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)
    )
    assert spans[-1][0] < 151665 <= spans[-1][0] + spans[-1][1]


@pytest.mark.timeout(120)
def test_expert_parallel_matches_tp1():
    """--enable-expert-parallel: each rank holds 4 of tiny-moe's 8 experts whole."""
    prompts = _prompts(5)
    results = {}
    for tp, ep in ((1, False), (2, True)):
        engine = GenEngine(
            EngineArgs(
                model="tiny-moe",
                random_weights=True,
                max_num_seqs=8,
                tensor_parallel_size=tp,
                enable_expert_parallel=ep,
            )
        )
        try:
            experts = engine.model.model.layers[0].mlp.experts
            assert experts.w13.shape[0] == 8 // tp and experts.expert_shard == (0, 8 // tp)
            results[tp] = (
                _logits_of_steps(engine, prompts, 3),
                [r.token_ids for r in engine.generate(prompts, _greedy(12))],
            )
        finally:
            engine.shutdown()
    for a, b in zip(results[1][0], results[2][0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert results[2][1] == results[1][1]


@pytest.mark.parametrize(
    "choice,device,size,used,expected",
    [
        ("auto", "cuda", 2, False, "symm-mem"),
        ("auto", "cuda", 2, True, "nccl"),  # a second TP engine in one process
        ("auto", "cuda", 1, False, "nccl"),
        ("auto", "cpu", 2, False, "nccl"),  # the process group: gloo on CPU
        ("nccl", "cuda", 2, False, "nccl"),
        ("symm-mem", "cuda", 2, True, "symm-mem"),  # asked for: init refuses it, not this
    ],
)
def test_the_default_all_reduce_is_symm_mem_on_gpus_only(
    choice, device, size, used, expected, monkeypatch
):
    monkeypatch.setattr(parallel, "_symm_used", used)
    assert EngineArgs.tp_all_reduce == "auto"
    assert parallel.resolve_all_reduce(choice, torch.device(device), size) == expected


def test_an_unknown_all_reduce_is_refused():
    with pytest.raises(ValueError, match=r"one of \('auto', 'nccl', 'symm-mem'\), got 'ring'"):
        parallel.resolve_all_reduce("ring", torch.device("cpu"), 2)
