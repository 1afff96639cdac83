"""Continuous batching. Each step is either a prefill step (new prompts, or chunks of them,
up to `max_num_batched_tokens` tokens) or a decode step (one token for every running
sequence). Prefill goes first; a request is admitted only when the free blocks hold its whole
prompt (plus a small watermark). When a decode step finds no block for a sequence's next
token, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the head of the queue, to be recomputed from its prompt and the tokens it already
produced (nothing it emitted is lost or repeated)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from coserve.engine.kv_cache import BlockManager
from coserve.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence processes this step (decode: all 1)

    def samples(self, i: int) -> bool:
        """Does sequence i produce a token this step (its prefill completes, or decode)?"""
        s = self.seqs[i]
        return not self.is_prefill or s.num_computed_tokens + self.num_new_tokens[i] == s.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * blocks.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, None)
                    return True
        return False

    def schedule(self) -> ScheduledBatch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
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
        return ScheduledBatch(True, seqs, counts) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
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
        return ScheduledBatch(False, list(scheduled), [1] * len(scheduled)) if scheduled else None

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, sampled: list[int], eos_ids: set[int],
                    max_model_len: int) -> list[Sequence]:
        """Advance the batch by its step; `sampled` holds one token per sampling sequence,
        in batch order. Returns the sequences that got a token (finished ones included)."""
        got_token = []
        tokens = iter(sampled)
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            if not samples:
                continue
            if batch.is_prefill:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SeqStatus.RUNNING
            token = next(tokens)
            seq.token_ids.append(token)
            got_token.append(seq)
            p = seq.params
            if not p.ignore_eos and token in eos_ids:
                reason = "stop"
            elif seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
                reason = "length"
            else:
                continue
            self.running.remove(seq)
            self._finish(seq, reason)
        return got_token

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
