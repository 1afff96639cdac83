"""The runner's host staging keeps each block-table row by the table's key and length: a row
is rewritten when another table moves in, even one of the same length, and extended when its
table grows; the block manager gives every new table a key of its own. The batch-at-once
forms of the per-step host work (table rows, the scheduler's end tests) do what the
row-by-row ones do."""

from __future__ import annotations

import random

import numpy as np
import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.scheduler import ScheduledBatch, Scheduler
from coserve.engine.sequence import SeqStatus, Sequence
from coserve.engine.steps import HostStage
from coserve.engine.types import SamplingParams

NULL = 9


def _stage(rows: int = 2, width: int = 4) -> HostStage:
    bufs = {
        "input_ids": torch.zeros(rows, dtype=torch.int64),
        "block_tables": torch.zeros(rows, width, dtype=torch.int32),
    }
    return HostStage(bufs, NULL, torch.device("cpu"))


def _seq(rid: str) -> Sequence:
    return Sequence(rid, [1, 2, 3], 3, SamplingParams(max_tokens=4))


def test_a_freed_table_comes_back_under_a_new_key():
    blocks = BlockManager(num_blocks=8, block_size=2)
    s = _seq("a")
    blocks.grow(s, 3)
    first = s.block_table_key
    assert first > 0 and len(s.block_table) == 2
    blocks.grow(s, 5)
    assert s.block_table_key == first and len(s.block_table) == 3
    blocks.free(s)
    assert s.block_table_key == 0 and s.block_table == []
    blocks.grow(s, 1)
    assert s.block_table_key not in (0, first)


def test_a_row_follows_its_table_by_key_not_by_length():
    st = _stage()
    st.table_row(0, 1, [4, 5])
    assert st.np["block_tables"][0].tolist() == [4, 5, NULL, NULL]
    st.table_row(0, 1, [4, 5, 6])  # the same table, grown: only the new entry is written
    assert st.np["block_tables"][0].tolist() == [4, 5, 6, NULL]
    st.table_row(0, 2, [7, 3, 1])  # another table of the same length moves in
    assert st.np["block_tables"][0].tolist() == [7, 3, 1, NULL]
    st.table_row(0, 0, ())  # a padding row
    assert st.np["block_tables"][0].tolist() == [NULL] * 4


def test_table_rows_write_what_table_row_writes_row_by_row():
    rng = random.Random(3)
    fast, slow = _stage(rows=6, width=5), _stage(rows=6, width=5)
    tables = {k: [rng.randrange(8) for _ in range(5)] for k in range(1, 9)}
    for _ in range(200):
        n, rows = rng.randint(0, 4), rng.randint(4, 6)
        keys = [rng.randint(1, 8) for _ in range(n)]
        batch = [tables[k][: rng.randint(1, 5)] for k in keys]
        fast.table_rows(np.array(keys, dtype=np.int64), batch, rows)
        for i, (k, t) in enumerate(zip(keys, batch, strict=True)):
            slow.table_row(i, k, t)
        for i in range(n, rows):
            slow.table_row(i, 0, ())
        assert (fast.np["block_tables"] == slow.np["block_tables"]).all()
        assert fast.row_key.tolist() == slow.row_key.tolist()


def _running(scheduler: Scheduler, rid: str, prompt: int, **params) -> Sequence:
    s = Sequence(rid, list(range(prompt)), prompt, SamplingParams(temperature=0, **params))
    scheduler.blocks.grow(s, prompt)
    s.num_computed_tokens, s.status = prompt, SeqStatus.RUNNING
    scheduler.running.append(s)
    return s


def test_postprocess_ends_decodes_by_stop_eos_min_tokens_and_lengths():
    sch = Scheduler(BlockManager(num_blocks=64, block_size=4), 16, 64)
    eos = 7
    seqs = [
        _running(sch, "stop", 3, max_tokens=9, stop_token_ids=(5,)),
        _running(sch, "early-stop", 3, max_tokens=9, min_tokens=2, stop_token_ids=(5,)),
        _running(sch, "eos", 3, max_tokens=9),
        _running(sch, "eos-ignored", 3, max_tokens=9, ignore_eos=True),
        _running(sch, "max-tokens", 3, max_tokens=1),
        _running(sch, "model-len", 11, max_tokens=9),
        _running(sch, "stop-at-max", 3, max_tokens=1, stop_token_ids=(5,)),
        _running(sch, "goes-on", 3, max_tokens=9),
    ]
    batch = ScheduledBatch(list(seqs), [1] * len(seqs), len(seqs))
    got = sch.postprocess(batch, [5, 5, eos, eos, 1, 1, 5, 1], {eos}, max_model_len=12)
    assert got == seqs
    reasons = {s.request_id: s.finish_reason for s in seqs if s.status is SeqStatus.FINISHED}
    assert reasons == {
        "stop": "stop",
        "eos": "stop",
        "max-tokens": "length",
        "model-len": "length",
        "stop-at-max": "stop",
    }
    assert [s.request_id for s in sch.running] == ["early-stop", "eos-ignored", "goes-on"]
    assert all(s.num_computed_tokens == s.num_prompt_tokens + 1 for s in seqs)
