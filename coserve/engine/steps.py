"""A model step in host form, and the host rows its inputs are staged in.

A step is prepared on rank 0 as a `StaticStep` (rows padded to a bucket, inputs in
persistent buffers) or a `VarlenStep` (packed tokens); both hold host ints only, so rank 0
hands them to the other ranks of a tensor-parallel engine as they are (engine/messages.py).
The bucket sizes are functions of the engine's limits, the same on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Row counts of the pure-decode buckets: 1, 2, 4, 8, 16, 32, ... and max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def static_token_capacity(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Rows of the largest static bucket: a full decode batch plus as many prompt tokens
    (at most 512), so that a step which admits a few short prompts stays on the graph path."""
    extra = min(max(max_num_seqs, 16), 512)
    return max(max_num_seqs, min(max_num_batched_tokens, max_num_seqs + extra))


def mixed_buckets(max_num_seqs: int, capacity: int) -> list[int]:
    """Row counts above max_num_seqs (decodes plus prompt tokens), in steps of 32."""
    sizes = list(range(max_num_seqs + 32, capacity, 32))
    return sizes + [capacity] if capacity > max_num_seqs else []


@dataclass(frozen=True)
class StaticStep:
    rows: int  # the bucket (or, eager, the exact token count)
    width: int  # block-table columns the kernels see
    n: int  # real tokens; rows n..rows-1 are padding
    sampling: list[int] | None  # rows that sample; None: rows 0..n-1 (a pure decode)
    greedy: bool = False  # return greedy token ids [sampling rows], not logits
    # input ids of rows 0..len(feed)-1 come from the previous greedy step's tokens on the
    # device (rows `feed` of them): that step's tokens need not reach the host first
    feed: np.ndarray | None = None
    # the staged host rows, for ranks that did not stage them (block tables: the columns
    # in use; the rest are the null block)
    arrays: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class VarlenStep:
    ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: np.ndarray  # [sequences, width] int32
    num_decode: int
    last: list[int]  # token rows that sample
    greedy: bool = False


# a block-table row of a HostStage whose content is not known (another rank wrote it)
UNKNOWN_TABLE = -1


class HostStage:
    """One set of host rows for the per-step copies (page-locked on CUDA), with what each
    block-table row holds: (the key of the block table it copies, entries copied). A row is
    rewritten only where this changes: another table moves in, or its table gains blocks
    (a table only grows while its key holds: kv_cache.BlockManager). Key 0: no table (a
    padding row of null blocks)."""

    def __init__(
        self, bufs: dict[str, torch.Tensor], null_block: int, device: torch.device
    ) -> None:
        pin = device.type == "cuda"
        self.host = {
            name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin) for name, t in bufs.items()
        }
        self.np = {name: t.numpy() for name, t in self.host.items()}
        self.null_block = null_block
        self.np["block_tables"].fill(null_block)
        rows = bufs["input_ids"].shape[0]
        # what each block-table row holds, as arrays so that a step compares all rows at once
        self.row_key = np.zeros(rows, dtype=np.int64)
        self.row_len = np.zeros(rows, dtype=np.int64)
        self.event = torch.cuda.Event() if pin else None
        self._pending = False

    def table_row(self, i: int, key: int, table: Sequence[int]) -> None:
        """Row i of the block tables := `table` (the table with `key`), then null blocks."""
        rows = self.np["block_tables"]
        held, written = int(self.row_key[i]), int(self.row_len[i])
        n = len(table)
        if held == key and written == n:
            return
        if held == key and written < n:
            rows[i, written:n] = table[written:]
        else:
            rows[i, :n] = table
            if written > n:
                rows[i, n:written] = self.null_block
        self.row_key[i], self.row_len[i] = key, n

    def table_rows(self, keys: np.ndarray, tables: list[list[int]], rows: int) -> None:
        """Rows 0..len(tables)-1 := `tables` (with `keys`), rows len(tables)..rows-1 :=
        padding, as `table_row` row by row; the rows are compared in one pass, so the Python
        work is per row that changed (a table that moved in or grew), not per row."""
        n = len(tables)
        lens = np.fromiter(map(len, tables), np.int64, n)
        changed = (self.row_key[:n] != keys) | (self.row_len[:n] != lens)
        for i in np.flatnonzero(changed).tolist():
            self.table_row(i, int(keys[i]), tables[i])
        self._pad(n, rows)

    def table_rows_from(
        self, keys: np.ndarray, lens: np.ndarray, tables: np.ndarray, rows: int
    ) -> None:
        """As `table_rows`, from arrays: row i := tables[i, :lens[i]] (the table with
        keys[i]; `tables` holds the null block past each table's end) for i < len(keys),
        padding after. Array work only."""
        n = len(keys)
        held, written = self.row_key[:n], self.row_len[:n]
        changed = np.flatnonzero((held != keys) | (written != lens))
        if len(changed):
            # whole rows up to the longest of old and new (entries past a row's length are
            # the null block on both sides)
            w = int(max(lens[changed].max(), written[changed].max()))
            have = min(w, tables.shape[1])
            bt = self.np["block_tables"]
            bt[changed, :have] = tables[changed, :have]
            if w > have:
                bt[changed, have:w] = self.null_block
            held[changed] = keys[changed]
            written[changed] = lens[changed]
        self._pad(n, rows)

    def _pad(self, n: int, rows: int) -> None:
        pad = np.flatnonzero(self.row_len[n:rows] | self.row_key[n:rows]) + n
        if len(pad):
            # a padding row past its written entries is the null block already
            self.np["block_tables"][pad] = self.null_block
            self.row_key[pad] = 0
            self.row_len[pad] = 0

    def forget_rows(self, rows: int, width: int) -> None:
        """Rows 0..rows-1 were written from elsewhere (another rank's staging), up to
        column `width`: compare nothing against what they held before."""
        self.row_key[:rows] = UNKNOWN_TABLE
        self.row_len[:rows] = width

    def copied(self) -> None:
        """The copies out of this set are queued: mark where they end."""
        if self.event is not None:
            self.event.record()
            self._pending = True

    def wait(self) -> None:
        """Until the last copies out of this set have run (it is about to be rewritten)."""
        if self._pending:
            self.event.synchronize()
            self._pending = False
