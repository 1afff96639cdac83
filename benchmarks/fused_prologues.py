"""A decoder layer's norms and the FP8 GEMMs after them, with the activations' FP8
quantisation in its own launch (as before) or in the norm's (`rms_norm_quant`), at
Qwen3-30B-A3B's shapes (H=2048; qkv N=5120; 128 experts, top-8, I=768), timed by CUDA-graph
replay over 2 input and weight sets (their expert weights pass L2):

    attention   residual add + RMSNorm, quantisation, the qkv GEMM (cuBLAS)
    MoE         residual add + RMSNorm, router GEMM + top-k, quantisation, fused_moe

Each fused form's output is checked, bit for bit, against the unfused one's before it is
timed. Needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_timing import HelpFormatter, require_gpu, token_counts  # noqa: E402

H, QKV, E, TOP_K, INTER, SETS = 2048, 5120, 128, 8, 768, 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tokens", default="1,64,512", help="batch sizes T, comma-separated")
    a = p.parse_args(argv)
    tokens = token_counts(p, a.tokens)
    require_gpu(p)
    from kernel_timing import BLOCK, graph_time_ms, rand_fp8_weight

    from coserve.engine.kernels import triton as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [
        dict(
            qkv=rand_fp8_weight((QKV, H), g),
            gate=torch.randn(E, H, generator=g, device="cuda").to(torch.bfloat16) * 0.05,
            w13=rand_fp8_weight((E, 2 * INTER, H), g),
            w2=rand_fp8_weight((E, H, INTER), g),
            norm=torch.randn(H, generator=g, device="cuda").to(torch.bfloat16),
        )
        for _ in range(SETS)
    ]

    def attention(x, res, w, fused):
        if fused:
            y, r, y8 = tk.rms_norm_quant(x, res, w["norm"], 1e-6)
        else:
            (y, r), y8 = tk.fused_add_rms_norm(x, res, w["norm"], 1e-6), None
        return tk.fp8_block_linear(y, *w["qkv"], BLOCK, None, y8), r

    def moe(x, res, w, fused):
        if fused:
            y, r, y8 = tk.rms_norm_quant(x, res, w["norm"], 1e-6, column_major_scales=False)
        else:
            (y, r), y8 = tk.fused_add_rms_norm(x, res, w["norm"], 1e-6), None
        wts, ids = tk.topk_softmax(torch.nn.functional.linear(y, w["gate"]), TOP_K, True)
        (w13, s13), (w2, s2) = w["w13"], w["w2"]
        return tk.fused_moe(y, w13, w2, wts, ids, s13, s2, BLOCK, x_fp8=y8), r

    print(f"{'norm, then':<10} {'T':>5} {'unfused us':>11} {'fused us':>9} {'saved us':>9}")
    for T in tokens:
        xs = [torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16) for _ in weights]
        res = [torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16) for _ in weights]
        for name, layer in (("qkv", attention), ("MoE", moe)):
            (y0, r0), (y1, r1) = (layer(xs[0], res[0], weights[0], f) for f in (False, True))
            if not (torch.equal(y0, y1) and torch.equal(r0, r1)):
                print(f"{name}, T={T}: the fused norm's output differs", file=sys.stderr)
                return 1
            t = [
                graph_time_ms(
                    [
                        lambda x=x, r=r, w=w, f=fused, fn=layer: fn(x, r, w, f)
                        for x, r, w in zip(xs, res, weights, strict=True)
                    ],
                    inner=4,
                )
                * 1e3
                for fused in (False, True)
            ]
            print(f"{name:<10} {T:>5} {t[0]:>11.2f} {t[1]:>9.2f} {t[0] - t[1]:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
