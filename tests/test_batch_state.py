"""The scheduler's running batch in arrays (engine/batch_state.py) against a fresh pass over
the sequences, after random joins, finishes, aborts, preemptions, block growth and steps
scheduled ahead of the host; and the host rows staged from it against those staged from
the sequences."""

import random

import numpy as np
import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.scheduler import ScheduledBatch, Scheduler
from coserve.engine.sequence import SeqStatus, Sequence
from coserve.engine.steps import HostStage
from coserve.engine.types import SamplingParams

EOS = 3
BLOCK = 4


def _assert_mirrors(sch: Scheduler) -> None:
    """The batch state holds what a pass over `running` reads from the sequences."""
    st = sch.state
    assert st.seqs == sch.running and st.n == len(sch.running)
    assert st.request_ids == [s.request_id for s in sch.running]
    for i, s in enumerate(sch.running):
        t = s.block_table
        assert st.num_tokens[i] == len(s.token_ids) and st.last_token[i] == s.token_ids[-1]
        assert st.computed[i] == s.num_computed_tokens
        assert st.prompt[i] == s.num_prompt_tokens and st.max_total[i] == s.max_total_tokens
        assert st.plain_greedy[i] == s.plain_greedy
        assert st.table_key[i] == s.block_table_key and st.table_len[i] == len(t)
        assert st.tables[i, : len(t)].tolist() == t
        assert (st.tables[i, len(t) :] == st.null_block).all()
        stops = st.stop_ids[i][st.stop_ids[i] >= 0].tolist()
        assert stops == list(s.params.stop_token_ids)


def _stage(rows: int, width: int, null: int) -> HostStage:
    bufs = {
        "input_ids": torch.zeros(rows, dtype=torch.int64),
        "block_tables": torch.zeros(rows, width, dtype=torch.int32),
    }
    return HostStage(bufs, null, torch.device("cpu"))


def _params(rng: random.Random) -> SamplingParams:
    stops = tuple(rng.sample(range(4, 12), rng.choice([0, 0, 1, 3])))
    return SamplingParams(
        max_tokens=rng.randint(1, 18),
        temperature=rng.choice([0, 0, 0, 0.7]),
        stop_token_ids=stops,
        ignore_eos=rng.random() < 0.3,
        min_tokens=rng.choice([0, 0, 2]),
    )


def _tokens(rng: random.Random, k: int) -> list[int]:
    return [rng.choice([EOS, *range(4, 40)]) for _ in range(k)]


def _staged_alike(batch: ScheduledBatch, fast: HostStage, slow: HostStage, ahead: int) -> None:
    """Staging the batch from its arrays writes what staging from its sequences writes."""
    rows, seqs = batch.rows, batch.seqs
    assert rows is not None and rows.current and rows.ahead == ahead
    assert rows.num_tokens.tolist() == [len(s.token_ids) + ahead for s in seqs]
    assert rows.last_token.tolist() == [s.token_ids[-1] for s in seqs]
    assert rows.plain_greedy == all(s.plain_greedy for s in seqs)
    n = len(seqs)
    fast.table_rows_from(rows.table_key, rows.table_len, rows.tables, n + 2)
    keys = np.array([s.block_table_key for s in seqs], dtype=np.int64)
    slow.table_rows(keys, [s.block_table for s in seqs], n + 2)
    assert (fast.np["block_tables"] == slow.np["block_tables"]).all()
    assert fast.row_key.tolist() == slow.row_key.tolist()
    assert fast.row_len.tolist() == slow.row_len.tolist()


def test_batch_state_mirrors_the_sequences_through_random_histories():
    rng = random.Random(7)
    blocks = BlockManager(num_blocks=18, block_size=BLOCK)
    sch = Scheduler(blocks, max_num_seqs=12, max_num_batched_tokens=48, watermark=0.0)
    fast, slow = _stage(14, 40, blocks.null_block), _stage(14, 40, blocks.null_block)
    live: list[str] = []
    made_seqs: list[Sequence] = []
    made = steps = ahead_steps = 0
    for _ in range(400):
        for _ in range(rng.choice([0] * 5 + [1, 4])):
            made += 1
            n = rng.randint(1, 9)
            seq = Sequence(f"r{made}", _tokens(rng, n), n, _params(rng))
            sch.add(seq)
            made_seqs.append(seq)
            live.append(seq.request_id)
        if live and rng.random() < 0.15:
            sch.abort(live.pop(rng.randrange(len(live))))
            _assert_mirrors(sch)
        batch = sch.schedule()
        _assert_mirrors(sch)
        if batch is None:
            continue
        steps += 1
        if batch.is_decode:
            _staged_alike(batch, fast, slow, 0)
        sampling = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        ahead = sch.schedule_ahead() if batch.is_decode and rng.random() < 0.5 else None
        if ahead is not None:
            ahead_steps += 1
            _staged_alike(ahead, fast, slow, 1)
        sch.postprocess(batch, _tokens(rng, len(sampling)), {EOS}, max_model_len=28)
        _assert_mirrors(sch)
        if ahead is not None:
            # as the engine: sequences finished since the launch get nothing
            keep = [s for s in ahead.seqs if s.status is not SeqStatus.FINISHED]
            done = ScheduledBatch(keep, [1] * len(keep), len(keep))
            sch.postprocess(done, _tokens(rng, len(keep)), {EOS}, max_model_len=28)
            _assert_mirrors(sch)
        live = [r for r in live if any(s.request_id == r for s in (*sch.waiting, *sch.running))]
    assert steps > 200 and ahead_steps > 20
    assert sch.num_preemptions > 0
    assert {s.finish_reason for s in made_seqs} == {"stop", "length", None}  # None: aborted


def test_running_changed_from_outside_is_read_again():
    sch = Scheduler(BlockManager(num_blocks=16, block_size=BLOCK), 8, 32)
    a = Sequence("a", [5, 6, 7], 3, SamplingParams(max_tokens=4, ignore_eos=True))
    sch.blocks.grow(a, 3)
    a.num_computed_tokens, a.status = 2, SeqStatus.RUNNING
    sch.running.append(a)
    batch = sch.schedule()
    assert batch.rows is not None and batch.rows.num_tokens.tolist() == [3]
    _assert_mirrors(sch)
    got = sch.postprocess(batch, np.array([9]), set(), 64)
    assert got == [a] and a.token_ids == [5, 6, 7, 9] and a.num_computed_tokens == 3
    assert sch.decoded.request_ids == ["a"] and sch.decoded.completion_tokens == [1]
    _assert_mirrors(sch)
