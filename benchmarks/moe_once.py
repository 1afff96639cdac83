"""The Triton MoE at one decode shape, launched eagerly a few times and nothing else: the
process `benchmarks/ncu_moe.sh` runs under Nsight Compute, so that `--launch-skip` counts
only these launches (each fused_moe call launches `_moe_gemm_kernel` twice: GEMM1, then GEMM2).

    python3 benchmarks/moe_once.py [--tokens 512] [--tp 1] [--calls 4]

Qwen3-30B-A3B's experts by default (E=128, top-8, H=2048, I=768 split by --tp), random FP8
128x128-block weights, random routing. On a CPU it runs through Triton's interpreter
(TRITON_INTERPRET=1) at small --experts/--hidden/--inter; it checks nothing, it only launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coserve.engine.kernels import fp8 as ref_fp8  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens in the batch (decode: C)")
    p.add_argument("--tp", type=int, default=1, help="one rank's share of I at this TP degree")
    p.add_argument("--calls", type=int, default=4, help="fused_moe calls (2 GEMM launches each)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="I before the TP split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from coserve.engine.kernels import triton as tk

    g = torch.Generator(device=a.device).manual_seed(0)
    E, k, H, inter = a.experts, a.top_k, a.hidden, a.inter // a.tp
    w13, s13 = ref_fp8.block_quant(
        torch.randn(E, 2 * inter, H, generator=g, device=a.device) * 0.02, (128, 128)
    )
    w2, s2 = ref_fp8.block_quant(
        torch.randn(E, H, inter, generator=g, device=a.device) * 0.02, (128, 128)
    )
    x = torch.randn(a.tokens, H, generator=g, device=a.device).to(torch.bfloat16)
    logits = torch.randn(a.tokens, E, generator=g, device=a.device).to(torch.bfloat16)
    weights, ids = tk.topk_softmax(logits, k, True)
    for _ in range(a.calls):
        out = tk.fused_moe(x, w13, w2, weights, ids, s13, s2, (128, 128))
    if a.device == "cuda":
        torch.cuda.synchronize()
    print(f"fused_moe x{a.calls}: T={a.tokens} E={E} k={k} H={H} I={inter}, out {tuple(out.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
