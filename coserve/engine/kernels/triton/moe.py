"""Mixture of experts with FP8 block-quantised experts, without host syncs.

    routing     softmax over experts, top-k, renormalise (norm_topk_prob)     topk_softmax
    permute     sort the T*k (token, expert) pairs by expert, each expert's run
                padded to a multiple of BLOCK_M (one Triton program)             moe_align
                (both in moe_routing.py)
    GEMM 1      per M-block of one expert: gate and up = A @ W13[e]^T with
                FP8 block scales; epilogue silu(gate) * up, re-quantised to FP8
                per 1x128 group for GEMM 2                                       _moe_gemm_kernel
    GEMM 2      down = H @ W2[e]^T, times the pair's routing weight              _moe_gemm_kernel
                (both in moe_gemm.py; at decode sizes the same GEMMs with swapped
                operands, _moe_gemm_swap_ab_kernel in moe_gemm_swap_ab.py)
    un-permute  rows are written at their pair index, so the combine is a sum
                over each token's k rows                                         moe_sum

Weights as the engine stacks them from a Qwen3-MoE-FP8 checkpoint:
    w13 [E, 2I, H] float8_e4m3fn (gate rows 0..I-1, up rows I..2I-1), w13_scale [E, 2I/128, H/128]
    w2  [E, H, I]  float8_e4m3fn,                                       w2_scale  [E, H/128, I/128]
either may be stored tile by tile instead (expert_layout.py: [E, N/128, K/128, 128, 128]),
which the GEMMs read by TMA, one contiguous 16 KB run per tile.
bf16/fp16 experts (no scales) take the same path with plain 16-bit dots.
Every shape below depends on T, never on routing values: graph-capturable.
"""

from __future__ import annotations

import torch

from ..expert_layout import expert_shape
from ..fp8 import Fp8Activation
from .fp8 import per_token_group_quant_fp8
from .moe_gemm import launch_gemm
from .moe_routing import moe_align, moe_sum

# Whether each GEMM reads the expert weights by TMA (config keys B_TMA1, B_TMA2): one thread
# issues a tile's copy instead of every thread computing addresses. Measured on an H200
# (2026-12-01, docs/kernels.md): GEMM2 76.9 -> 71.6 us at T=512 (TP=2's shapes 50.6 -> 48.7),
# GEMM1 131.7 -> 133.4 us, so GEMM2 only.
B_TMA1, B_TMA2 = False, True
# Whether GEMM1 writes its output rows in the pairs' sorted order (config key SORTED_INTER)
# rather than at each pair's index, so that GEMM2 reads each M-block's A as contiguous rows
# (by TMA: one box per tile) instead of gathering them row by row. Measured on an H200
# (2026-12-02, benchmarks/moe_layout.py, --pair-inter's comparison): fused_moe 208.6 -> 204.5 us
# at T=512, 203.3 -> 198.7 at T=256, 437.2 -> 425.5 at T=2048.
SORTED_INTER = True
# Whether each GEMM loads a K step's weight scale as one scalar (config key SCALAR_B_SCALE): a
# 128-wide N tile lies in one 128x128 scale block, so BLOCK_N loads of one value become one
# (Nsight Compute put LG throttle among GEMM1's stalls, 2026-12-01); bit for bit the same
# result. Measured on an H200 (2026-12-02, benchmarks/moe_layout.py --scalar-b-scale): fused_moe
# 207.7 -> 199.6 us at T=512 (GEMM1 130.8 -> 122.9, GEMM2 70.0 -> 68.0), 430.7 -> 385.5 at
# T=2048; engine_gen offline 28,520 -> 29,421 tok/s in the same session.
SCALAR_B_SCALE = True
# Whether GEMM1 / GEMM2 run with their operands swapped (config keys SWAP_AB1 / SWAP_AB2;
# moe_gemm_swap_ab.py): the weights on the tensor core's M side, BLOCK_M tokens on its N side.
# `default_config` turns both on where they were measured faster (FP8, 128 < T <= 512); these
# are the values for a config that names neither.
SWAP_AB1, SWAP_AB2 = False, False


def default_config(num_tokens: int, fp8: bool = True) -> dict:
    """Tile configuration for both GEMMs (measured on H100 and H200 at E=128, k=8, H=2048,
    I=768: see docs/kernels.md); benchmarks/moe_layout.py sweeps alternatives. With BLOCK_M >=
    the typical rows per expert (T*k/E), each expert's weights stream from DRAM once per step;
    at 128 < T <= 512 (FP8) both GEMMs swap their operands (BLOCK_M = tokens a tile on the
    MMA's N side, moe_gemm_swap_ab.py). Besides the tiles,
    `B_TMA1` / `B_TMA2` (default: the module's) read GEMM1's / GEMM2's expert weights by TMA
    where their shape allows (`moe_gemm.tma_fits`); weights stored tiled are always read by TMA;
    `SORTED_INTER` (default: the module's) has GEMM2 read its input in sorted order, by TMA;
    `SCALAR_B_SCALE` (default: the module's) loads each K step's weight scale as a scalar;
    `SWAP_AB1` / `SWAP_AB2` (default: the module's) swap GEMM1's / GEMM2's operands."""
    # every size: 128-wide N tiles (one FP8 scale group a tile), GROUP_M 8
    tiles = dict(
        BLOCK_N1=128,
        BLOCK_N2=128,
        GROUP_M=8,
        num_warps1=4,
        num_stages1=3,
        num_warps2=4,
        num_stages2=4,
    )
    if num_tokens <= 128:
        return dict(tiles, BLOCK_M=16)
    if not fp8 and num_tokens < 256:
        return dict(tiles, BLOCK_M=32)
    if fp8 and num_tokens <= 512:
        # decode up to the study's C=512: swapped operands, 32 tokens a tile (H200, 2026-12-02,
        # benchmarks/moe_layout.py --swap-ab: fused_moe 201.0 -> 197.2 us at T=512, 189.4 ->
        # 170.1 at T=256, 176.2 -> 170.1 at T=192; BLOCK_M 16 and 64 slower)
        return dict(tiles, BLOCK_M=32, num_stages2=3, SWAP_AB1=True, SWAP_AB2=True)
    return dict(tiles, BLOCK_M=64, num_warps1=8, num_stages1=4)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    config: dict | None = None,
    foreign: bool = False,
    x_fp8: Fp8Activation | None = None,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I] (or either tiled: expert_layout.py);
    topk_weights [T, k] (fp32), topk_ids [T, k]; scales (block (128, 128)) as in the module
    docstring when the weights are FP8. With
    `foreign`, an id equal to E is an expert another rank holds (expert parallel): its pairs
    add nothing. `x_fp8` (x already quantised, by `rms_norm_quant`; scales in either layout)
    saves GEMM1 the quantisation launch. Returns [T, H] in x's dtype. Raises ValueError if
    tiled weights' tile is not the GEMM's (BLOCK_N1 / BLOCK_N2 by 128 for FP8), or if `x_fp8`
    is not x's shape."""
    hidden_states = x
    if block is not None:
        assert tuple(block) == (128, 128), "the Triton MoE supports 128x128 blocks only"
    T, H = hidden_states.shape
    E, two_i, H_w = expert_shape(w13)
    inter = two_i // 2
    k = topk_ids.shape[1]
    assert H_w == H and expert_shape(w2) == (E, H, inter)
    fp8 = w13.dtype == torch.float8_e4m3fn
    cfg = dict(default_config(T, fp8), **(config or {}))
    bm = cfg["BLOCK_M"]
    numel = T * k
    out_dtype = hidden_states.dtype
    dev = hidden_states.device
    if T == 0:
        return torch.empty_like(hidden_states)

    # foreign: one more expert id for the pairs held elsewhere, whose blocks the GEMMs skip
    sorted_ids, expert_ids, num_post_pad = moe_align(topk_ids, E + 1 if foreign else E, bm)
    topk_w = topk_weights.reshape(-1).to(torch.float32)

    if fp8:
        assert H % 128 == 0 and inter % 128 == 0, "FP8 experts need H and I multiples of 128"
        if x_fp8 is None:
            a1, a1_s = per_token_group_quant_fp8(hidden_states)
        else:
            x_fp8.check_stands_for(T, H)
            a1, a1_s = x_fp8.values, x_fp8.scales
        quant_out = cfg["BLOCK_N1"] == 128
        sorted_inter = quant_out and cfg.get("SORTED_INTER", SORTED_INTER)
        if quant_out:
            # sorted: one row per padded slot, so that every M-block's rows are contiguous
            rows = sorted_ids.shape[0] if sorted_inter else numel
            inter_out = torch.empty(rows, inter, device=dev, dtype=torch.float8_e4m3fn)
            inter_s = torch.empty(rows, inter // 128, device=dev, dtype=torch.float32)
        else:
            inter_out = torch.empty(numel, inter, device=dev, dtype=out_dtype)
            inter_s = None
    else:
        a1, a1_s = hidden_states, None
        quant_out = sorted_inter = False
        inter_out = torch.empty(numel, inter, device=dev, dtype=out_dtype)
        inter_s = None

    launch_gemm(
        a1,
        a1_s,
        w13,
        w13_scale,
        inter_out,
        inter_s,
        None,
        sorted_ids,
        expert_ids,
        num_post_pad,
        inter,
        H,
        inter,
        numel,
        k,
        gated=True,
        quant_out=quant_out,
        mul_weight=False,
        block_m=bm,
        block_n=cfg["BLOCK_N1"],
        group_m=cfg["GROUP_M"],
        num_warps=cfg["num_warps1"],
        num_stages=cfg["num_stages1"],
        foreign=foreign,
        b_tma=cfg.get("B_TMA1", B_TMA1),
        c_sorted=sorted_inter,
        scalar_b_scale=cfg.get("SCALAR_B_SCALE", SCALAR_B_SCALE),
        swap_ab=cfg.get("SWAP_AB1", SWAP_AB1),
    )

    if fp8 and not quant_out:
        inter_out, inter_s = per_token_group_quant_fp8(inter_out)

    out_pairs = torch.empty(numel, H, device=dev, dtype=out_dtype)
    launch_gemm(
        inter_out,
        inter_s,
        w2,
        w2_scale,
        out_pairs,
        None,
        topk_w,
        sorted_ids,
        expert_ids,
        num_post_pad,
        H,
        inter,
        0,
        numel,
        1,
        gated=False,
        quant_out=False,
        mul_weight=True,
        block_m=bm,
        block_n=cfg["BLOCK_N2"],
        group_m=cfg["GROUP_M"],
        num_warps=cfg["num_warps2"],
        num_stages=cfg["num_stages2"],
        foreign=foreign,
        b_tma=cfg.get("B_TMA2", B_TMA2),
        a_sorted=sorted_inter,
        scalar_b_scale=cfg.get("SCALAR_B_SCALE", SCALAR_B_SCALE),
        swap_ab=cfg.get("SWAP_AB2", SWAP_AB2),
    )
    return moe_sum(out_pairs, k)
