"""GEMM1 of the Triton MoE (gate|up, silu*up, FP8 re-quant) at one decode shape, in forms the
engine does not use, each timed by CUDA-graph replay against the engine's `_moe_gemm_kernel`
and checked against its output (max |difference| of the dequantised rows):

    desc        A gathered into expert order first (torch index_select, timed apart), both
                operands read by TMA descriptors, with and without Triton's warp
                specialisation (`tl.range(..., warp_specialize=True)`, Hopper's autoWS)
    persistent  one program per SM (or two), looping over the live tiles, A by pointers and
                the weights by TMA, with and without `tl.range(..., flatten=True)` (the
                software pipeline then crosses tile boundaries)
    tiled       the weights stored tile by tile, so each TMA box is one contiguous 16 KB
                run, against the checkpoint's row-major layout

    python3 benchmarks/moe_gemm1_variants.py [--tokens 512] [--only desc|persistent|tiled]

Qwen3-30B-A3B's experts (E=128, top-8, H=2048, I=768), random FP8 128x128-block weights,
random routing; needs a CUDA GPU. The figures and what they rule out: docs/kernels.md
("GEMM1: warp specialisation, TMA for A, persistent tiles").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

FAMILIES = ("desc", "persistent", "tiled")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens in the batch (decode: C)")
    p.add_argument("--only", choices=FAMILIES, help="one family of variants")
    a = p.parse_args(argv)
    if a.tokens < 1:
        p.error(f"--tokens: must be at least 1, got {a.tokens}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernels use TMA descriptors: Hopper or newer)")
    if importlib.util.find_spec("triton") is None:
        p.error("needs Triton (pip install triton)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_gemm1_kernels import run

    run(a.tokens, a.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
