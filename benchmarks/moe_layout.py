"""fused_moe with its expert weights row-major and stored tile by tile
(coserve/engine/kernels/expert_layout.py), each GEMM alone and the whole call, at Qwen3-30B-A3B's
shapes (E=128, top-8, H=2048, I=768, or a TP rank's I/tp), timed by CUDA-graph replay over two
weight sets (2 x 1.2 GB at TP=1, past L2). Every other form's output is checked against the
row-major one's.

    python3 benchmarks/moe_layout.py [--tp 1] [--tokens 64,256,512,2048] [--sweep]
                                     [--pair-inter] [--scalar-b-scale] [--swap-ab]

Needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_timing import HelpFormatter, require_gpu, token_counts  # noqa: E402

E, K_TOP, H, INTER = 128, 8, 2048, 768
LAYOUTS = ("row-major", "w13 tiled", "w2 tiled", "both tiled")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tp", type=int, default=1, choices=(1, 2), help="one rank of TP=N's shapes")
    p.add_argument(
        "--tokens", default="64,256,512,2048", help="decode batch sizes T, comma-separated"
    )
    p.add_argument(
        "--pair-inter",
        action="store_true",
        help="also time fused_moe (w13 tiled) with GEMM1's output at each pair's index, "
        "gathered row by row by GEMM2, the layout before SORTED_INTER "
        "(coserve/engine/kernels/triton/moe.py)",
    )
    p.add_argument(
        "--scalar-b-scale",
        action="store_true",
        help="also time fused_moe (w13 tiled) and each GEMM with the weight-scale load "
        "SCALAR_B_SCALE (coserve/engine/kernels/triton/moe.py) does not pick: one scalar per "
        "K step ('scalar scale') or one value per column ('per-column scales'), with the "
        "GEMMs unswapped (swapped ones always load one scale per K step)",
    )
    p.add_argument(
        "--swap-ab",
        action="store_true",
        help="also time each GEMM with its operands swapped "
        "(coserve/engine/kernels/triton/moe_gemm_swap_ab.py: the weights on the tensor core's "
        "M side, the few tokens an expert gets at decode on its N side; the engine's choice "
        "for FP8 at 128 < T <= 512, docs/kernels.md) at BLOCK_M 16|32|64 x 4|8 warps x "
        "3|4|5 stages (rows labelled BLOCK_M/warps/stages), then fused_moe with each "
        "BLOCK_M's best pair",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time each GEMM at GROUP_M 1|8 x 8|4 warps x 4|3 stages (rows labelled "
        "GROUP_M/warps/stages)",
    )
    a = p.parse_args(argv)
    tokens = token_counts(p, a.tokens)
    require_gpu(p)
    from kernel_timing import (
        BLOCK,
        STATE,
        graph_time_ms,
        measure_bandwidth,
        rand_fp8_weight,
        report,
    )
    from kernels_moe import _moe_bytes

    from coserve.engine.kernels import triton as tk
    from coserve.engine.kernels.expert_layout import tile_experts
    from coserve.engine.kernels.triton import moe as tmoe
    from coserve.engine.kernels.triton import moe_gemm

    STATE["copy_gbs"], read = measure_bandwidth()
    print(f"copy {STATE['copy_gbs']:.0f} GB/s, read {read:.0f} GB/s", flush=True)
    inter = INTER // a.tp
    g = torch.Generator(device="cuda").manual_seed(1)
    sets = [
        rand_fp8_weight((E, 2 * inter, H), g) + rand_fp8_weight((E, H, inter), g) for _ in range(2)
    ]
    tiled = [(tile_experts(w13), s13, tile_experts(w2), s2) for w13, s13, w2, s2 in sets]

    def weights(layout: str, i: int):
        w13, s13, w2, s2 = sets[i]
        if layout in ("w13 tiled", "both tiled"):
            w13 = tiled[i][0]
        if layout in ("w2 tiled", "both tiled"):
            w2 = tiled[i][2]
        return w13, s13, w2, s2

    for T in tokens:
        shape = f"T={T} I={inter}"
        touched = E * (1 - (1 - K_TOP / E) ** T)  # experts with a token, uniform routing
        w1_bytes, w2_bytes = touched * 2 * inter * H, touched * H * inter
        x = [torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16) for _ in sets]
        routed = [
            tk.topk_softmax(torch.randn(T, E, generator=g, device="cuda"), K_TOP, True)
            for _ in sets
        ]
        cfg = tmoe.default_config(T)
        want = None
        cases = [(layout, layout, None) for layout in LAYOUTS]
        if a.pair_inter:
            cases.append(("w13 tiled, pair inter", "w13 tiled", dict(SORTED_INTER=False)))
        if a.scalar_b_scale:
            scalar = not tmoe.SCALAR_B_SCALE
            label = "w13 tiled, " + ("scalar scale" if scalar else "per-column scales")
            # the swapped GEMMs always load one scale per K step: compare unswapped ones
            unswapped = dict(SWAP_AB1=False, SWAP_AB2=False)
            cases.append((label, "w13 tiled", dict(unswapped, SCALAR_B_SCALE=scalar)))
        for label, layout, config in cases:
            calls = []
            for i in range(len(sets)):
                w13, s13, w2, s2 = weights(layout, i)
                wts, ids = routed[i]
                calls.append(
                    lambda x=x[i], w=(w13, w2, wts, ids, s13, s2), c=config: tk.fused_moe(
                        x, *w[:4], *w[4:], BLOCK, c
                    )
                )
            out = calls[0]()
            want = out if want is None else want
            err = float((out.float() - want.float()).abs().max())
            ms = graph_time_ms(calls, reps=15)
            report(
                f"fused_moe, {label}",
                shape,
                ms,
                _moe_bytes(T, E, K_TOP, H, inter),
                0.0,
                f"max|diff| {err:.1e}",
            )

        # each GEMM alone as fused_moe launches it, on the first set's routing
        wts, ids = routed[0]
        bm = cfg["BLOCK_M"]
        sorted_ids, expert_ids, npp = tk.moe_align(ids, E, bm)
        a1, a1s = tk.per_token_group_quant_fp8(x[0])
        pairs = T * K_TOP
        # GEMM1's output rows as the engine lays them (moe.SORTED_INTER)
        rows = sorted_ids.shape[0] if tmoe.SORTED_INTER else pairs
        inter_q = torch.empty(rows, inter, device="cuda", dtype=torch.float8_e4m3fn)
        inter_s = torch.empty(rows, inter // 128, device="cuda", dtype=torch.float32)
        out_pairs = torch.empty(pairs, H, device="cuda", dtype=torch.bfloat16)
        topw = wts.reshape(-1).float()
        gemm1 = [
            a1, a1s, None, sets[0][1], inter_q, inter_s, None, sorted_ids, expert_ids, npp,
            inter, H, inter, pairs, K_TOP, True, True, False, bm, cfg["BLOCK_N1"],
            cfg["GROUP_M"], cfg["num_warps1"], cfg["num_stages1"],
        ]  # fmt: skip
        gemm2 = [
            inter_q, inter_s, None, sets[0][3], out_pairs, None, topw, sorted_ids, expert_ids,
            npp, H, inter, 0, pairs, 1, False, False, True, bm, cfg["BLOCK_N2"],
            cfg["GROUP_M"], cfg["num_warps2"], cfg["num_stages2"],
        ]  # fmt: skip
        for gemm, args, tma, nbytes, ws in (
            ("GEMM1", gemm1, tmoe.B_TMA1, w1_bytes, (sets[0][0], tiled[0][0])),
            ("GEMM2", gemm2, tmoe.B_TMA2, w2_bytes, (sets[0][2], tiled[0][2])),
        ):
            # each GEMM as the engine launches it: row order and weight-scale load
            order = (
                dict(c_sorted=tmoe.SORTED_INTER)
                if gemm == "GEMM1"
                else dict(a_sorted=tmoe.SORTED_INTER)
            )
            order["scalar_b_scale"] = tmoe.SCALAR_B_SCALE
            order["swap_ab"] = cfg.get(f"SWAP_AB{gemm[-1]}", getattr(tmoe, f"SWAP_AB{gemm[-1]}"))
            for name, w in zip(("row-major", "tiled"), ws, strict=True):
                args[2] = w
                call = partial(moe_gemm.launch_gemm, *args, b_tma=tma, **order)
                report(f"  {gemm}, {name}", shape, graph_time_ms([call], reps=15), nbytes)
                if a.scalar_b_scale:
                    call = partial(
                        moe_gemm.launch_gemm,
                        *args,
                        b_tma=tma,
                        **dict(order, scalar_b_scale=not tmoe.SCALAR_B_SCALE, swap_ab=False),
                    )
                    ms = graph_time_ms([call], reps=15)
                    label = "scalar scale" if not tmoe.SCALAR_B_SCALE else "per-column scales"
                    report(f"    {gemm}, {name}", shape, ms, nbytes, 0.0, label)
                if not a.sweep:
                    continue
                for group_m, warps, stages in itertools.product((1, 8), (8, 4), (4, 3)):
                    tile = [*args[:20], group_m, warps, stages]
                    call = partial(moe_gemm.launch_gemm, *tile, b_tma=tma, **order)
                    ms = graph_time_ms([call], reps=15)
                    label = f"{group_m}/{warps}w/{stages}s"
                    report(f"    {gemm}, {name}", shape, ms, nbytes, 0.0, label)
        if a.swap_ab:
            swap_sweep(x, routed, weights, want, shape, T, inter, w1_bytes, w2_bytes)
    return 0


def swap_sweep(x, routed, weights, want, shape, T, inter, w1_bytes, w2_bytes) -> None:
    """Each GEMM with its operands swapped, w13 tiled and w2 row-major (the engine's layout),
    over BLOCK_M x warps x stages; then fused_moe with each BLOCK_M's fastest GEMM1 and GEMM2,
    checked against the unswapped output `want`."""
    from kernel_timing import graph_time_ms, report
    from kernels_moe import _moe_bytes

    from coserve.engine.kernels import triton as tk
    from coserve.engine.kernels.triton import moe as tmoe
    from coserve.engine.kernels.triton import moe_gemm

    w13, s13, w2, s2 = weights("w13 tiled", 0)
    wts, ids = routed[0]
    pairs = T * K_TOP
    a1, a1s = tk.per_token_group_quant_fp8(x[0])
    topw = wts.reshape(-1).float()
    out_pairs = torch.empty(pairs, H, device="cuda", dtype=torch.bfloat16)
    for bm in (16, 32, 64):
        sorted_ids, expert_ids, npp = tk.moe_align(ids, E, bm)
        rows = sorted_ids.shape[0]
        inter_q = torch.empty(rows, inter, device="cuda", dtype=torch.float8_e4m3fn)
        inter_s = torch.empty(rows, inter // 128, device="cuda", dtype=torch.float32)
        best = {}
        for gemm, nbytes in (("GEMM1", w1_bytes), ("GEMM2", w2_bytes)):
            for warps, stages in itertools.product((4, 8), (3, 4, 5)):
                if gemm == "GEMM1":
                    call = partial(
                        moe_gemm.launch_gemm,
                        a1, a1s, w13, s13, inter_q, inter_s, None, sorted_ids, expert_ids, npp,
                        inter, H, inter, pairs, K_TOP, True, True, False, bm, 128, 8, warps,
                        stages, c_sorted=True, swap_ab=True,
                    )  # fmt: skip
                else:
                    call = partial(
                        moe_gemm.launch_gemm,
                        inter_q, inter_s, w2, s2, out_pairs, None, topw, sorted_ids,
                        expert_ids, npp, H, inter, 0, pairs, 1, False, False, True, bm, 128, 8,
                        warps, stages, b_tma=True, a_sorted=True, swap_ab=True,
                    )  # fmt: skip
                label = f"{bm}/{warps}w/{stages}s"
                try:
                    ms = graph_time_ms([call], reps=15)
                except Exception as e:  # a tile past shared memory: say so, go on
                    print(f"    {gemm}, swap AB {label}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                report(f"    {gemm}, swap AB", shape, ms, nbytes, 0.0, label)
                if gemm not in best or ms < best[gemm][0]:
                    best[gemm] = (ms, warps, stages)
        if len(best) < 2:
            continue
        (_, w1, st1), (_, w2_, st2) = best["GEMM1"], best["GEMM2"]
        cfg = dict(
            tmoe.default_config(T), BLOCK_M=bm, SWAP_AB1=True, SWAP_AB2=True,
            num_warps1=w1, num_stages1=st1, num_warps2=w2_, num_stages2=st2,
        )  # fmt: skip
        calls = []
        for i in range(len(routed)):
            w13_i, s13_i, w2_i, s2_i = weights("w13 tiled", i)
            wts_i, ids_i = routed[i]
            calls.append(
                lambda x=x[i], w=(w13_i, w2_i, wts_i, ids_i, s13_i, s2_i), c=cfg: tk.fused_moe(
                    x, *w[:4], *w[4:], (128, 128), c
                )
            )
        out = calls[0]()
        err = float((out.float() - want.float()).abs().max())
        report(
            "fused_moe, w13 tiled, swap AB",
            shape,
            graph_time_ms(calls, reps=15),
            _moe_bytes(T, E, K_TOP, H, inter),
            0.0,
            f"{bm}/{w1}w/{st1}s + {w2_}w/{st2}s max|diff| {err:.1e}",
        )


if __name__ == "__main__":
    raise SystemExit(main())
