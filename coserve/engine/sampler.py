"""Per-request sampling settings -> one batched call of the sampling kernel.

top_k, min_tokens and logprobs (vLLM's meanings) touch only the rows of the sequences that
ask for them, and only in steps that have such a sequence: a batch without them takes the
plain path, one attribute test per sequence more than before."""

from __future__ import annotations

import torch

from coserve.engine.kernels.sampling import sample
from coserve.engine.sequence import Sequence

# What `take_logprobs` hands out per sampled token: (logprob of the sampled token, its rank
# (1 = most likely), top-N token ids, their logprobs), from the model's raw distribution as
# vLLM reports it (before temperature, top-k/top-p and min_tokens).
TokenLogprobs = tuple[float, int, list[int], list[float]]


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._logprobs: dict[str, TokenLogprobs] = {}

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def take_logprobs(self) -> dict[str, TokenLogprobs]:
        """Logprobs of the tokens sampled since the last call, by request id (only for
        sequences whose params ask for logprobs)."""
        out, self._logprobs = self._logprobs, {}
        return out

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if not seqs:
            return []
        special = [i for i, s in enumerate(seqs) if s.special]
        raw = None
        if special:
            logits, raw = self._process(logits, seqs, special)
        if all(s.params.temperature <= 0 for s in seqs):  # one sync, no parameter tensors
            ids = logits.argmax(dim=-1)
        else:
            temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
            top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
            ids = sample(
                logits,
                temperature.to(self.device),
                top_p.to(self.device),
                [s.generator for s in seqs],
                self.generator,
            )
        if raw is not None:
            self._record_logprobs(raw, ids, seqs)
        return ids.tolist()

    def _process(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]):
        """Apply min_tokens and top_k to a copy of the rows that ask; returns (logits, the
        raw logprobs of the rows that want logprobs as {row: tensor [V]} or None)."""
        want_lp = [i for i in rows if seqs[i].params.logprobs is not None]
        raw = None
        if want_lp:
            lp = torch.log_softmax(logits[want_lp].float(), dim=-1)
            raw = dict(zip(want_lp, lp, strict=True))
        logits = logits.clone()
        for i in rows:
            p = seqs[i].params
            if (
                p.min_tokens
                and p.all_stop_token_ids
                and seqs[i].num_completion_tokens < p.min_tokens
            ):
                banned = [t for t in p.all_stop_token_ids if t < logits.shape[1]]
                logits[i, banned] = float("-inf")
            if 0 < p.top_k < logits.shape[1]:
                kth = logits[i].topk(p.top_k).values[-1]
                logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
        return logits, raw

    def _record_logprobs(self, raw: dict, ids: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, lp in raw.items():
            seq = seqs[i]
            token = int(ids[i])
            chosen = lp[token]
            rank = int((lp > chosen).sum()) + 1
            top = lp.topk(seq.params.logprobs) if seq.params.logprobs else None
            self._logprobs[seq.request_id] = (
                float(chosen),
                rank,
                top.indices.tolist() if top is not None else [],
                top.values.tolist() if top is not None else [],
            )
