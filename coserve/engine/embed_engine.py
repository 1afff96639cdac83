"""The embedding engine: requests carry one or more token-id inputs; each step packs inputs
from the front of the queue (several requests at once) into one forward pass of at most
`max_num_batched_tokens` tokens and `max_num_seqs` inputs, pools each input's hidden states
(mean, or last token as Qwen3-Embedding) and L2-normalises them. A request is answered when
all its inputs are done.

Steps overlap on a GPU: a step queues its forward pass, then waits for the previous step's
vectors (copied to pinned host memory behind that pass) and answers their requests, so the
host's work (answers, the next batch) runs while the GPU computes. A step's answers
therefore come one step later; the last batch is answered by a step with nothing new to run.
On the CPU a pass is computed before its step returns, and the step answers it. With
`overlap` False (set while an SLO guard paces the engine: its pauses are meant to leave
the GPU idle) a step answers its own batch; `drain()` answers the one in flight.

With `tensor_parallel_size` N > 1 this engine is rank 0: it starts ranks 1..N-1 (each only an
`EmbedRank`, engine/ranks.py), sends each batch's token ids to them before its own forward
pass, and pools (the final hidden states are the same on every rank). `shutdown()` stops
them."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from coserve.engine import tp_workers
from coserve.engine.host_copy import to_device
from coserve.engine.messages import EmbedForward
from coserve.engine.ranks import EmbedRank, resolve_device
from coserve.engine.tokenizer import token_ids
from coserve.engine.types import EmbedOutput, EngineArgs

log = logging.getLogger("coserve.engine")


@dataclass(eq=False)
class _EmbedRequest:
    request_id: str
    inputs: list[list[int]]
    embeddings: list[np.ndarray | None] = field(default_factory=list)
    next_input: int = 0  # inputs before this one have been scheduled
    done: int = 0


@dataclass(eq=False)
class _InFlight:
    """A forward pass queued on the device: its inputs, and its pooled vectors [n, dim]
    float32 on the host, valid once `ready` has passed (None: already valid)."""

    batch: list[tuple[_EmbedRequest, int]]
    vectors: torch.Tensor
    ready: torch.cuda.Event | None


def pool(hidden: torch.Tensor, lens: list[int], how: str) -> torch.Tensor:
    """hidden [T, H] of packed sequences -> [B, H] float32, L2-normalised. how: "mean" over
    each sequence's tokens, "last" token (causal models) or "cls" (first) token."""
    n = to_device(lens, torch.int64, hidden.device)
    ends = n.cumsum(0)
    if how == "last":
        pooled = hidden[ends - 1].float()
    elif how == "cls":
        pooled = hidden[ends - n].float()
    elif how == "mean":
        seg = torch.repeat_interleave(
            torch.arange(len(lens), device=hidden.device), n, output_size=hidden.shape[0]
        )
        sums = torch.zeros(len(lens), hidden.shape[1], device=hidden.device)
        pooled = sums.index_add_(0, seg, hidden.float()) / n[:, None]
    else:
        raise ValueError(f"unknown pooling {how!r}")
    return F.normalize(pooled, p=2, dim=-1)


class EmbedEngine(tp_workers.LeadsRanks):
    overlap = True  # steps overlap on a GPU (module docstring); engine_core.Pacing sets it

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        device = resolve_device(args.device)
        build = EmbedRank.build
        self._start_leading(build, args, device, lambda: self._start(build(args, device)))

    def _start(self, rank: EmbedRank) -> None:
        args, lm = self.args, rank.lm
        self.rank = rank
        self.lm, self.model, self.device = lm, lm.model, rank.device
        self.model_name = args.model
        self.max_model_len = lm.max_model_len
        self.tokenizer = lm.tokenizer
        self.dim = lm.config.hidden_size
        self.vocab_size = lm.config.vocab_size
        self.causal = rank.causal
        self.pooling = lm.pooling
        self.max_num_batched_tokens = max(args.max_num_batched_tokens, self.max_model_len)
        self._queue: deque[_EmbedRequest] = deque()
        self._in_flight: _InFlight | None = None
        self._prompt_tokens_total = 0
        self._ids: set[str] = set()
        log.info(
            "embedding engine: %s, dim %d, %s pooling, max_model_len %d, %d tokens per batch",
            self.model_name,
            self.dim,
            self.pooling,
            self.max_model_len,
            self.max_num_batched_tokens,
        )

    def add_request(self, request_id: str, inputs: list[list[int]]) -> None:
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(inputs, list | tuple) or not inputs:
            raise ValueError("inputs must be a non-empty list of token-id lists")
        for i, ids in enumerate(inputs):
            where = f"input {i}" if len(inputs) > 1 else "input"
            if not isinstance(ids, list | tuple) or not ids:
                raise ValueError(f"{where} must be a non-empty list of token ids")
            if len(ids) > self.max_model_len:
                raise ValueError(
                    f"{where} has {len(ids)} tokens, more than this model's maximum "
                    f"context length of {self.max_model_len} tokens"
                )
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise ValueError(f"token ids must be integers, got {t!r}")
                if not 0 <= t < self.vocab_size:
                    raise ValueError(
                        f"token id {t} is out of vocabulary (0..{self.vocab_size - 1})"
                    )
        req = _EmbedRequest(request_id, [list(x) for x in inputs])
        req.embeddings = [None] * len(inputs)
        self._queue.append(req)
        self._ids.add(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self._ids:
            self._ids.discard(request_id)
            self._queue = deque(r for r in self._queue if r.request_id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self._queue)

    def _next_batch(self) -> list[tuple[_EmbedRequest, int]]:
        batch, tokens = [], 0
        for req in self._queue:
            while req.next_input < len(req.inputs):
                n = len(req.inputs[req.next_input])
                if batch and (
                    tokens + n > self.max_num_batched_tokens or len(batch) >= self.args.max_num_seqs
                ):
                    return batch
                batch.append((req, req.next_input))
                req.next_input += 1
                tokens += n
        return batch

    @torch.inference_mode()
    def embed_batch(self, inputs: list[list[int]]) -> torch.Tensor:
        """One forward pass over `inputs` -> [len(inputs), dim] float32, normalised."""
        if self.workers is not None:
            self.workers.send(EmbedForward(inputs))
        return pool(self.rank.forward(inputs), [len(x) for x in inputs], self.pooling)

    def step(self) -> list[EmbedOutput]:
        """Raises WorkerDied when a tensor-parallel rank is gone."""
        with self._ranks_step():
            return self._step()

    def _step(self) -> list[EmbedOutput]:
        done, self._in_flight = self._in_flight, self._launch(self._next_batch())
        outputs = self._answer(done)
        running = self._in_flight is not None and self._in_flight.ready is not None
        if not (self.overlap and running):
            # a CPU pass is done by the time _launch returns: its answers held for the next
            # step would wait for that step's whole pass as well
            outputs += self._answer(self._take_in_flight())
        return outputs

    @property
    def in_flight(self) -> bool:
        """A forward pass is queued whose requests are not yet answered."""
        return self._in_flight is not None

    def drain(self) -> list[EmbedOutput]:
        """Wait for the forward pass in flight, if any, and answer its requests. Raises
        WorkerDied when a tensor-parallel rank is gone."""
        with self._ranks_step():
            return self._answer(self._take_in_flight())

    def _take_in_flight(self) -> _InFlight | None:
        done, self._in_flight = self._in_flight, None
        return done

    def _answer(self, done: _InFlight | None) -> list[EmbedOutput]:
        if done is None:
            return []
        if done.ready is not None:
            done.ready.synchronize()
        # rows of one float32 array: no Python float per element on the way to the front
        vectors = done.vectors.numpy()
        for (req, i), vec in zip(done.batch, vectors, strict=True):
            req.embeddings[i] = vec
            req.done += 1
        outputs = []
        while self._queue and self._queue[0].done == len(self._queue[0].inputs):
            req = self._queue.popleft()
            outputs.append(self._finish(req))
        for req in [r for r in self._queue if r.done == len(r.inputs)]:  # finished out of order
            self._queue.remove(req)
            outputs.append(self._finish(req))
        return outputs

    def _launch(self, batch: list[tuple[_EmbedRequest, int]]) -> _InFlight | None:
        if not batch:
            return None
        vectors = self.embed_batch([req.inputs[i] for req, i in batch])
        if not vectors.is_cuda:
            return _InFlight(batch, vectors, None)
        host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(batch, host, ready)

    def _finish(self, req: _EmbedRequest) -> EmbedOutput:
        self._ids.discard(req.request_id)
        tokens = sum(len(x) for x in req.inputs)
        self._prompt_tokens_total += tokens
        return EmbedOutput(req.request_id, np.stack(req.embeddings), tokens)

    def stats(self) -> dict:
        """The queue and token counters /metrics shows; no KV cache, preemption or generated
        tokens figures: an embedding engine has none, and a row of zeros would say it had."""
        started = sum(1 for r in self._queue if r.next_input > 0)
        return {
            "num_running": started,
            "num_waiting": len(self._queue) - started,
            "prompt_tokens_total": self._prompt_tokens_total,
        }

    def embed(self, inputs: list[list[int]] | list[str]) -> np.ndarray:
        """Offline: embed everything now, in batches, through the same queue -> [n, dim]."""
        ids = token_ids(inputs, self.tokenizer, self.model_name)
        rid = f"embed-offline-{id(ids)}"
        self.add_request(rid, ids)
        while self.has_unfinished():
            for out in self.step():
                if out.request_id == rid:
                    return out.embeddings
        raise RuntimeError("request vanished")
