"""Turns a scheduled batch into model inputs, runs the model, returns the logits of the
sequences that sample this step.

The static-shape path: every new token of the step is one row of a "decode" batch, with its
own position, cache slot, context length (position + 1) and its sequence's block table, so
the paged decode kernel gives each token causal attention over its sequence's cache (which
already holds the step's own k/v: the layer writes them first). A decode step has one row per
sequence; a step that also carries short prompts (as the scheduler mixes them in) adds a row
per prompt token. Rows are padded to a bucket size (1, 2, 4, 8, 16, 32, ..., max_num_seqs,
then in steps of 32 up to `static_tokens`) and every input lives in a persistent buffer of
the largest bucket (block tables at full width ceil(max_model_len / block_size)); padded rows
point at the null block. A step of bucket b therefore always sees the same tensors with the
same shapes, so on CUDA (with the Triton kernels, which never synchronise with the host) each
bucket's forward pass is captured once as a CUDA graph and replayed.

Steps with more tokens than the largest bucket (a burst of prompts), and every step that is
not a pure decode under `enforce_eager`, take the variable-length path: packed tokens,
prompts through the prefill attention reference (SDPA), eager. `enforce_eager` also skips
the padding of decode steps (exact batch, trimmed tables) and the graphs.

Tensor parallel: a step is prepared on the host as a `StaticStep` or `VarlenStep` (host ints
only, engine/steps.py), which rank 0 hands to `broadcast` before it runs; the other ranks are
only runners (engine/ranks.py) and run the same step through `execute`, so every rank
launches the same kernels and collectives."""

from __future__ import annotations

import bisect
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from coserve.engine.attention import AttnMetadata
from coserve.engine.host_copy import to_device
from coserve.engine.kernels import ops
from coserve.engine.kv_cache import cdiv
from coserve.engine.scheduler import ScheduledBatch
from coserve.engine.steps import (
    HostStage,
    StaticStep,
    VarlenStep,
    decode_buckets,
    mixed_buckets,
    static_token_capacity,
)

log = logging.getLogger("coserve.engine")

# per-sequence fields gathered over a batch by C loops (map), not Python ones
_TOKEN_IDS = operator.attrgetter("token_ids")
_TABLE = operator.attrgetter("block_table")
_TABLE_KEY = operator.attrgetter("block_table_key")
_LAST = operator.itemgetter(-1)


_DECODE_INPUTS = {
    "input_ids": torch.int64,
    "positions": torch.int64,
    "slot_mapping": torch.int64,
    "context_lens": torch.int32,
}


class ModelRunner:
    def __init__(
        self,
        model,
        kv_cache: torch.Tensor,
        *,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        enforce_eager: bool,
        max_num_batched_tokens: int,
    ) -> None:
        self.model = model
        self.device = kv_cache.device
        self.block_size = block_size
        # the cache's last block, which no sequence owns: padded rows read and write there
        self.null_block = kv_cache.shape[2] - 1
        self.enforce_eager = enforce_eager
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = kv_cache[0, i], kv_cache[1, i]
        self.buckets = decode_buckets(max_num_seqs)
        self.static_tokens = static_token_capacity(max_num_seqs, max_num_batched_tokens)
        self.all_buckets = self.buckets + mixed_buckets(max_num_seqs, self.static_tokens)
        self.max_blocks_per_seq = cdiv(max_model_len, self.block_size)
        n, dev = self.static_tokens, self.device
        self.buf = {
            name: torch.zeros(n, dtype=dt, device=dev) for name, dt in _DECODE_INPUTS.items()
        }
        self.buf["block_tables"] = torch.zeros(
            n, self.max_blocks_per_seq, dtype=torch.int32, device=dev
        )
        # host staging for the per-step copies, page-locked on CUDA so they run
        # asynchronously; two sets used in turn, so that a step is staged while the one
        # before may still be copying (each set waits for its own last copies to finish)
        self._stages = [HostStage(self.buf, self.null_block, self.device) for _ in range(2)]
        self._stage_at = 0
        self.last_tokens: torch.Tensor | None = None  # the last greedy static step's tokens
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[int, torch.Tensor] = {}
        self.steps = {"graph": 0, "static eager": 0, "varlen": 0}
        self.fed_steps = 0  # static steps whose input ids came from the device (async)
        # rank 0 of a tensor-parallel engine: hands each step to the other ranks
        self.broadcast: Callable[[StaticStep | VarlenStep], None] | None = None

    @property
    def host_np(self) -> dict[str, np.ndarray]:
        """The host rows of the set staged last."""
        return self._stages[self._stage_at].np

    def _next_stage(self) -> HostStage:
        self._stage_at ^= 1
        stage = self._stages[self._stage_at]
        stage.wait()
        return stage

    @property
    def graphs_enabled(self) -> bool:
        return not self.enforce_eager and ops.graph_safe(self.device)

    def _to_dev(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def _block_table_rows(self, seqs, width: int, rows: int) -> np.ndarray:
        """[rows, width] int32: each sequence's blocks, then the null block."""
        table = np.full((rows, width), self.null_block, dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = s.block_table
        return table

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, *, greedy: bool = False, feed: np.ndarray | None = None
    ) -> torch.Tensor:
        """Logits [num sampling sequences, vocab] (model dtype), in batch order; with `greedy`
        the greedy token ids [num sampling sequences] int64 instead (on the device, not
        waited for). feed: a pure decode whose input ids are rows `feed` of the previous
        greedy step's tokens, still on the device (the sequences' last host token is a
        placeholder)."""
        if batch.is_decode or (
            not self.enforce_eager and sum(batch.num_new_tokens) <= self.static_tokens
        ):
            step = self._prepare_static(batch, greedy, feed)
        else:
            if feed is not None:
                raise ValueError("feed needs a pure decode batch")
            step = self._prepare_varlen(batch, greedy)
        if self.broadcast is not None:
            if isinstance(step, StaticStep):
                self.broadcast(replace(step, arrays=self._staged(step, batch)))
            else:
                self.broadcast(step)
        return self.execute(step)

    @torch.inference_mode()
    def execute(self, step: StaticStep | VarlenStep) -> torch.Tensor:
        """Run a prepared step (on rank 0 as prepared; elsewhere as rank 0 sent it). A rank
        that does not sample must wait for the step's end before it stages the next one in
        the same host buffers (rank 0 waits when it reads its tokens back)."""
        if isinstance(step, VarlenStep):
            self.steps["varlen"] += 1
            return self._varlen(step)
        if step.arrays is not None:
            self._unstage(step)
        return self._static(step)

    def _prepare_varlen(self, batch: ScheduledBatch, greedy: bool) -> VarlenStep:
        """Prompt chunks, after the batch's decodes if it has any (one token each, first):
        tokens packed in batch order."""
        bs = self.block_size
        ids, pos, slots, query_lens, ctx_lens, last = [], [], [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            bt = seq.block_table
            slots += [bt[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(n)
            ctx_lens.append(end)
            if batch.samples(i):
                last.append(len(ids) - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        return VarlenStep(
            ids,
            pos,
            slots,
            query_lens,
            ctx_lens,
            self._block_table_rows(batch.seqs, width, len(batch.seqs)),
            batch.num_decode,
            last,
            greedy,
        )

    def _varlen(self, step: VarlenStep) -> torch.Tensor:
        """Eager (the shapes change every step)."""
        d = step.num_decode
        meta = AttnMetadata(
            mode="prefill",
            query_lens=step.query_lens,
            context_lens_host=step.context_lens,
            slot_mapping=self._to_dev(step.slots, torch.int64),
            block_tables=self._to_dev(step.block_tables, torch.int32),
            num_decode=d,
            context_lens=self._to_dev(step.context_lens[:d], torch.int32) if d else None,
        )
        hidden = self.model(
            self._to_dev(step.ids, torch.int64), self._to_dev(step.positions, torch.int64), meta
        )
        if not step.last:
            return self._no_rows(hidden, step.greedy)
        return self._head(hidden[self._to_dev(step.last, torch.int64)], step.greedy)

    def _head(self, hidden: torch.Tensor, greedy: bool) -> torch.Tensor:
        if greedy:
            return self.model.greedy_tokens(hidden)
        return self.model.compute_logits(hidden)

    @staticmethod
    def _no_rows(hidden: torch.Tensor, greedy: bool) -> torch.Tensor:
        if greedy:
            return hidden.new_empty(0, dtype=torch.int64)
        return hidden.new_empty(0, 0, dtype=torch.float32)

    def bucket_for(self, n: int) -> int:
        return self.all_buckets[bisect.bisect_left(self.all_buckets, n)]

    # -- static shapes (decode, and steps with a few short prompts) --------------------------
    def _stage(self, batch: ScheduledBatch, rows: int, width: int) -> list[int] | None:
        """Write one row per new token of `batch` (padded to `rows`) into the device buffers.
        Returns the rows of the tokens that sample, None for a pure decode (rows 0..n-1)."""
        bs = self.block_size
        stage = self._next_stage()
        h = stage.np
        rows_in = batch.rows
        if rows_in is not None and not rows_in.current and rows_in.ahead:
            raise RuntimeError("a batch scheduled ahead changed before it was staged")
        if rows_in is not None and rows_in.current:
            n = len(rows_in.num_tokens)
            h["input_ids"][:n] = rows_in.last_token
            h["context_lens"][:n] = rows_in.num_tokens
            pos = rows_in.num_tokens - 1
            stage.table_rows_from(rows_in.table_key, rows_in.table_len, rows_in.tables, rows)
            sampling = None
        elif batch.is_decode:
            owners = batch.seqs
            toks = list(map(_TOKEN_IDS, owners))
            n = len(toks)
            lens = np.fromiter(map(len, toks), np.int64, n)
            h["input_ids"][:n] = np.fromiter(map(_LAST, toks), np.int64, n)
            h["context_lens"][:n] = lens
            pos = lens - 1
            sampling = None
        else:
            ids, positions, owners, sampling = [], [], [], []
            for i, (seq, k) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
                start = seq.num_computed_tokens
                ids += seq.token_ids[start : start + k]
                positions += range(start, start + k)
                owners += [seq] * k
                if batch.samples(i):
                    sampling.append(len(ids) - 1)
            n = len(positions)
            pos = np.array(positions, dtype=np.int64)
            h["input_ids"][:n] = ids
            h["context_lens"][:n] = pos + 1
        if rows_in is None or not rows_in.current:
            keys = np.fromiter(map(_TABLE_KEY, owners), np.int64, n)
            stage.table_rows(keys, list(map(_TABLE, owners)), rows)
        h["positions"][:n] = pos
        # each token's slot from its own row of the block tables just staged
        blocks = h["block_tables"][np.arange(n), pos // bs]
        h["slot_mapping"][:n] = blocks.astype(np.int64) * bs + pos % bs
        h["input_ids"][n:rows] = 0
        h["positions"][n:rows] = 0
        h["slot_mapping"][n:rows] = self.null_block * bs
        h["context_lens"][n:rows] = 1
        self._copy_staged(stage, rows, width)
        return sampling

    def _decode_args(self, rows: int, width: int):
        b = self.buf
        meta = AttnMetadata(
            mode="decode",
            slot_mapping=b["slot_mapping"][:rows],
            block_tables=b["block_tables"][:rows, :width],
            context_lens=b["context_lens"][:rows],
        )
        return b["input_ids"][:rows], b["positions"][:rows], meta

    def _prepare_static(
        self, batch: ScheduledBatch, greedy: bool, feed: np.ndarray | None
    ) -> StaticStep:
        n = sum(batch.num_new_tokens)
        if self.enforce_eager:
            if batch.rows is not None and batch.rows.current:
                width = int(batch.rows.table_len.max())
            else:
                width = max(len(s.block_table) for s in batch.seqs)
            rows = n
        else:
            rows, width = self.bucket_for(n), self.max_blocks_per_seq
        return StaticStep(rows, width, n, self._stage(batch, rows, width), greedy, feed)

    def _staged(self, step: StaticStep, batch: ScheduledBatch) -> dict[str, np.ndarray]:
        # every sequence of the batch owns a staged row, which holds its whole table
        used = min(step.width, int(self._stages[self._stage_at].row_len[: step.n].max()))
        out = {
            name: a[: step.rows].copy()
            for name, a in self.host_np.items()
            if name != "block_tables"
        }
        out["block_tables"] = self.host_np["block_tables"][: step.rows, :used].copy()
        return out

    def _unstage(self, step: StaticStep) -> None:
        """Write rank 0's staged rows into this rank's host buffers and on to the device."""
        stage = self._next_stage()
        h, rows = stage.np, step.rows
        for name, a in step.arrays.items():
            if name == "block_tables":
                used = a.shape[1]
                h[name][:rows, :used] = a
                h[name][:rows, used : step.width] = self.null_block
            else:
                h[name][:rows] = a
        stage.forget_rows(rows, step.width)
        self._copy_staged(stage, rows, step.width)

    def _copy_staged(self, stage: HostStage, rows: int, width: int) -> None:
        for name, buf in self.buf.items():
            if name == "block_tables":
                buf[:rows, :width].copy_(stage.host[name][:rows, :width], non_blocking=True)
            else:
                buf[:rows].copy_(stage.host[name][:rows], non_blocking=True)
        stage.copied()

    def _static(self, step: StaticStep) -> torch.Tensor:
        rows, n, sampling = step.rows, step.n, step.sampling
        if step.feed is not None:
            self.fed_steps += 1
            self._feed(step.feed)
        graph = self.graphs.get(rows) if self.graphs_enabled else None
        if graph is not None:
            self.steps["graph"] += 1
            graph.replay()
            hidden = self.graph_outputs[rows]
        else:
            self.steps["static eager"] += 1
            hidden = self.model(*self._decode_args(rows, step.width))
        if sampling is None:
            out = self._head(hidden[:n], step.greedy)
        elif not sampling:
            return self._no_rows(hidden, step.greedy)
        else:
            out = self._head(hidden[self._to_dev(sampling, torch.int64)], step.greedy)
        if step.greedy:
            self.last_tokens = out
        return out

    def _feed(self, feed: np.ndarray) -> None:
        """Input ids of rows 0..len(feed)-1 := the previous greedy step's tokens[feed]."""
        last, k = self.last_tokens, len(feed)
        if last is None:
            raise RuntimeError("a fed step needs a greedy step before it")
        ids = self.buf["input_ids"]
        if k <= last.shape[0] and feed[0] == 0 and feed[-1] == k - 1 and (np.diff(feed) == 1).all():
            ids[:k].copy_(last[:k])
        else:
            ids[:k].copy_(last[self._to_dev(feed, torch.int64)])

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the static forward of every bucket, largest first, into one memory pool
        (smaller buckets reuse the largest one's blocks). Each bucket runs once eagerly
        first, which compiles its kernels and settles one-time allocations outside the graph.
        Inputs are the padding values (null block, context length 1), valid for any bucket.
        Captured on the current stream when that is not the device's default one (a green
        context's stream: a kernel node runs in the context it was captured in, so the graphs
        keep to that context's SMs wherever they are launched), else on torch's side stream."""
        if not self.graphs_enabled:
            return
        t0 = time.perf_counter()
        self._stage(ScheduledBatch([], [], 0), self.all_buckets[-1], self.max_blocks_per_seq)
        pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        stream = None if current == torch.cuda.default_stream(self.device) else current
        for rows in reversed(self.all_buckets):
            args = self._decode_args(rows, self.max_blocks_per_seq)
            self.model(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.graph_outputs[rows] = self.model(*args)
            self.graphs[rows] = graph
        torch.cuda.synchronize(self.device)
        log.info(
            "captured %d CUDA graphs (%d..%d rows) in %.1f s, %.2f GiB held by torch after capture",
            len(self.graphs),
            self.all_buckets[0],
            self.all_buckets[-1],
            time.perf_counter() - t0,
            torch.cuda.memory_reserved(self.device) / 2**30,
        )
