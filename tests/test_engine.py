"""GenEngine and EmbedEngine on tiny presets: continuous batching changes nothing,
preemption loses nothing, sampling is reproducible, limits are enforced."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from coserve.engine.embed_engine import EmbedEngine
from coserve.engine.gen_engine import GenEngine
from coserve.engine.types import EngineArgs, SamplingParams


def _engine(model="tiny-dense", **kw) -> GenEngine:
    return GenEngine(EngineArgs(model=model, random_weights=True, **kw))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def engine(request) -> GenEngine:
    return _engine(request.param, max_num_seqs=16)


@pytest.fixture(scope="module")
def alone(engine) -> dict[int, list[int]]:
    """Greedy outputs of each prompt run alone (the reference for batching tests)."""
    return {i: engine.generate([p], _greedy(8))[0].token_ids for i, p in enumerate(_prompts(7))}


def test_greedy_is_deterministic(engine):
    p = _prompts(2, seed=5)
    a = engine.generate(p, _greedy(10))
    b = engine.generate(p, _greedy(10))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 10 and r.finish_reason == "length" for r in a)


def test_concurrent_greedy_equals_each_alone(engine, alone):
    prompts = _prompts(7)
    # staggered arrivals: new requests join while others decode
    outs: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"c{i}", p, _greedy(8))
        if i % 3 == 0:
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert {int(k[1:]): v for k, v in outs.items()} == alone


def test_static_buckets_equal_eager_and_chunked_prefill():
    prompts = _prompts(6, seed=3)
    ref = [r.token_ids for r in _engine(enforce_eager=True).generate(prompts, _greedy(8))]
    static = _engine(max_num_seqs=8)
    assert static.runner.buckets == [1, 2, 4, 8]
    assert [r.token_ids for r in static.generate(prompts, _greedy(8))] == ref
    chunked = _engine(max_num_batched_tokens=7)  # prompts split across steps
    assert [r.token_ids for r in chunked.generate(prompts, _greedy(8))] == ref


def test_preemption_under_tiny_kv_budget_completes_everything():
    # tiny-dense: 2 layers x 2 kv heads x 64 dims x 2 (k, v) x 4 B = 2048 B/token;
    # 7 blocks of 16 tokens (one is the null block) -> 96 tokens for 8 requests of ~45
    e = _engine(cpu_kv_cache_bytes=7 * 16 * 2048, max_model_len=96)
    assert e.kv_capacity_tokens == 96
    prompts = _prompts(8, seed=9)
    # reference: the same requests with room to spare (batched == alone is tested above)
    ref = [r.token_ids for r in _engine(max_model_len=96).generate(prompts, _greedy(24))]
    usage = []
    for i, p in enumerate(prompts):
        e.add_request(str(i), p, _greedy(24))
    outs: dict[str, list[int]] = {}
    finished = {}
    while e.has_unfinished():
        for o in e.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            assert o.completion_tokens == len(outs[o.request_id])
            if o.finished:
                finished[o.request_id] = o.finish_reason
        usage.append(e.stats()["kv_cache_usage"])
    s = e.stats()
    assert s["num_preemptions"] > 0
    assert max(usage) > 0.8 and s["kv_cache_usage"] == 0.0
    assert finished == {str(i): "length" for i in range(8)}
    assert [outs[str(i)] for i in range(8)] == ref
    assert s["generation_tokens_total"] == 8 * 24
    assert s["prompt_tokens_total"] == sum(len(p) for p in prompts)


def test_max_num_seqs_bounds_the_running_batch():
    e = _engine(max_num_seqs=3)
    for i, p in enumerate(_prompts(7)):
        e.add_request(str(i), p, _greedy(5))
    seen = 0
    while e.has_unfinished():
        e.step()
        s = e.stats()
        assert s["num_running"] <= 3
        seen = max(seen, s["num_waiting"])
    assert seen >= 4


def test_seeded_sampling_is_reproducible(engine):
    p = _prompts(1, seed=11)[0]
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    a = engine.generate([p], sp)[0].token_ids
    # same seed inside a busy batch, next to unseeded requests
    batch = engine.generate(
        [p] + _prompts(4, seed=12), [sp] + [SamplingParams(max_tokens=16, temperature=1.0)] * 4
    )
    assert batch[0].token_ids == a
    other = engine.generate(
        [p], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=4321, ignore_eos=True)
    )[0].token_ids
    assert other != a


def test_eos_stops_unless_ignore_eos():
    e = _engine()
    p = _prompts(1, seed=2)[0]
    free_run = e.generate([p], _greedy(20))[0].token_ids
    eos = free_run[5]
    stop_at = free_run.index(eos)
    e.eos_token_ids = {eos}
    stopped = e.generate([p], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run[: stop_at + 1]  # the EOS token is reported
    ignored = e.generate([p], _greedy(20))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == free_run


def test_limits_raise_value_errors():
    e = _engine(max_model_len=64)
    assert e.max_model_len == 64
    with pytest.raises(ValueError, match="maximum context length is 64"):
        e.add_request("a", [1] * 60, SamplingParams(max_tokens=5))
    e.add_request("ok", [1] * 60, SamplingParams(max_tokens=4))  # exactly fits
    for bad_ids, msg in [
        ([], "non-empty"),
        ([1, 999], "out of vocabulary"),
        ([1, -1], "out of"),
        ([1, "x"], "integers"),
    ]:
        with pytest.raises(ValueError, match=msg):
            e.add_request("b", bad_ids, SamplingParams(max_tokens=1))
    for params, msg in [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=1, temperature=-1), "temperature"),
        (SamplingParams(max_tokens=1, top_p=0), "top_p"),
    ]:
        with pytest.raises(ValueError, match=msg):
            e.add_request("c", [1], params)
    with pytest.raises(ValueError, match="already in use"):
        e.add_request("ok", [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _engine(max_model_len=10**6)
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        _engine(cpu_kv_cache_bytes=4 * 16 * 2048, max_model_len=100)
    with pytest.raises(ValueError, match="random-weights"):
        GenEngine(EngineArgs(model="tiny-dense"))
    with pytest.raises(ValueError, match="embed"):
        GenEngine(EngineArgs(model="tiny-embed", random_weights=True))


def test_abort_frees_blocks_and_stops_outputs():
    e = _engine()
    e.add_request("keep", [1, 2, 3], _greedy(6))
    e.add_request("drop", [4, 5, 6], _greedy(50))
    e.step()
    e.abort("drop")
    e.abort("unknown")  # no-op
    ids = set()
    while e.has_unfinished():
        ids |= {o.request_id for o in e.step()}
    assert ids == {"keep"} and e.stats()["kv_cache_usage"] == 0.0


def test_text_prompts_through_the_byte_tokenizer():
    e = _engine()
    r = e.generate(["hello"], _greedy(4))[0]
    assert r.prompt_token_ids == list(b"hello") and isinstance(r.text, str)
    assert e.tokenizer.decode(e.tokenizer.encode("héllo")) == "héllo"


# -- embeddings ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny-embed", "all-minilm-l6-v2"])
def embedder(request) -> EmbedEngine:
    return EmbedEngine(
        EngineArgs(
            model=request.param,
            random_weights=request.param == "tiny-embed",
            max_num_batched_tokens=64,
        )
    )


def test_embed_batching_equals_one_at_a_time(embedder):
    texts = ["a short one", "the quick brown fox jumps over the lazy dog " * 3, "x", "hello there"]
    ids = [embedder.tokenizer.encode(t) for t in texts]
    single = torch.tensor(np.stack([embedder.embed([x])[0] for x in ids]))
    # several concurrent requests, packed into batches of <= 64 tokens
    embedder.add_request("r0", ids[:2])
    embedder.add_request("r1", ids[2:3])
    embedder.add_request("r2", ids[3:])
    got, steps = {}, 0
    while embedder.has_unfinished():
        steps += 1
        for o in embedder.step():
            got[o.request_id] = o
    assert steps < 4  # requests were batched together
    batched = torch.tensor(np.concatenate([got[r].embeddings for r in ("r0", "r1", "r2")]))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert batched.shape[1] == embedder.dim
    assert got["r0"].prompt_tokens == len(ids[0]) + len(ids[1])


def _over_half_a_pass(embedder) -> int:
    return embedder.max_num_batched_tokens // 2 + 1


class _Running:
    """A pass's CUDA event, on the CPU: its vectors are there, but the engine must take
    the pass for one still running on a GPU."""

    def synchronize(self) -> None:
        pass


@pytest.fixture
def overlapping(embedder, monkeypatch) -> EmbedEngine:
    """`embedder` with every pass it launches taken for one still running (as on a GPU)."""
    launch = embedder._launch

    def running(batch):
        done = launch(batch)
        return done and dataclasses.replace(done, ready=_Running())

    monkeypatch.setattr(embedder, "_launch", running)
    return embedder


def test_embed_steps_overlap_answering_each_batch_one_step_later(overlapping):
    """While one pass runs the host answers the previous one: a step queues its batch and
    answers the batch before it; a step with nothing new answers the last one."""
    one = [[5] * _over_half_a_pass(overlapping)]  # each request is a pass of its own
    overlapping.add_request("a", one)
    overlapping.add_request("b", one)
    assert overlapping.step() == [] and overlapping.in_flight
    assert [o.request_id for o in overlapping.step()] == ["a"]
    assert [o.request_id for o in overlapping.step()] == ["b"]
    assert not overlapping.in_flight and not overlapping.has_unfinished()


def test_on_the_cpu_a_step_answers_its_own_batch(embedder):
    """A pass on the CPU is done by the time its step returns: answered one step later, a
    request waited for the next request's whole pass too (served, twice its latency)."""
    one = [[5] * _over_half_a_pass(embedder)]
    embedder.add_request("a", one)
    embedder.add_request("b", one)
    assert [o.request_id for o in embedder.step()] == ["a"]
    assert not embedder.in_flight
    assert [o.request_id for o in embedder.step()] == ["b"]
    assert not embedder.has_unfinished()


def test_embed_without_overlap_answers_its_own_batch_and_drain_answers_the_one_in_flight(
    overlapping,
):
    embedder = overlapping
    one = [[7] * _over_half_a_pass(embedder)]
    embedder.add_request("a", one)
    embedder.add_request("b", one)
    assert embedder.step() == []
    embedder.overlap = False
    try:
        assert [o.request_id for o in embedder.step()] == ["a", "b"]
        embedder.add_request("c", one)
        assert [o.request_id for o in embedder.step()] == ["c"]
    finally:
        embedder.overlap = True
    embedder.add_request("d", one)
    assert embedder.step() == []
    assert [o.request_id for o in embedder.drain()] == ["d"]
    assert embedder.drain() == [] and not embedder.has_unfinished()


def test_an_aborted_request_in_flight_is_never_answered(overlapping):
    embedder = overlapping
    embedder.add_request("gone", [[9] * _over_half_a_pass(embedder)])
    embedder.add_request("kept", [[9] * _over_half_a_pass(embedder)])
    assert embedder.step() == []
    embedder.abort("gone")
    outs = []
    while embedder.has_unfinished() or embedder.in_flight:
        outs += embedder.step() or embedder.drain()
    assert [o.request_id for o in outs] == ["kept"]


def test_embed_limits(embedder):
    n = embedder.max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        embedder.add_request("long", [[5] * (n + 1)])
    for bad in ([], [[]], [[1, embedder.vocab_size]], [[1.5]]):
        with pytest.raises(ValueError):
            embedder.add_request("bad", bad)
    embedder.add_request("fits", [[5] * n])
    embedder.add_request("aborted", [[5, 6]])
    embedder.abort("aborted")
    outs = []
    while embedder.has_unfinished():
        outs += embedder.step()
    assert [o.request_id for o in outs] == ["fits"]
    assert embedder.stats()["prompt_tokens_total"] >= n


def test_bfloat16_with_fp8_weights_kept_runs_like_the_gpu_path(monkeypatch):
    import coserve.engine.ranks as ranks
    from coserve.engine.weights import load_model

    def keep_fp8(*a, **kw):
        return load_model(*a, **kw, keep_fp8=True)

    monkeypatch.setattr(ranks, "load_model", keep_fp8)
    e = _engine("tiny-moe", dtype="bfloat16", max_num_seqs=4)
    assert e.model.model.layers[0].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert e.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    outs = e.generate(_prompts(3), _greedy(5))
    assert [len(r.token_ids) for r in outs] == [5, 5, 5]
