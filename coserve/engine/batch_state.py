"""The running batch in arrays, kept from step to step (as vLLM's InputBatch): row i is the
scheduler's i-th running sequence, with its token count, last token, tokens in the cache,
block table (key, length and entries) and what its stop test needs. The scheduler changes
the rows where the batch changes (a sequence joins, leaves, grows a block, decodes a token),
so a decode step is staged and advanced by array operations over the batch instead of a
Python pass over the sequence objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from coserve.engine.sequence import Sequence

# the one-value-per-row arrays (tables and stop_ids have a second axis)
_ROW_ARRAYS = (
    "num_tokens",
    "last_token",
    "computed",
    "prompt",
    "table_key",
    "table_len",
    "max_total",
    "plain_greedy",
)


@dataclass(frozen=True, eq=False)
class DecodeRows:
    """A pure decode step's rows as scheduled: [n] int64 arrays (copies) and the batch's
    block tables (a view, valid while `current`: rows past a table's length hold the
    null block)."""

    num_tokens: np.ndarray  # tokens each sequence holds, the one to decode included
    last_token: np.ndarray  # its last host token (a placeholder ahead of the host: any)
    table_key: np.ndarray
    table_len: np.ndarray
    tables: np.ndarray  # [>= n, width] int32: entries, then the null block
    plain_greedy: bool  # every sequence's is (Sequence.plain_greedy)
    ahead: int  # tokens in flight, not yet on the host (num_tokens counts them)
    state: BatchState
    version: int

    @property
    def current(self) -> bool:
        """The rows of `tables` are still this step's (the batch has not changed since)."""
        return self.state.version == self.version


class BatchState:
    """Arrays over the running sequences, in the scheduler's running order. Only the
    scheduler writes them (and the sequences they mirror); capacity grows as needed.

    Rows hold, per sequence: num_tokens (len(token_ids)), last_token, computed
    (num_computed_tokens), table_key / table_len / tables (its block table, then
    `null_block`), max_total (tokens at which max_tokens ends it), plain_greedy, stop_ids
    (its stop_token_ids, padded with -1); and `seqs` / `request_ids`, lists in row order."""

    def __init__(self, null_block: int, rows: int = 16, width: int = 8) -> None:
        self.null_block = null_block
        self.n = 0
        self.version = 0  # changes whenever a row's table may move or change
        self.seqs: list[Sequence] = []
        self.request_ids: list[str] = []
        self._alloc(max(rows, 1), max(width, 1), 0)

    def _alloc(self, rows: int, width: int, stops: int) -> None:
        old = self.__dict__.get("num_tokens")
        n = self.n if old is not None else 0
        fresh = {
            "num_tokens": np.zeros(rows, np.int64),
            "last_token": np.zeros(rows, np.int64),
            "computed": np.zeros(rows, np.int64),
            "prompt": np.zeros(rows, np.int64),
            "table_key": np.zeros(rows, np.int64),
            "table_len": np.zeros(rows, np.int64),
            "max_total": np.zeros(rows, np.int64),
            "plain_greedy": np.zeros(rows, bool),
            "tables": np.full((rows, width), self.null_block, np.int32),
            "stop_ids": np.full((rows, stops), -1, np.int64),
        }
        for name, a in fresh.items():
            if old is not None:
                prev = getattr(self, name)
                if a.ndim == 1:
                    a[:n] = prev[:n]
                else:
                    a[:n, : prev.shape[1]] = prev[:n]
            setattr(self, name, a)
        self.version += 1

    def _fit(self, rows: int, width: int, stops: int) -> None:
        have_rows, have_width = self.tables.shape
        have_stops = self.stop_ids.shape[1]
        if rows > have_rows or width > have_width or stops > have_stops:
            self._alloc(
                max(rows, 2 * have_rows if rows > have_rows else have_rows),
                max(width, 2 * have_width if width > have_width else have_width),
                max(stops, have_stops),
            )

    # -- joins and leaves -------------------------------------------------------------------
    def rebuild(self, seqs: list[Sequence]) -> None:
        """Rows := `seqs`, read from the sequences (a pass over them: for the rare changes,
        preemption, or a running list changed from outside)."""
        self.n = 0
        self.seqs, self.request_ids = [], []
        self.version += 1
        for seq in seqs:
            self.append(seq)

    def append(self, seq: Sequence) -> None:
        """A row for `seq` (which has just started decoding) after the others."""
        stops = seq.params.stop_token_ids
        i = self.n
        self._fit(i + 1, len(seq.block_table), len(stops))
        self.num_tokens[i] = len(seq.token_ids)
        self.last_token[i] = seq.token_ids[-1]
        self.computed[i] = seq.num_computed_tokens
        self.prompt[i] = seq.num_prompt_tokens
        self.max_total[i] = seq.max_total_tokens
        self.plain_greedy[i] = seq.plain_greedy
        self.stop_ids[i] = -1
        self.stop_ids[i, : len(stops)] = stops
        self.tables[i] = self.null_block
        self.table_key[i] = self.table_len[i] = 0
        self.set_table(i, seq)
        self.seqs.append(seq)
        self.request_ids.append(seq.request_id)
        self.n = i + 1

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where `mask` [n] bool holds, in order; the rest leave."""
        n = self.n
        gone = np.flatnonzero(~mask[:n])
        if not len(gone):
            return
        first = int(gone[0])
        rows = np.flatnonzero(mask[first:n]) + first
        m = first + len(rows)
        used = int(self.table_len[first:n].max())
        for name in _ROW_ARRAYS:
            a = getattr(self, name)
            a[first:m] = a[rows]
        if self.stop_ids.shape[1]:
            self.stop_ids[first:m] = self.stop_ids[rows]
        self.tables[first:m, :used] = self.tables[rows, :used]
        keep = mask[first:n].tolist()
        self.seqs[first:] = [s for s, k in zip(self.seqs[first:n], keep, strict=True) if k]
        self.request_ids[first:] = [
            r for r, k in zip(self.request_ids[first:n], keep, strict=True) if k
        ]
        self.n = m
        self.version += 1

    def remove(self, i: int) -> None:
        mask = np.ones(self.n, dtype=bool)
        mask[i] = False
        self.keep(mask)

    # -- growth -----------------------------------------------------------------------------
    def set_table(self, i: int, seq: Sequence) -> None:
        """Row i's table := seq's (which has only grown since the row took it, or is new)."""
        table = seq.block_table
        old, new = int(self.table_len[i]), len(table)
        if self.table_key[i] != seq.block_table_key:
            old = 0
        self._fit(self.n, new, 0)
        self.tables[i, old:new] = table[old:]
        self.table_key[i] = seq.block_table_key
        self.table_len[i] = new
        self.version += 1

    def append_blocks(self, rows: np.ndarray, blocks: list[int]) -> None:
        """Rows `rows` (distinct) each gained one block (`blocks`, in the same order) at
        the end of their tables."""
        lens = self.table_len[rows]
        self._fit(self.n, int(lens.max()) + 1, 0)
        self.tables[rows, lens] = blocks
        self.table_len[rows] = lens + 1
        self.version += 1

    def blocks_short(self, block_size: int, ahead: int) -> np.ndarray:
        """[n] blocks each row lacks for a slot per token it holds, plus `ahead` tokens."""
        n = self.n
        return -(-(self.num_tokens[:n] + ahead) // block_size) - self.table_len[:n]

    def decode_rows(self, ahead: int) -> DecodeRows:
        """The rows as a decode step, each with `ahead` more tokens than the host has."""
        n = self.n
        return DecodeRows(
            self.num_tokens[:n] + ahead,
            self.last_token[:n].copy(),
            self.table_key[:n].copy(),
            self.table_len[:n].copy(),
            self.tables,
            bool(self.plain_greedy[:n].all()),
            ahead,
            self,
            self.version,
        )

    # -- a decode step's tokens -------------------------------------------------------------
    def advance(self, tokens: np.ndarray, eos: Iterable[int], max_model_len: int) -> np.ndarray:
        """Rows 0..len(tokens)-1 each take their token ([k] int64). Returns the rows whose
        token may end them (max_tokens or max_model_len reached, an EOS or stop token): a
        superset of those that end, for the exact test."""
        k = len(tokens)
        lens = self.num_tokens[:k]
        lens += 1
        self.computed[:k] += 1
        self.last_token[:k] = tokens
        maybe = (lens >= self.max_total[:k]) | (lens >= max_model_len)
        for e in eos:  # a few ids: a compare each is cheaper than np.isin
            maybe |= tokens == e
        if self.stop_ids.shape[1]:
            maybe |= (self.stop_ids[:k] == tokens[:, None]).any(axis=1)
        return np.flatnonzero(maybe)
