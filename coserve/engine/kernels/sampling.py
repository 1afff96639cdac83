"""Token sampling: greedy, temperature and top-p, drawn with the exponential-race trick
(argmax p_i / q_i with q_i ~ Exp(1) picks i with probability p_i), so that a request's
own seeded generator fills its own row of noise and the draw does not depend on the rest of
the batch."""

from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (per row), then
    renormalise. top_p [B] in (0, 1]."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p[:, None], 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (any float dtype; sampled in float32); temperature [B] (0 = greedy);
    top_p [B]; one generator (or None: use default_generator) per row. Returns token ids [B]
    int64."""
    greedy = logits.argmax(dim=-1)
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return greedy
    logits = logits.float()
    temp = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    if bool((top_p < 1.0).any()):
        probs = top_p_filter(probs, top_p)
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
        rows.exponential_(generator=default_generator)
        noise[unseeded] = rows
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise.clamp_(min=1e-20)).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)
