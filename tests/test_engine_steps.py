"""The runner's host staging keeps each block-table row by the table's key and length: a row
is rewritten when another table moves in, even one of the same length, and extended when its
table grows; the block manager gives every new table a key of its own."""

from __future__ import annotations

import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.sequence import Sequence
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
