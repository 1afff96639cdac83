"""The generation engine's account of each step's work (sequences, prompt tokens, KV tokens
read), which the SLO guard fits gen alone's step time to: exact figures for a known
request, and agreement with a count over the batch through chunked prefill, async decode,
preemption and aborts."""

from __future__ import annotations

import random

import pytest

from coserve.engine.gen_engine import GenEngine
from coserve.engine.types import EngineArgs, SamplingParams, StepWork


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_request_s_steps_read_its_whole_context(async_scheduling):
    e = GenEngine(
        EngineArgs(model="tiny-dense", random_weights=True, async_scheduling=async_scheduling)
    )
    e.add_request("r", list(range(1, 11)), _greedy(4))
    works = []
    while e.has_unfinished():
        e.step()
        works.append(e.last_step_work)
    # the prompt's 10 tokens, then decodes attending to 11, 12, 13 tokens (the new one's
    # included); async, the engine launches a decode ahead of the one that ends the request,
    # and the GPU runs it (14 tokens) though its token is dropped
    expected = [StepWork(1, 10, 10), *(StepWork(1, 0, n) for n in (11, 12, 13))]
    assert works == expected + ([StepWork(1, 0, 14)] if async_scheduling else [])
    assert e.scheduler.cached_tokens == 0


def test_step_work_matches_a_count_over_the_batch_through_chunks_preemption_and_aborts():
    # 7 blocks of 16 tokens: preemptions; a 24-token budget: prompts split across steps
    e = GenEngine(
        EngineArgs(
            model="tiny-dense",
            random_weights=True,
            cpu_kv_cache_bytes=7 * 16 * 2048,
            max_model_len=96,
            max_num_batched_tokens=24,
            enforce_eager=True,
        )
    )
    sch = e.scheduler
    counted = []
    real = sch.step_work

    def checked(batch, gone=None):
        work = real(batch, gone)
        holders = [s for s in (*sch.running, *sch.waiting) if s.num_computed_tokens]
        assert sch.cached_tokens == sum(s.num_computed_tokens for s in holders)
        if {id(s) for s in holders} <= {id(s) for s in batch.seqs}:
            pairs = [
                *zip(batch.seqs, batch.num_new_tokens, strict=True),
                *((s, 1) for s in gone or []),
            ]
            prefill = sum(batch.num_new_tokens) - batch.num_decode
            kv = sum(s.num_computed_tokens + n for s, n in pairs)
            assert work == StepWork(len(pairs), prefill, kv)
            counted.append(work)
        return work

    sch.step_work = checked
    rng = random.Random(5)
    for i in range(8):
        e.add_request(str(i), [rng.randrange(256) for _ in range(rng.randint(10, 40))], _greedy(24))
    steps = 0
    while e.has_unfinished():
        e.step()
        steps += 1
        if steps == 6:
            e.abort("3")
    assert sch.num_preemptions > 0
    assert any(w.prefill_tokens and w.seqs > 1 for w in counted)  # decodes beside a chunk
    assert len(counted) > steps // 2
    assert sch.cached_tokens == 0
