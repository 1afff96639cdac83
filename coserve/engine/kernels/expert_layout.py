"""Stacked expert weights stored tile by tile.

Row-major, expert e's matrix is w[e] of w [E, N, K]. Tiled, the same values are stored as
w [E, N/bn, K/bk, bn, bk]: tile (n, k) of expert e is one contiguous run of bn*bk elements
(16 KB for FP8 at 128x128), so a TMA copy of one GEMM tile reads one run instead of bn runs of
bk elements, K apart. Measured on an H200 (docs/kernels.md, "MoE weights stored tile by
tile"): the engine's GEMM1 of Qwen3-30B-A3B at T=512, 130.9 -> 126.7 us; GEMM2 no change.
Every kernel that takes stacked expert weights accepts either layout; the shape tells them
apart (3-D row-major, 5-D tiled)."""

from __future__ import annotations

import torch

# The GEMM tile the Triton MoE reads (BLOCK_N x BLOCK_K of FP8 weights): the tiles stored.
TILE = (128, 128)
# Which of a MoE layer's weights the engine stores tiled where the Triton MoE runs: gate|up
# (w13) and down (w2). On an H200 (docs/kernels.md) GEMM2 was 70.7 -> 71.3 us tiled at T=512.
TILED_W13, TILED_W2 = True, False


def is_tiled(w: torch.Tensor) -> bool:
    return w.dim() == 5


def expert_shape(w: torch.Tensor) -> tuple[int, int, int]:
    """(E, N, K) of stacked weights in either layout."""
    if is_tiled(w):
        E, nt, kt, bn, bk = w.shape
        return E, nt * bn, kt * bk
    E, N, K = w.shape
    return E, N, K


def tiles_fit(w: torch.Tensor, tile: tuple[int, int] = TILE, split_n: int = 0) -> bool:
    """Whether row-major w [E, N, K] divides into tiles, none across row `split_n` (the
    gate/up boundary of w13; 0 for none)."""
    bn, bk = tile
    _, N, K = w.shape
    return N % bn == 0 and K % bk == 0 and split_n % bn == 0


def tile_experts(w: torch.Tensor, tile: tuple[int, int] = TILE) -> torch.Tensor:
    """Row-major w [E, N, K] -> a new contiguous tiled tensor [E, N/bn, K/bk, bn, bk].
    Raises ValueError if N or K is not a multiple of the tile."""
    bn, bk = tile
    E, N, K = w.shape
    if not tiles_fit(w, tile):
        raise ValueError(f"expert weights [{E}, {N}, {K}] do not divide into {bn}x{bk} tiles")
    return w.view(E, N // bn, bn, K // bk, bk).permute(0, 1, 3, 2, 4).contiguous()


def untile_experts(w: torch.Tensor) -> torch.Tensor:
    """Tiled w [E, N/bn, K/bk, bn, bk] -> row-major [E, N, K] (a copy); row-major w as is."""
    if not is_tiled(w):
        return w
    E, N, K = expert_shape(w)
    return w.permute(0, 1, 3, 2, 4).reshape(E, N, K)


def expert_matrix(w: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's [N, K] matrix of stacked weights in either layout."""
    if not is_tiled(w):
        return w[e]
    nt, kt, bn, bk = w.shape[1:]
    return w[e].permute(0, 2, 1, 3).reshape(nt * bn, kt * bk)
