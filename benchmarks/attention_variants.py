"""Paged decode attention at the study's decode shape in forms the engine does not use, each
timed by CUDA-graph replay against the engine's call and checked against its output:

    sorted          the batch ordered by context length, longest first, so the longest
                    programs start in the first wave rather than form the tail
    head-blocks     the cache stored [blocks, KV heads, block size, D]: one program's block is
                    one contiguous 4 KB run instead of 16 rows of 256 B, 1 KB apart
    2 splits        flash-decoding splits at a batch that fills the GPU without them

    python3 benchmarks/attention_variants.py [--batch 512] [--block-size 16] [--ctx 30,542]

Qwen3-30B-A3B's attention (Hq=32, Hkv=4, D=128, bf16 KV); needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_timing import HelpFormatter, require_gpu  # noqa: E402

HQ, HKV, D = 32, 4, 128
INPUT_SETS = 3  # rotated, so the KV bytes (~0.3 GB a set at B=512) exceed L2


def _sets(batch: int, block_size: int, lo: int, hi: int, head_blocks: bool, g):
    """(q, k_cache, v_cache, block_tables, context_lens) sets; blocks shuffled across the
    cache. With head_blocks the caches are [blocks, Hkv, bs, D] storage seen through a
    [blocks, bs, Hkv, D] view (the kernel reads strides), with the same values."""
    max_blocks = -(-hi // block_size)
    out = []
    for _ in range(INPUT_SETS):
        nb = batch * max_blocks
        kc = torch.randn(nb, block_size, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
        vc = torch.randn(nb, block_size, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
        if head_blocks:
            kc = kc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
            vc = vc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        bt = torch.randperm(nb, generator=g, device="cuda").view(batch, max_blocks)
        ctx = torch.randint(lo, hi + 1, (batch,), generator=g, device="cuda")
        q = torch.randn(batch, HQ, D, generator=g, device="cuda").to(torch.bfloat16)
        out.append((q, kc, vc, bt.to(torch.int32), ctx.to(torch.int32)))
    return out


def _sorted(s):
    q, kc, vc, bt, ctx = s
    order = torch.argsort(ctx, descending=True, stable=True)
    return (q[order], kc, vc, bt[order], ctx[order]), order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch", type=int, default=512, help="sequences decoding (C)")
    p.add_argument("--block-size", type=int, default=16, help="token slots per cache block")
    p.add_argument("--ctx", default="30,542", help="context lengths, uniform in LO,HI")
    a = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in a.ctx.split(","))
    except ValueError:
        p.error(f"--ctx: expected LO,HI, got {a.ctx!r}")
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    if a.block_size < 1:
        p.error(f"--block-size must be >= 1, got {a.block_size}")
    if not 1 <= lo <= hi:
        p.error(f"--ctx: need 1 <= LO <= HI, got LO {lo}, HI {hi}")
    require_gpu(p)
    from kernel_timing import STATE, graph_time_ms, measure_bandwidth, report

    from coserve.engine.kernels.triton.paged_attention import paged_decode_attention

    STATE["copy_gbs"], read = measure_bandwidth()
    print(f"copy {STATE['copy_gbs']:.0f} GB/s, read {read:.0f} GB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    row_major = _sets(a.batch, a.block_size, lo, hi, False, g)
    g = torch.Generator(device="cuda").manual_seed(0)
    head_blocks = _sets(a.batch, a.block_size, lo, hi, True, g)
    tokens = sum(int(s[4].sum()) for s in row_major) / INPUT_SETS
    nbytes = tokens * HKV * D * 2 * 2 + 2 * a.batch * HQ * D * 2
    scale = D**-0.5
    shape = f"B={a.batch} bs={a.block_size} ctx={lo}..{hi}"
    want = [paged_decode_attention(*s, scale) for s in row_major]

    def run(name, sets, config=None, num_splits=None, sort=False):
        calls, outs = [], []
        for s, w in zip(sets, want, strict=True):
            if sort:
                s, order = _sorted(s)
                w = w[order]
            calls.append(lambda s=s: paged_decode_attention(*s, scale, num_splits, config=config))
            outs.append((calls[-1](), w))
        err = max(float((o.float() - w.float()).abs().max()) for o, w in outs)
        ms = graph_time_ms(calls)
        report(name, shape, ms, nbytes, 0.0, f"max|diff| {err:.1e}")

    run("engine", row_major)
    run("sorted", row_major, sort=True)
    run("2 splits", row_major, num_splits=2)
    run("head-blocks", head_blocks)
    run("head-blocks + sorted", head_blocks, sort=True)
    for bn, warps, stages in ((32, 4, 4), (128, 4, 3), (128, 8, 3), (64, 4, 4), (64, 8, 3)):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        run(f"head-blocks + sorted, {bn}/{warps}w/{stages}s", head_blocks, config=cfg, sort=True)
    run("engine (again)", row_major)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
