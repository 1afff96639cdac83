"""The FP8 block-quantised dense GEMMs of a decode step (Qwen3-30B-A3B's qkv_proj and o_proj)
at one batch size: cuBLAS's blockwise kernel (what `fp8_linear` uses from M=16 up) against
the Triton block-scaled GEMM over a sweep of its tiles. Inputs are quantised once outside the
timing (both paths take the same FP8 activations); eight weight sets rotate past L2; each
call is timed by CUDA-graph replay. Every Triton output is checked against cuBLAS's.

    PYTHONPATH=. python3 benchmarks/dense_fp8_tiles.py [--tokens 512]

Needs a CUDA GPU and Triton (and cuBLAS's blockwise FP8: Hopper).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_timing import HelpFormatter, require_gpu  # noqa: E402

SHAPES = (("qkv_proj", 5120, 2048), ("o_proj", 2048, 4096))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="rows M of the activations")
    a = p.parse_args(argv)
    if a.tokens < 16:
        p.error("--tokens must be >= 16 (cuBLAS's blockwise kernels refuse smaller M)")
    require_gpu(p)
    from kernel_timing import STATE, graph_time_ms, measure_bandwidth, rand_fp8_weight, report

    from coserve.engine.kernels.triton import fp8 as tfp8

    STATE["copy_gbs"], read = measure_bandwidth()
    print(f"copy {STATE['copy_gbs']:.0f} GB/s, read {read:.0f} GB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    M = a.tokens
    for name, N, K in SHAPES:
        ws = [rand_fp8_weight((N, K), g) for _ in range(8)]
        xs = [
            tfp8.per_token_group_quant_fp8(
                torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16),
                column_major_scales=True,
            )
            for _ in ws
        ]
        # the Triton GEMM reads row-major activation scales (column-major ones it would copy)
        xs_rows = [(q, sc.contiguous()) for q, sc in xs]
        shape = f"{name} M={M} N={N} K={K}"
        nbytes = N * K + M * K + M * N * 2
        flops = 2 * M * N * K

        def cublas(x, w):
            return tfp8.block_fp8_matmul_cublas(x[0], x[1], w[0], w[1])

        want = cublas(xs[0], ws[0])
        ms = graph_time_ms([lambda x=x, w=w: cublas(x, w) for x, w in zip(xs, ws, strict=True)])
        report("cuBLAS blockwise", shape, ms, nbytes, flops)
        for bm, bn, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

            def triton_gemm(x, w, cfg=cfg):
                return tfp8.block_fp8_matmul_triton(x[0], x[1], w[0], w[1], config=cfg)

            label = f"{bm}x{bn}/{warps}w/{stages}s"
            try:
                err = (triton_gemm(xs_rows[0], ws[0]).float() - want.float()).abs().max().item()
                calls = [
                    lambda x=x, w=w: triton_gemm(x, w) for x, w in zip(xs_rows, ws, strict=True)
                ]
                ms = graph_time_ms(calls)
            except Exception as e:  # a tile that does not fit shared memory: say so, go on
                print(f"  Triton {label} {shape}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            report(f"  Triton {label}", shape, ms, nbytes, flops, f"max|diff| {err:.1e}")
        del ws, xs, xs_rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
