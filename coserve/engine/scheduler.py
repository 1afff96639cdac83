"""Continuous batching, decode first (as vLLM's V1 scheduler). Every running sequence gets a
slot for its next token; the token budget left (`max_num_batched_tokens` minus the decodes)
goes to prompts, or chunks of them, in the same step, so new requests ride along with the
decode batch instead of taking steps of their own. A request is admitted only when the free
blocks hold its whole prompt (plus a small watermark). When a sequence's next token finds no
block, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the head of the queue, to be recomputed from its prompt and the tokens it already
produced (nothing it emitted is lost or repeated)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from coserve.engine.kv_cache import BlockManager
from coserve.engine.sequence import SeqStatus, Sequence
from coserve.engine.types import StepWork


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # the num_decode decoding sequences first, then prompt chunks
    num_new_tokens: list[int]  # tokens each sequence processes this step (decode: 1)
    num_decode: int

    @property
    def is_decode(self) -> bool:
        """Only decodes: the static-shape (CUDA-graph) path."""
        return self.num_decode == len(self.seqs)

    def samples(self, i: int) -> bool:
        """Does sequence i produce a token this step (decode, or its prefill completes)?"""
        s = self.seqs[i]
        return i < self.num_decode or s.num_computed_tokens + self.num_new_tokens[i] == s.num_tokens


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
        self.num_preemptions = 0
        # tokens whose KV is in the cache, over every sequence: kept as num_computed_tokens
        # moves, so a step's KV read is known without a pass over its sequences
        self.cached_tokens = 0

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
        decode = self._schedule_decode()
        budget = self.max_num_batched_tokens
        if decode and self.max_tokens_with_decodes is not None:
            budget = min(budget, self.max_tokens_with_decodes)
        prefill, counts = self._schedule_prefill(max(0, budget - len(decode)))
        if not decode and not prefill:
            return None
        return ScheduledBatch(decode + prefill, [1] * len(decode) + counts, len(decode))

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

    def short_of_blocks(self) -> list[tuple[Sequence, int]]:
        """(sequence, blocks it lacks) for each running sequence that lacks blocks for a
        slot per token it holds."""
        bs = self.blocks.block_size
        return [
            (s, n)
            for s in self.running
            if (n := -(-len(s.token_ids) // bs) - len(s.block_table)) > 0
        ]

    def _schedule_decode(self) -> list[Sequence]:
        """The running sequences, each with a slot for its next token (preempting if short)."""
        short = self.short_of_blocks()
        if sum(n for _, n in short) <= self.blocks.num_free:
            # the common case, in one pass: every sequence's next token has a slot
            for seq, _ in short:
                self.blocks.grow(seq, seq.num_tokens)
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
        return list(scheduled)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.cached_tokens -= seq.num_computed_tokens
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(
        self, batch: ScheduledBatch, sampled: list[int], eos_ids: set[int], max_model_len: int
    ) -> list[Sequence]:
        """Advance the batch by its step; `sampled` holds one token per sampling sequence,
        in batch order. Returns the sequences that got a token (finished ones included)."""
        num_decode = batch.num_decode
        if len(sampled) < num_decode:
            raise ValueError(f"{len(sampled)} sampled tokens for {num_decode} decodes")
        finished = []
        # decodes first: each samples, so they take the first num_decode tokens; the cheap
        # test lets through every token that can end its sequence, `_end_reason` decides
        decodes = batch.seqs[:num_decode]
        self.cached_tokens += len(decodes)
        for seq, token in zip(decodes, sampled, strict=False):
            seq.num_computed_tokens += 1
            ids = seq.token_ids
            ids.append(token)
            n = len(ids)
            if (
                n >= seq.max_total_tokens
                or n >= max_model_len
                or token in eos_ids
                or token in seq.params.stop_token_ids
            ):
                reason = _end_reason(seq, token, eos_ids, max_model_len)
                if reason is not None:
                    finished.append((seq, reason))
        got_token = list(decodes)
        tokens = iter(sampled[num_decode:])
        for i in range(num_decode, len(batch.seqs)):
            seq = batch.seqs[i]
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.cached_tokens += batch.num_new_tokens[i]
            if not samples:
                continue
            # its prompt is complete: it starts decoding
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            token = next(tokens)
            seq.token_ids.append(token)
            got_token.append(seq)
            reason = _end_reason(seq, token, eos_ids, max_model_len)
            if reason is not None:
                finished.append((seq, reason))
        if finished:
            gone = {id(seq) for seq, _ in finished}
            self.running = [s for s in self.running if id(s) not in gone]
            for seq, reason in finished:
                self._finish(seq, reason)
        return got_token

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
