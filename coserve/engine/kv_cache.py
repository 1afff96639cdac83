"""The paged KV cache: one tensor [2, layers, num_blocks + 1, block_size, kv_heads, head_dim]
(k then v) and a block manager that hands out blocks of `block_size` token slots. The last
block is the null block: padded rows of a static-shape decode batch read and write there,
and no sequence ever owns it."""

from __future__ import annotations

import itertools
import operator
from collections import deque

import torch

from coserve.engine.sequence import Sequence

_KEY = operator.attrgetter("block_table_key")
_TABLE = operator.attrgetter("block_table")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def usable_blocks(kv_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """Blocks a sequence can own in a `kv_bytes` budget: whole blocks, less the null block.
    Negative when not even the null block fits."""
    return kv_bytes // (bytes_per_token * block_size) - 1


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device,
) -> torch.Tensor:
    return torch.zeros(
        2,
        num_layers,
        num_blocks + 1,
        block_size,
        num_kv_heads,
        head_dim,
        dtype=dtype,
        device=device,
    )


class BlockManager:
    """The only writer of sequences' block tables. A table only grows (`grow`) until `free`
    ends it; each table gets a key of its own (`Sequence.block_table_key`, never reused), so
    that a reader may keep what it copied of a table by its key and length (the runner's
    host staging, engine/steps.py)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._keys = itertools.count(1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def blocks_to_hold(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first num_tokens tokens have a slot."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_to_hold(seq, num_tokens) <= self.num_free - reserve

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_to_hold(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError("out of KV blocks (the scheduler should have checked)")
        if not seq.block_table_key:
            seq.block_table_key = next(self._keys)
        seq.block_table.extend(self._free.popleft() for _ in range(n))

    def grow_one_each(self, seqs: list[Sequence]) -> list[int]:
        """One more block for each of `seqs` (which hold a table already), in order, as
        `grow` one by one would give them; returns the blocks. RuntimeError if the free
        blocks are too few."""
        k = len(seqs)
        if k > self.num_free:
            raise RuntimeError("out of KV blocks (the scheduler should have checked)")
        if not all(map(_KEY, seqs)):
            raise ValueError("grow_one_each needs sequences that hold a table")
        take = self._free.popleft
        new = [take() for _ in range(k)]
        deque(map(list.append, map(_TABLE, seqs), new), maxlen=0)
        return new

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.block_table_key = 0
