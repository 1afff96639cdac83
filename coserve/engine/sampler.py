"""Per-request sampling settings -> one batched call of the sampling kernel."""

from __future__ import annotations

import torch

from coserve.engine.kernels.sampling import sample
from coserve.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if not seqs:
            return []
        if all(s.params.temperature <= 0 for s in seqs):  # one sync, no parameter tensors
            return logits.argmax(dim=-1).tolist()
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
        ids = sample(logits, temperature.to(self.device), top_p.to(self.device),
                     [s.generator for s in seqs], self.generator)
        return ids.tolist()
