"""Turns a scheduled batch into model inputs, runs the model, returns the logits of the
sequences that sample this step.

Decode has a static-shape path: the batch is padded to a bucket size (1, 2, 4, 8, 16, 32,
..., max_num_seqs) and every input lives in a persistent buffer of the largest bucket
(input ids, positions, slot mapping, context lengths, block tables at full width
ceil(max_model_len / block_size)). Padded rows point at the null block. A decode step of
bucket b therefore always sees the same tensors with the same shapes, which is what CUDA-graph
capture per bucket needs. `enforce_eager` skips the padding (exact batch, trimmed tables)."""

from __future__ import annotations

import bisect

import numpy as np
import torch

from coserve.engine.attention import AttnMetadata
from coserve.engine.kv_cache import BlockManager, cdiv
from coserve.engine.scheduler import ScheduledBatch


def decode_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class ModelRunner:
    def __init__(self, model, kv_cache: torch.Tensor, blocks: BlockManager, *,
                 max_num_seqs: int, max_model_len: int, enforce_eager: bool) -> None:
        self.model = model
        self.device = kv_cache.device
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.enforce_eager = enforce_eager
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = kv_cache[0, i], kv_cache[1, i]
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks_per_seq = cdiv(max_model_len, self.block_size)
        n, dev = max_num_seqs, self.device
        self.buf = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slot_mapping": torch.zeros(n, dtype=torch.int64, device=dev),
            "context_lens": torch.ones(n, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
        }

    def _to_dev(self, data, dtype) -> torch.Tensor:
        t = torch.from_numpy(data).to(dtype) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _block_table_rows(self, seqs, width: int, rows: int) -> np.ndarray:
        """[rows, width] int32: each sequence's blocks, then the null block."""
        table = np.full((rows, width), self.blocks.null_block, dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, :len(s.block_table)] = s.block_table
        return table

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num sampling sequences, vocab] float32, in batch order."""
        if batch.is_prefill:
            return self._prefill(batch)
        return self._decode(batch)

    def _prefill(self, batch: ScheduledBatch) -> torch.Tensor:
        ids, pos, slots, query_lens, ctx_lens, last = [], [], [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += [self.blocks.slot(seq, p) for p in range(start, end)]
            query_lens.append(n)
            ctx_lens.append(end)
            if batch.samples(i):
                last.append(len(ids) - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        meta = AttnMetadata(
            mode="prefill", query_lens=query_lens, context_lens_host=ctx_lens,
            slot_mapping=self._to_dev(slots, torch.int64),
            block_tables=self._to_dev(self._block_table_rows(batch.seqs, width, len(batch.seqs)),
                                      torch.int32))
        hidden = self.model(self._to_dev(ids, torch.int64), self._to_dev(pos, torch.int64), meta)
        if not last:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        return self.model.compute_logits(hidden[self._to_dev(last, torch.int64)])

    def bucket_for(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def _decode(self, batch: ScheduledBatch) -> torch.Tensor:
        seqs = batch.seqs
        n = len(seqs)
        if self.enforce_eager:
            rows, width = n, max(len(s.block_table) for s in seqs)
        else:
            rows, width = self.bucket_for(n), self.max_blocks_per_seq
        pad = rows - n
        null_slot = self.blocks.null_block * self.block_size
        host = {
            "input_ids": [s.last_token for s in seqs] + [0] * pad,
            "positions": [s.num_tokens - 1 for s in seqs] + [0] * pad,
            "slot_mapping": [self.blocks.slot(s, s.num_tokens - 1) for s in seqs] + [null_slot] * pad,
            "context_lens": [s.num_tokens for s in seqs] + [1] * pad,
            "block_tables": self._block_table_rows(seqs, width, rows),
        }
        t = {}
        for name, values in host.items():
            buf = self.buf[name]
            view = buf[:rows, :width] if name == "block_tables" else buf[:rows]
            view.copy_(self._to_dev(values, buf.dtype), non_blocking=True)
            t[name] = view
        meta = AttnMetadata(mode="decode", slot_mapping=t["slot_mapping"],
                            block_tables=t["block_tables"], context_lens=t["context_lens"])
        hidden = self.model(t["input_ids"], t["positions"], meta)
        return self.model.compute_logits(hidden[:n])
