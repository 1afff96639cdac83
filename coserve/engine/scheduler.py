"""Continuous batching, decode first (as vLLM's V1 scheduler). Every running sequence gets a
slot for its next token; the token budget left (`max_num_batched_tokens` minus the decodes)
goes to prompts, or chunks of them, in the same step, so new requests ride along with the
decode batch instead of taking steps of their own. A request is admitted only when the free
blocks hold its whole prompt (plus a small watermark). When a sequence's next token finds no
block, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the head of the queue, to be recomputed from its prompt and the tokens it already
produced (nothing it emitted is lost or repeated)."""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from coserve.engine.batch_state import BatchState, DecodeRows
from coserve.engine.kv_cache import BlockManager
from coserve.engine.sequence import SeqStatus, Sequence
from coserve.engine.types import StepWork

_TOKEN_IDS = operator.attrgetter("token_ids")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # the num_decode decoding sequences first, then prompt chunks
    num_new_tokens: list[int]  # tokens each sequence processes this step (decode: 1)
    num_decode: int
    # a pure decode as the running batch's arrays (the runner stages from them); None: read
    # the sequences
    rows: DecodeRows | None = None

    @property
    def is_decode(self) -> bool:
        """Only decodes: the static-shape (CUDA-graph) path."""
        return self.num_decode == len(self.seqs)

    def samples(self, i: int) -> bool:
        """Does sequence i produce a token this step (decode, or its prefill completes)?"""
        s = self.seqs[i]
        return i < self.num_decode or s.num_computed_tokens + self.num_new_tokens[i] == s.num_tokens


@dataclass
class DecodedTokens:
    """What a postprocess gave its decoding sequences (the first len(request_ids) it
    returns), for their outputs: per sequence its id, [token], prompt and completion
    lengths; `ended`: (index, finish reason) of those it finished."""

    request_ids: list[str]
    new_token_ids: list[list[int]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    ended: list[tuple[int, str]]


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark: float = 0.01,
        max_tokens_with_decodes: int | None = None,
    ) -> None:
        """max_tokens_with_decodes: the token budget of a step that has decodes (the runner's
        largest static bucket, so that such steps stay on the CUDA-graph path)."""
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_tokens_with_decodes = max_tokens_with_decodes
        self.watermark_blocks = int(watermark * blocks.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # `running` in arrays; rebuilt from the sequences if `running` was changed elsewhere
        self.state = BatchState(blocks.null_block)
        self.num_preemptions = 0
        # tokens whose KV is in the cache, over every sequence: kept as num_computed_tokens
        # moves, so a step's KV read is known without a pass over its sequences
        self.cached_tokens = 0
        # the decodes of the last postprocess, when it took the array path (else None)
        self.decoded: DecodedTokens | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    if queue is self.running:
                        st = self._synced()
                        st.remove(st.seqs.index(seq))
                        self.running = list(st.seqs)
                    else:
                        queue.remove(seq)
                    self._finish(seq, None)
                    return True
        return False

    def _synced(self) -> BatchState:
        """The batch state, rebuilt first if `running` was changed around it."""
        st = self.state
        if self.running != st.seqs:
            st.rebuild(self.running)
        return st

    def schedule(self) -> ScheduledBatch | None:
        decode = self._schedule_decode()
        budget = self.max_num_batched_tokens
        if decode and self.max_tokens_with_decodes is not None:
            budget = min(budget, self.max_tokens_with_decodes)
        prefill, counts = self._schedule_prefill(max(0, budget - len(decode)))
        if not decode and not prefill:
            return None
        rows = None if prefill else self.state.decode_rows(0)
        return ScheduledBatch(decode + prefill, [1] * len(decode) + counts, len(decode), rows)

    def schedule_ahead(self) -> ScheduledBatch | None:
        """The decode step after the one in flight, whose tokens the host does not have
        yet: every running sequence counts one token more (a slot for the token in flight's
        successor). None when a prompt waits or the free blocks do not cover every
        sequence's next slot (that step is scheduled once the host has the tokens)."""
        if self.waiting or not self.running:
            return None
        st = self._synced()
        need = st.blocks_short(self.blocks.block_size, 1)
        short = np.flatnonzero(need > 0)
        if int(need[short].sum()) > self.blocks.num_free:
            return None
        self._grow_rows(short, need, 1)
        n = st.n
        return ScheduledBatch(list(self.running), [1] * n, n, st.decode_rows(1))

    def _grow_rows(self, rows: np.ndarray, need: np.ndarray, ahead: int) -> None:
        """Give rows `rows` of the batch state (which lack need[rows] blocks) a slot per
        token they hold plus `ahead`."""
        st = self.state
        if not len(rows):
            return
        if (need[rows] == 1).all() and st.table_key[rows].all():
            # the decode case: a block each, handed out in row order as one by one
            seqs = [st.seqs[i] for i in rows.tolist()]
            st.append_blocks(rows, self.blocks.grow_one_each(seqs))
            return
        counts = (st.num_tokens[rows] + ahead).tolist()
        for i, count in zip(rows.tolist(), counts, strict=True):
            seq = st.seqs[i]
            self.blocks.grow(seq, count)
            st.set_table(i, seq)

    def _schedule_prefill(self, budget: int) -> tuple[list[Sequence], list[int]]:
        seqs, counts = [], []
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(seqs) >= self.max_num_seqs:
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            if seq.num_computed_tokens == 0:  # admission: the whole prompt must fit
                reserve = self.watermark_blocks if self.running else 0
                if not self.blocks.can_grow(seq, seq.num_tokens, reserve):
                    break
                n = min(remaining, budget)
            else:  # continuing a chunked prefill: as far as budget and free blocks go
                room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size
                n = min(remaining, budget, room - seq.num_computed_tokens)
                if n <= 0:
                    break
            self.blocks.grow(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return seqs, counts

    def step_work(self, batch: ScheduledBatch, gone: list[Sequence] | None = None) -> StepWork:
        """The work of `batch`, before `postprocess` advances it; `gone`: decodes the GPU ran
        in it that finished (or were aborted) since it was launched ahead, and so left it.
        Its attention reads the cached tokens of its sequences plus its new ones; the cached
        count is every sequence's, which is the batch's whenever every sequence holding KV
        runs in it (all running ones do; a chunked prompt the budget left out is the
        exception). O(prompt chunks + gone), not O(batch)."""
        prefill = sum(batch.num_new_tokens[batch.num_decode :])
        kv = self.cached_tokens + batch.num_decode + prefill
        gone = gone or []
        kv += sum(s.num_computed_tokens + 1 for s in gone)
        return StepWork(len(batch.seqs) + len(gone), prefill, kv)

    def _schedule_decode(self) -> list[Sequence]:
        """The running sequences, each with a slot for its next token (preempting if short)."""
        st = self._synced()
        need = st.blocks_short(self.blocks.block_size, 0)
        short = np.flatnonzero(need > 0)
        if int(need[short].sum()) <= self.blocks.num_free:
            # the common case, in array passes: every sequence's next token has a slot
            self._grow_rows(short, need, 0)
            return list(self.running)
        queue = deque(self.running)
        scheduled: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            while not self.blocks.can_grow(seq, seq.num_tokens):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.grow(seq, seq.num_tokens)
                scheduled.append(seq)
        self.running = scheduled
        st.rebuild(scheduled)
        return list(scheduled)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.cached_tokens -= seq.num_computed_tokens
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(
        self, batch: ScheduledBatch, sampled, eos_ids: set[int], max_model_len: int
    ) -> list[Sequence]:
        """Advance the batch by its step; `sampled` (a list of ints, or an int64 array) holds
        one token per sampling sequence, in batch order. Returns the sequences that got a
        token (finished ones included), decodes first; `decoded` then describes the decodes
        (None where they did not match the running batch's first rows and took the
        per-sequence path)."""
        num_decode = batch.num_decode
        if len(sampled) < num_decode:
            raise ValueError(f"{len(sampled)} sampled tokens for {num_decode} decodes")
        tokens = np.asarray(sampled, dtype=np.int64)
        st = self._synced()
        decodes = batch.seqs[:num_decode]
        self.cached_tokens += len(decodes)
        fast = decodes == (st.seqs if num_decode == st.n else st.seqs[:num_decode])
        if fast:
            finished = self._advance_decodes(decodes, tokens[:num_decode], eos_ids, max_model_len)
            gone_rows = [i for i, _ in self.decoded.ended]  # rows of the finished, in order
        else:
            self.decoded = None
            finished = self._advance_each(decodes, sampled[:num_decode], eos_ids, max_model_len)
            gone_rows = []
        got_token = list(decodes)
        later = tokens[num_decode:].tolist()
        tokens_at = 0
        for i in range(num_decode, len(batch.seqs)):
            seq = batch.seqs[i]
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.cached_tokens += batch.num_new_tokens[i]
            if not samples:
                continue
            # its prompt is complete: it starts decoding
            self.waiting.remove(seq)
            token = later[tokens_at]
            tokens_at += 1
            seq.token_ids.append(token)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if fast:
                st.append(seq)
            got_token.append(seq)
            reason = _end_reason(seq, token, eos_ids, max_model_len)
            if reason is not None:
                finished.append((seq, reason))
                if fast:
                    gone_rows.append(st.n - 1)
        if finished:
            if fast:
                keep = np.ones(st.n, dtype=bool)
                keep[gone_rows] = False
                st.keep(keep)
                self.running = list(st.seqs)
            else:
                gone = {id(seq) for seq, _ in finished}
                self.running = [s for s in self.running if id(s) not in gone]
            for seq, reason in finished:
                self._finish(seq, reason)
        if not fast:
            st.rebuild(self.running)
        return got_token

    def _advance_decodes(
        self, decodes: list[Sequence], tokens: np.ndarray, eos_ids: set[int], max_model_len: int
    ) -> list[tuple[Sequence, str]]:
        """The decodes, rows 0..k-1 of the batch state, take their tokens: arrays first, then
        one C-level pass to append each token to its sequence; only the tokens that may end
        a sequence go through `_end_reason`."""
        st, k = self.state, len(decodes)
        maybe = st.advance(tokens, eos_ids, max_model_len)
        toks = tokens.tolist()
        deque(map(list.append, map(_TOKEN_IDS, decodes), toks), maxlen=0)
        computed = st.computed[:k].tolist()
        deque(map(setattr, decodes, repeat("num_computed_tokens"), computed), maxlen=0)
        finished, ended = [], []
        for i in maybe.tolist():
            seq = decodes[i]
            reason = _end_reason(seq, toks[i], eos_ids, max_model_len)
            if reason is not None:
                finished.append((seq, reason))
                ended.append((i, reason))
        prompts = st.prompt[:k]
        self.decoded = DecodedTokens(
            st.request_ids[:k],
            tokens.reshape(k, 1).tolist(),
            prompts.tolist(),
            (st.num_tokens[:k] - prompts).tolist(),
            ended,
        )
        return finished

    @staticmethod
    def _advance_each(
        decodes: list[Sequence], sampled, eos_ids: set[int], max_model_len: int
    ) -> list[tuple[Sequence, str]]:
        """As `_advance_decodes`, sequence by sequence (decodes that are not the batch
        state's first rows: a batch changed from outside)."""
        finished = []
        for seq, token in zip(decodes, np.asarray(sampled).tolist(), strict=False):
            seq.num_computed_tokens += 1
            seq.token_ids.append(token)
            reason = _end_reason(seq, token, eos_ids, max_model_len)
            if reason is not None:
                finished.append((seq, reason))
        return finished

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        self.blocks.free(seq)
        self.cached_tokens -= seq.num_computed_tokens
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason


def _end_reason(seq: Sequence, token: int, eos_ids: set[int], max_model_len: int) -> str | None:
    """Why `token`, just appended, ends `seq`: "stop" (a stop or EOS token, once min_tokens
    are out), "length" (max_tokens or max_model_len reached), or None."""
    p = seq.params
    n = len(seq.token_ids)
    if n - seq.num_prompt_tokens >= p.min_tokens and (
        (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids
    ):
        return "stop"
    if n >= seq.max_total_tokens or n >= max_model_len:
        return "length"
    return None
