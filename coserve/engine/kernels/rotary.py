"""Rotary position embedding (neox layout, as Qwen3): the head dim is split in two halves
(x1, x2) rotated by angle pos * inv_freq[i]:  (x1 cos - x2 sin, x2 cos + x1 sin)."""

from __future__ import annotations

import torch


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """[max_positions, head_dim] float32 table: cos in the first half, sin in the second."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32)
            / head_dim
        )
    )
    t = torch.arange(max_positions, dtype=torch.int64, device=device).to(torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], positions [T] -> rotated x (same dtype)."""
    cs = cos_sin[positions]  # [T, head_dim]
    half = cs.shape[-1] // 2
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
