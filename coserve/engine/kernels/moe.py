"""Mixture-of-experts references: the top-k softmax router and the expert computation.

Expert weights are stacked: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; with FP8
each has a block scale tensor. Either may be stored tile by tile (expert_layout.py).
For token t with experts e_1..e_k and weights p_1..p_k:
    y_t = sum_j p_j * W2[e_j] (silu(G[e_j] x_t) * U[e_j] x_t)
`fused_moe` loops over the experts that received tokens (as HF does); an FP8 grouped-GEMM
twin replaces it on Hopper."""

from __future__ import annotations

import torch

from coserve.engine.kernels.activation import silu_and_mul
from coserve.engine.kernels.expert_layout import expert_matrix
from coserve.engine.kernels.fp8 import Fp8Activation, block_dequant


def topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts in float32, keep the top k, optionally renormalise them to sum
    to one (`norm_topk_prob`). Returns (weights float32 [T, k], expert ids [T, k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    foreign: bool = False,
    x_fp8: Fp8Activation | None = None,
) -> torch.Tensor:
    """x [T, H] -> [T, H]. Scales given means w13/w2 are FP8 block-quantised. With `foreign`
    an id equal to E (the number of experts here) is an expert another rank holds (expert
    parallel): that pair adds nothing here. `x_fp8` (x already quantised, by
    `rms_norm_quant`) is for the twin's FP8 GEMMs; the reference computes from x and ignores
    it."""
    out = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)
    flat_ids = topk_ids.flatten().long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()[: w13.shape[0]]
    token_of = order // topk_ids.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        tokens = token_of[start : start + n]
        start += n
        g13, g2 = expert_matrix(w13, e), expert_matrix(w2, e)
        if w13_scale is not None:
            g13 = block_dequant(g13, w13_scale[e], block, x.dtype)
            g2 = block_dequant(g2, w2_scale[e], block, x.dtype)
        h = silu_and_mul(x[tokens] @ g13.t()) @ g2.t()
        h = h * weights.flatten()[rows, None]
        out.index_add_(0, tokens, h)
    return out
