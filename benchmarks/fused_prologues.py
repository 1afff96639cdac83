"""The small kernels before a decoder layer's FP8 GEMMs, fused and not, at Qwen3-30B-A3B's
shapes (H=2048, 128 experts, top-8), timed by CUDA-graph replay over 8 input sets:

    router   the gate's GEMM (cuBLAS) + topk_softmax + the experts' FP8 quantisation of x,
             three launches, against `route`, one
    norm     the residual add and RMSNorm, then the FP8 quantisation for the qkv GEMM, two
             launches, against `rms_norm_quant`, one

Each fused form's outputs are checked against the unfused ones before it is timed. Needs a
CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, E, TOP_K, SETS = 2048, 128, 8, 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", default="1,64,512", help="batch sizes T, comma-separated")
    a = p.parse_args(argv)
    try:
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens: expected integers, got {a.tokens!r}")
    if not tokens or min(tokens) < 1:
        p.error(f"--tokens: every batch size must be >= 1, got {a.tokens!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if importlib.util.find_spec("triton") is None:
        p.error("needs Triton (pip install triton)")
    from kernel_timing import graph_time_ms

    from coserve.engine.kernels import triton as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'kernels':<40} {'T':>5} {'unfused us':>11} {'fused us':>9} {'saved us':>9}")
    for T in tokens:
        if not _compare(T, g, tk, graph_time_ms):
            return 1
    return 0


def _compare(T: int, g: torch.Generator, tk, graph_time_ms) -> bool:
    """Check, then time, both pairs at batch size T; False if a fused output differs."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    xs = [randn(T, H) for _ in range(SETS)]
    gates = [randn(E, H, scale=0.05) for _ in range(SETS)]
    res = [randn(T, H) for _ in range(SETS)]
    norm_w = [randn(H) for _ in range(SETS)]

    def router_unfused(i):
        w, ids = tk.topk_softmax(torch.nn.functional.linear(xs[i], gates[i]), TOP_K, True)
        return w, ids, tk.per_token_group_quant_fp8(xs[i])

    def router_fused(i):
        return tk.route(xs[i], gates[i], TOP_K, True, quantize=True)

    def norm_unfused(i):
        y, r = tk.fused_add_rms_norm(xs[i], res[i], norm_w[i], 1e-6)
        return y, r, tk.per_token_group_quant_fp8(y, column_major_scales=True)

    def norm_fused(i):
        return tk.rms_norm_quant(xs[i], res[i], norm_w[i], 1e-6)

    (_, ids, (q, s)), r = router_unfused(0), router_fused(0)
    router_same = torch.equal(q.view(torch.uint8), r.x_fp8.values.view(torch.uint8))
    router_same = router_same and torch.equal(s, r.x_fp8.scales)
    ids_agree = (ids.sort(-1).values == r.ids.sort(-1).values).all(-1).float().mean().item()
    (y, rr, (nq, ns)), (fy, fr, f8) = norm_unfused(0), norm_fused(0)
    norm_same = (
        torch.equal(y, fy)
        and torch.equal(rr, fr)
        and torch.equal(nq.view(torch.uint8), f8.values.view(torch.uint8))
        and torch.equal(ns, f8.scales)
    )
    if not (router_same and norm_same and ids_agree > 0.95):
        print(
            f"T={T}: fused outputs differ (router's x_fp8 equal: {router_same}, tokens with "
            f"the same experts: {ids_agree:.3f}; norm's outputs equal: {norm_same})",
            file=sys.stderr,
        )
        return False
    for name, unfused, fused in (
        ("router GEMM + top-k + FP8 quant of x", router_unfused, router_fused),
        ("add + RMSNorm + FP8 quant (qkv input)", norm_unfused, norm_fused),
    ):
        t0 = graph_time_ms([lambda i=i, f=unfused: f(i) for i in range(SETS)], inner=4)
        t1 = graph_time_ms([lambda i=i, f=fused: f(i) for i in range(SETS)], inner=4)
        print(f"{name:<40} {T:>5} {t0 * 1e3:>11.2f} {t1 * 1e3:>9.2f} {(t0 - t1) * 1e3:>9.2f}")
    print(f"    T={T}: same experts for {ids_agree:.1%} of tokens, FP8 values equal")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
