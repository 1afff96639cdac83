"""The generation engine: requests in, one scheduler step at a time, tokens out.

    engine = GenEngine(EngineArgs(model="tiny-moe", random_weights=True))
    engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=16, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...

or offline: `engine.generate([[1, 2, 3], "text"], SamplingParams(max_tokens=16))`.

With `tensor_parallel_size` N > 1 this engine is rank 0: it starts ranks 1..N-1 (each only a
`GenRank`, engine/ranks.py, running the steps this one's runner broadcasts) and `shutdown()`
stops them."""

from __future__ import annotations

import functools
import logging
import operator
import time
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from coserve.engine import tp_workers
from coserve.engine.kv_cache import BlockManager
from coserve.engine.memory import GiB
from coserve.engine.ranks import BLOCK_SIZE, GenRank, resolve_device
from coserve.engine.sampler import Sampler
from coserve.engine.scheduler import ScheduledBatch, Scheduler
from coserve.engine.sequence import SeqStatus, Sequence
from coserve.engine.tokenizer import token_ids
from coserve.engine.types import EngineArgs, RequestOutput, SamplingParams, StepWork

log = logging.getLogger("coserve.engine")


def _all_plain_greedy(seqs: list[Sequence]) -> bool:
    """The argmax of the raw logits is every sequence's token: no temperature, and none of
    top_k, min_tokens or logprobs (those need the sampler on the host's side of the step)."""
    return all(map(_PLAIN_GREEDY, seqs))


_PLAIN_GREEDY = operator.attrgetter("plain_greedy")
_STATUS = operator.attrgetter("status")


@dataclass
class _InFlight:
    """A step launched and not yet read back: its batch and its greedy tokens (host, filled
    once `done` has passed; None on CPU, where they are there already)."""

    batch: ScheduledBatch
    tokens: torch.Tensor
    done: torch.cuda.Event | None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    text: str | None = None


class GenEngine(tp_workers.LeadsRanks):
    def __init__(self, args: EngineArgs, *, block_size: int = BLOCK_SIZE) -> None:
        if args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.args = args
        device = resolve_device(args.device)
        build = functools.partial(GenRank.build, block_size=block_size)
        self._start_leading(build, args, device, lambda: self._start(build(args, device)))

    def _start(self, rank: GenRank) -> None:
        args, lm, runner = self.args, rank.lm, rank.runner
        self.rank = rank
        self.lm, self.model, self.config = lm, lm.model, lm.config
        self.device = rank.device
        self.model_name = args.model
        self.max_model_len = lm.max_model_len
        self.tokenizer = lm.tokenizer
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids: set[int] = set(self.config.eos_token_ids)
        self.block_size = rank.block_size
        self.kv_bytes_per_token = rank.kv_bytes_per_token
        self.kv_capacity_tokens = rank.kv_capacity_tokens
        self.blocks = BlockManager(rank.num_blocks, rank.block_size)
        self.runner = runner
        if self.workers is not None:
            runner.broadcast = self.workers.send
        self.scheduler = Scheduler(
            self.blocks,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            max_tokens_with_decodes=None if args.enforce_eager else runner.static_tokens,
        )
        self.sampler = Sampler(self.device, args.seed)
        self._seqs: dict[str, Sequence] = {}
        self.async_scheduling = args.async_scheduling
        self._inflight: _InFlight | None = None
        self.last_step_decode: bool | None = None  # the profiler's label of the last step
        # the work of the step whose outputs the last `step()` returned (None: it ran none);
        # the engine core publishes its means beside the step times, for the SLO guard
        self.last_step_work: StepWork | None = None
        pin = self.device.type == "cuda"
        self._host_tokens = [
            torch.zeros(runner.static_tokens, dtype=torch.int64, pin_memory=pin) for _ in range(2)
        ]
        self._host_tokens_at = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        log.info(
            "KV cache: %d blocks x %d = %d tokens (%.3f GiB, %d B/token); "
            "max_model_len %d, max_num_seqs %d, TP %d, %s",
            rank.num_blocks,
            rank.block_size,
            self.kv_capacity_tokens,
            (rank.num_blocks + 1) * rank.block_size * rank.kv_bytes_per_token / GiB,
            self.kv_bytes_per_token,
            self.max_model_len,
            args.max_num_seqs,
            args.tensor_parallel_size,
            "eager"
            if args.enforce_eager
            else f"static buckets {runner.all_buckets}"
            + (" (CUDA graphs)" if runner.graphs else ""),
        )

    def shutdown(self) -> None:
        """Tensor parallel: drop the CUDA graphs (which hold the communicators' collectives)
        once the GPU is done with them, then stop the other ranks."""
        runner = getattr(self, "runner", None)
        if self.workers is not None and runner is not None and self.workers.dead is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            runner.graphs.clear()
            runner.graph_outputs.clear()
        super().shutdown()

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        self._check_params(params, len(prompt_token_ids))
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = self.sampler.new_generator(int(params.seed))
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, gen)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _check_prompt(self, ids: list[int]) -> None:
        if not isinstance(ids, list | tuple) or len(ids) == 0:
            raise ValueError("the prompt must be a non-empty list of token ids")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"token ids must be integers, got {t!r}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is out of vocabulary (0..{self.vocab_size - 1})")

    def _check_params(self, p: SamplingParams, prompt_len: int) -> None:
        if isinstance(p.max_tokens, bool) or not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
        if not p.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
        if prompt_len + p.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + p.max_tokens} tokens ({prompt_len} in the prompt, "
                f"{p.max_tokens} in the completion). Please reduce the prompt or max_tokens."
            )

    def abort(self, request_id: str) -> None:
        if self._seqs.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """Requests to run, or a step launched ahead whose outputs are still to collect."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's outputs. With async scheduling a greedy pure-decode step is launched
        before the previous one's tokens are read back, so a call returns the outputs of the
        step launched by the call before it (the engine is one step ahead of the host).
        Raises WorkerDied when a tensor-parallel rank is gone."""
        with self._ranks_step():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self.last_step_work = None
        pending, self._inflight = self._inflight, None
        if pending is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            if not self._overlappable(batch):
                return self._sync_step(batch)
            pending = self._launch(batch, None)
        self._inflight = self._launch_next(pending)
        if pending.done is not None and self.workers is not None:
            self.workers.wait_gpu(pending.done)
        elif pending.done is not None:
            pending.done.synchronize()
        return self._finish(pending.batch, pending.tokens[: len(pending.batch.seqs)].numpy())

    def _sync_step(self, batch: ScheduledBatch) -> list[RequestOutput]:
        sampling = (
            batch.seqs
            if batch.is_decode
            else [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        )
        if _all_plain_greedy(sampling):
            tokens = self.runner.run(batch, greedy=True).cpu().numpy()
        else:
            tokens = self.sampler(self.runner.run(batch), sampling)
        return self._finish(batch, tokens)

    def _overlappable(self, batch: ScheduledBatch) -> bool:
        if not (self.async_scheduling and batch.is_decode):
            return False
        rows = batch.rows
        return rows.plain_greedy if rows is not None else _all_plain_greedy(batch.seqs)

    def _launch(self, batch: ScheduledBatch, feed: np.ndarray | None) -> _InFlight:
        tokens = self.runner.run(batch, greedy=True, feed=feed)
        if self.device.type != "cuda":
            return _InFlight(batch, tokens, None)
        self._host_tokens_at ^= 1
        host = self._host_tokens[self._host_tokens_at][: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _InFlight(batch, host, done)

    def _launch_next(self, pending: _InFlight) -> _InFlight | None:
        """Schedule and launch the decode step after `pending` while it runs: the scheduler
        counts the token `pending` is computing (`Scheduler.schedule_ahead`, which gives it a
        cache slot), and the new step takes those tokens from the device. Only when nothing
        waits (no prompt joins) and the free blocks cover every sequence's next slot (no
        preemption)."""
        if self.scheduler.waiting or not self._overlappable(pending.batch):
            return None
        batch = self.scheduler.schedule_ahead()
        if batch is None:
            return None
        seqs = pending.batch.seqs
        if batch.seqs == seqs:
            feed = np.arange(len(seqs), dtype=np.int64)
        else:  # sequences aborted since `pending` was launched
            row = {id(s): i for i, s in enumerate(seqs)}
            feed = np.fromiter((row[id(s)] for s in batch.seqs), np.int64, len(batch.seqs))
        return self._launch(batch, feed)

    def _finish(self, batch: ScheduledBatch, tokens: list[int]) -> list[RequestOutput]:
        self.last_step_decode = batch.is_decode
        gone = []
        if (
            batch.is_decode
            # all still running (the common case): none finished
            and batch.seqs != self.scheduler.running
            and SeqStatus.FINISHED in map(_STATUS, batch.seqs)
        ):
            # launched ahead: sequences that finished (or were aborted) since get nothing
            keep = [i for i, s in enumerate(batch.seqs) if s.status is not SeqStatus.FINISHED]
            gone = [s for s in batch.seqs if s.status is SeqStatus.FINISHED]
            batch = ScheduledBatch([batch.seqs[i] for i in keep], [1] * len(keep), len(keep))
            tokens = np.asarray(tokens)[keep]
        self.last_step_work = self.scheduler.step_work(batch, gone)
        got = self.scheduler.postprocess(batch, tokens, self.eos_token_ids, self.max_model_len)
        outputs = self._decode_outputs()
        for seq in got[len(outputs) :]:
            prompt = seq.num_prompt_tokens
            if not seq.prompt_counted:
                seq.prompt_counted = True
                self._prompt_tokens_total += prompt
            reason = seq.finish_reason
            if reason is not None:
                self._seqs.pop(seq.request_id, None)
            ids = seq.token_ids
            outputs.append(
                RequestOutput(
                    seq.request_id, [ids[-1]], reason is not None, reason, prompt, len(ids) - prompt
                )
            )
        self._generation_tokens_total += len(outputs)
        return outputs

    def _decode_outputs(self) -> list[RequestOutput]:
        """The outputs of the last postprocess's decodes, built from its arrays (none if it
        took the per-sequence path). A decoding sequence's prompt is counted already: its
        first token came from the step that completed its prompt."""
        d = self.scheduler.decoded
        if d is None:
            return []
        outputs = list(
            map(
                RequestOutput,
                d.request_ids,
                d.new_token_ids,
                repeat(False),
                repeat(None),
                d.prompt_tokens,
                d.completion_tokens,
            )
        )
        for i, reason in d.ended:
            out = outputs[i]
            out.finished, out.finish_reason = True, reason
            self._seqs.pop(out.request_id, None)
        return outputs

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self._prompt_tokens_total,
            "generation_tokens_total": self._generation_tokens_total,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }

    # -- offline ----------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run prompts (token-id lists, or text with a tokenizer) to completion; results in
        prompt order."""
        if not isinstance(params, list):
            params = [params] * len(prompts)
        ids = token_ids(prompts, self.tokenizer, self.model_name)
        tag = f"generate-{time.monotonic_ns()}"
        results = {
            f"{tag}-{i}": GenerationResult(f"{tag}-{i}", p, [], None) for i, p in enumerate(ids)
        }
        try:
            for rid, p, sp in zip(results, ids, params, strict=True):
                self.add_request(rid, p, sp)
        except ValueError:
            for rid in results:
                self.abort(rid)
            raise
        while any(r.finish_reason is None for r in results.values()) and self.has_unfinished():
            for out in self.step():
                r = results.get(out.request_id)
                if r is not None:
                    r.token_ids += out.new_token_ids
                    r.finish_reason = out.finish_reason
        if self.tokenizer is not None:
            for r in results.values():
                r.text = self.tokenizer.decode(r.token_ids)
        return list(results.values())
