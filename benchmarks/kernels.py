"""Time the Triton kernels at the study's shapes on one GPU.

    PYTHONPATH=. python3 benchmarks/kernels.py [--only attn,moe,linear,small,step] [--json F]
    PYTHONPATH=. python3 benchmarks/kernels.py --only attn,moe --tp 2   # one TP=2 rank's shapes

Workload (issue 4): Qwen3-30B-A3B-FP8 decode at C=512 (30 in / 512 out: contexts spread over
30..542, mean ~286), 48 layers, Hq=32, Hkv=4, D=128, hidden 2048, 128 experts top-8,
moe_intermediate 768, FP8 128x128 blocks. Every timing is the median of CUDA-graph replays
(CUDA events), so launch gaps are those of the engine's graph mode; inputs rotate over
several sets whose bytes exceed L2, so the figures are DRAM figures. Each line prints the
achieved GB/s (bytes that must cross DRAM: weights, KV, activations) and TFLOP/s next to the
device's ceilings: copy bandwidth measured here, bf16 dense peak ~790 TFLOP/s on H100/H200.
`step` builds all 48 layers (random weights, ~45 GB on the GPU) and times one whole decode
step of the kernels this package provides, giving a projected tok/s ceiling for the engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_timing import (  # noqa: E402
    BF16_PEAK_TFLOPS,
    BLOCK,
    DEV,
    RESULTS,
    STATE,
    eager_time_ms,
    graph_time_ms,
    measure_bandwidth,
    rand_fp8_weight,
    report,
)
from kernels_moe import bench_moe  # noqa: E402

from coserve.engine.kernels import attention as ref_attn  # noqa: E402
from coserve.engine.kernels import fp8 as ref_fp8  # noqa: E402
from coserve.engine.kernels import rotary as ref_rot  # noqa: E402

# ----------------------------------------------------------------------------- attention
_ATTN_SHAPES = [  # (B, block size, context lo, hi): the study's decode spread, and a long one
    *[(B, bs, 30, 542) for B in (512, 256, 64, 8) for bs in (16, 64, 256)],
    (64, 16, 2000, 4000),
]
_SPLIT_SWEEP = (
    dict(BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, num_warps=4, num_stages=4),
)


def _attn_sets(B, Hq, Hkv, D, block_size, lo, hi, g, n=2):
    """`n` input sets (q, k_cache, v_cache, block_tables, context_lens), blocks shuffled."""
    max_blocks = -(-hi // block_size)
    sets = []
    for _ in range(n):
        nb = B * max_blocks
        kc = torch.randn(nb, block_size, Hkv, D, generator=g, device=DEV).to(torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb, generator=g, device=DEV).view(B, max_blocks).to(torch.int32)
        ctx = torch.randint(lo, hi + 1, (B,), generator=g, device=DEV).to(torch.int32)
        q = torch.randn(B, Hq, D, generator=g, device=DEV).to(torch.bfloat16)
        sets.append((q, kc, vc, bt, ctx))
    return sets


def bench_attention(tk) -> None:
    """The split kernel at the head counts of TP=1 and TP=2 (and of --tp), every shape of
    _ATTN_SHAPES; tile sweep and the torch reference at B=512 bs=16."""
    from coserve.engine.kernels.triton.paged_attention import choose_num_splits

    D = 128
    g = torch.Generator(device=DEV).manual_seed(0)
    for tp in sorted({1, 2, STATE["tp"]}):
        Hq, Hkv = 32 // tp, 4 // tp
        print(f"\n== paged decode attention (GQA Hq={Hq} Hkv={Hkv} D={D}, bf16 KV) ==", flush=True)
        for B, block_size, lo, hi in _ATTN_SHAPES:
            sets = _attn_sets(B, Hq, Hkv, D, block_size, lo, hi, g)
            tokens = sum(int(s[4].sum()) for s in sets) / len(sets)
            nbytes = tokens * Hkv * D * 2 * 2 + 2 * B * Hq * D * 2
            flops = 4 * tokens * Hq * D
            scale = D**-0.5
            shape = f"Hkv={Hkv} B={B} bs={block_size} ctx={lo}..{hi}"
            max_tokens = sets[0][3].shape[1] * block_size
            splits = choose_num_splits(B, Hkv, max_tokens, torch.device(DEV))
            ms = graph_time_ms(
                [lambda s=s, sc=scale: tk.paged_decode_attention(*s, sc) for s in sets]
            )
            report("paged_decode_attention", shape, ms, nbytes, flops, f"splits={splits}")
            if B != 512 or block_size != 16:
                continue
            for cfg in _SPLIT_SWEEP:
                ms_c = graph_time_ms(
                    [
                        lambda s=s, sc=scale, c=cfg: tk.paged_decode_attention(*s, sc, config=c)
                        for s in sets
                    ]
                )
                note = ",".join(f"{k}={v}" for k, v in cfg.items())
                report("  split sweep", shape, ms_c, nbytes, flops, note)
            ms_ref = eager_time_ms(
                lambda s=sets[0], sc=scale: ref_attn.paged_decode_attention(*s, sc), 3
            )
            report("  reference (torch, eager)", shape, ms_ref, nbytes, flops)


# ----------------------------------------------------------------------------- FP8 linear
def bench_linear(tk) -> None:
    from coserve.engine.kernels.triton import fp8 as tfp8

    print(
        "\n== FP8 block-quantised dense linear (1x128 activations, 128x128 weights) ==", flush=True
    )
    g = torch.Generator(device=DEV).manual_seed(2)
    shapes = [("qkv_proj", 5120, 2048), ("o_proj", 2048, 4096)]
    for name, N, K in shapes:
        ws = [rand_fp8_weight((N, K), g) for _ in range(8)]  # 8 sets: past L2
        for M in (1, 8, 16, 32, 64, 512, 4096):
            xs = [torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16) for _ in ws]
            nbytes = N * K + N * K // 16384 * 4 + M * K * 2 + M * N * 2
            flops = 2 * M * N * K
            for backend in ("triton", "cublas"):
                tfp8._BACKEND = backend
                try:
                    ms = graph_time_ms(
                        [
                            lambda x=x, w=w: tk.fp8_block_linear(x, w[0], w[1], BLOCK)
                            for x, w in zip(xs, ws, strict=True)
                        ]
                    )
                    report(
                        f"fp8_block_linear [{backend}]",
                        f"{name} M={M} N={N} K={K}",
                        ms,
                        nbytes,
                        flops,
                    )
                except Exception as e:  # noqa: BLE001
                    print(f"  {backend} M={M} {name}: {type(e).__name__}: {str(e)[:200]}")
            tfp8._BACKEND = "auto"
            wb = [ref_fp8.block_dequant(w[0], w[1], BLOCK, torch.bfloat16) for w in ws[:4]]
            ms = graph_time_ms(
                [
                    lambda x=x, w=w: torch.nn.functional.linear(x, w)
                    for x, w in zip(xs[:4], wb, strict=True)
                ]
            )
            report(
                "  bf16 torch.linear (dequantised)",
                f"{name} M={M}",
                ms,
                2 * N * K + M * K * 2 + M * N * 2,
                flops,
            )
            del wb
        x = torch.randn(512, K, device=DEV).to(torch.bfloat16)
        ms = graph_time_ms([lambda x=x: tk.per_token_group_quant_fp8(x)], inner=20)
        report("  per_token_group_quant_fp8", f"M=512 K={K}", ms, 512 * K * 3 + 512 * K // 32)
        del ws


# ----------------------------------------------------------------------------- small kernels
def bench_small(tk) -> None:
    print("\n== norms, rotary, activation (decode T=512; embed prefill T=256) ==", flush=True)
    T = 512
    x = torch.randn(T, 2048, device=DEV).to(torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(2048, device=DEV).to(torch.bfloat16)
    qkv = torch.randn(T, 5120, device=DEV).to(torch.bfloat16)
    q = qkv[:, :4096].view(T, 32, 128)
    wq = torch.randn(128, device=DEV).to(torch.bfloat16)
    cs = ref_rot.rope_cos_sin_cache(128, 40960, 1e6, DEV)
    pos = torch.randint(0, 600, (T,), device=DEV)
    act = torch.randn(256, 2 * 12288, device=DEV).to(torch.bfloat16)
    cases = [
        ("rms_norm", "[512, 2048]", lambda: tk.rms_norm(x, w, 1e-6), 2 * x.numel() * 2),
        (
            "fused_add_rms_norm",
            "[512, 2048]",
            lambda: tk.fused_add_rms_norm(x, r, w, 1e-6),
            4 * x.numel() * 2,
        ),
        (
            "rms_norm (q heads, strided)",
            "[512, 32, 128]",
            lambda: tk.rms_norm(q, wq, 1e-6),
            2 * q.numel() * 2,
        ),
        (
            "apply_rotary (q)",
            "[512, 32, 128]",
            lambda: tk.apply_rotary(q, pos, cs),
            2 * q.numel() * 2,
        ),
        (
            "silu_and_mul (embed MLP)",
            "[256, 24576]",
            lambda: tk.silu_and_mul(act),
            act.numel() * 2 * 3 // 2,
        ),
    ]
    from coserve.engine.kernels import activation as ref_act
    from coserve.engine.kernels import rmsnorm as ref_norm

    refs = {
        "rms_norm": lambda: ref_norm.rms_norm(x, w, 1e-6),
        "fused_add_rms_norm": lambda: ref_norm.rms_norm(x + r, w, 1e-6),
        "rms_norm (q heads, strided)": lambda: ref_norm.rms_norm(q, wq, 1e-6),
        "apply_rotary (q)": lambda: ref_rot.apply_rotary(q, pos, cs),
        "silu_and_mul (embed MLP)": lambda: ref_act.silu_and_mul(act),
    }
    kc = torch.zeros(4096, 16, 4, 128, device=DEV, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(4096 * 16, device=DEV)[:T]
    qw = torch.ones(128, device=DEV, dtype=torch.bfloat16)

    def unfused():
        qq = tk.apply_rotary(tk.rms_norm(qkv[:, :4096].view(T, 32, 128), qw, 1e-6), pos, cs)
        kk = tk.apply_rotary(tk.rms_norm(qkv[:, 4096:4608].view(T, 4, 128), qw, 1e-6), pos, cs)
        ref_attn.store_kvcache(kk, qkv[:, 4608:].view(T, 4, 128), kc, vc, slots)
        return qq

    cases += [
        (
            "qk_norm_rope (+ KV store)",
            "[512, 5120]",
            lambda: tk.qk_norm_rope(qkv, 32, 4, 128, qw, qw, 1e-6, pos, cs, kc, vc, slots),
            (4096 + 512 * 3) * T * 2 * 2,
        ),
        ("  the same, unfused (6 launches)", "[512, 5120]", unfused, (4096 + 512 * 3) * T * 2 * 2),
    ]
    for name, shape, fn, nbytes in cases:
        report(name, shape, graph_time_ms([fn], reps=20, inner=20), nbytes)
        if name in refs:
            report(
                "  reference (torch)", shape, graph_time_ms([refs[name]], reps=20, inner=20), nbytes
            )


# ----------------------------------------------------------------------------- whole step
def bench_step(tk, num_layers: int = 48, B: int = 512) -> None:
    """One decode step of Qwen3-30B-A3B at C=512 built from this package's kernels (plus
    torch for the KV write, residual adds and the bf16 router / lm_head), all 48 layers with
    their own random weights and KV, captured as one CUDA graph."""
    print(
        f"\n== synthetic decode step: {num_layers} layers, B={B}, Qwen3-30B-A3B-FP8 shapes ==",
        flush=True,
    )
    g = torch.Generator(device=DEV).manual_seed(3)
    H, Hq, Hkv, D, E, k, inter, vocab = 2048, 32, 4, 128, 128, 8, 768, 151936
    block_size = 16
    lo, hi = 30, 542
    max_blocks = -(-hi // block_size)
    bf = torch.bfloat16
    layers = []
    t0 = time.time()
    for _ in range(num_layers):
        L = {}
        L["qkv"] = rand_fp8_weight((Hq * D + 2 * Hkv * D, H), g)
        L["o"] = rand_fp8_weight((H, Hq * D), g)
        L["w13"] = rand_fp8_weight((E, 2 * inter, H), g)
        L["w2"] = rand_fp8_weight((E, H, inter), g)
        L["gate"] = (torch.randn(E, H, generator=g, device=DEV) * 0.02).to(bf)
        L["n1"] = torch.ones(H, device=DEV, dtype=bf)
        L["n2"] = torch.ones(H, device=DEV, dtype=bf)
        L["qn"] = torch.ones(D, device=DEV, dtype=bf)
        L["kn"] = torch.ones(D, device=DEV, dtype=bf)
        nb = B * max_blocks
        L["kc"] = torch.empty(nb, block_size, Hkv, D, device=DEV, dtype=bf).normal_(generator=g)
        L["vc"] = torch.empty_like(L["kc"]).normal_(generator=g)
        layers.append(L)
    lm_head = (torch.randn(vocab, H, generator=g, device=DEV) * 0.02).to(bf)
    bt = torch.randperm(B * max_blocks, generator=g, device=DEV).view(B, max_blocks).int()
    ctx = torch.randint(lo, hi + 1, (B,), generator=g, device=DEV).int()
    slot = (
        bt[torch.arange(B, device=DEV), (ctx - 1) // block_size].long() * block_size
        + ((ctx - 1) % block_size).long()
    )
    pos = (ctx - 1).long()
    cs = ref_rot.rope_cos_sin_cache(D, 40960, 1e6, DEV)
    h0 = torch.randn(B, H, generator=g, device=DEV).to(bf)
    print(
        f"  built in {time.time() - t0:.0f} s, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated",
        flush=True,
    )
    kv_tokens = int(ctx.sum())
    weight_bytes = (
        num_layers * ((Hq * D + 2 * Hkv * D) * H + H * Hq * D + E * 3 * H * inter + E * H * 2)
        + vocab * H * 2
    )
    kv_bytes = num_layers * kv_tokens * Hkv * D * 2 * 2

    def layer_fn(L, h, res):
        x, res = tk.fused_add_rms_norm(h, res, L["n1"], 1e-6)
        qkv = tk.fp8_block_linear(x, *L["qkv"], BLOCK)
        q, _, _ = tk.qk_norm_rope(
            qkv, Hq, Hkv, D, L["qn"], L["kn"], 1e-6, pos, cs, L["kc"], L["vc"], slot
        )
        o = tk.paged_decode_attention(q, L["kc"], L["vc"], bt, ctx, D**-0.5)
        h = tk.fp8_block_linear(o.view(B, Hq * D), *L["o"], BLOCK)
        x, res = tk.fused_add_rms_norm(h, res, L["n2"], 1e-6)
        wts, ids = tk.topk_softmax(torch.nn.functional.linear(x, L["gate"]), k, True)
        h = tk.fused_moe(
            x,
            L["w13"][0],
            L["w2"][0],
            wts,
            ids,
            L["w13"][1],
            L["w2"][1],
            BLOCK,
            config=STATE.get("moe_best_cfg"),
        )
        return h, res

    def step():
        h, res = h0, torch.zeros_like(h0)
        for L in layers:
            h, res = layer_fn(L, h, res)
        x, _ = tk.fused_add_rms_norm(h, res, layers[0]["n1"], 1e-6)
        return torch.nn.functional.linear(x, lm_head).argmax(-1)

    ms = graph_time_ms([step], reps=10)
    report(
        "decode step (graph, all kernels)",
        f"B={B} L={num_layers} ctx={lo}..{hi}",
        ms,
        weight_bytes + kv_bytes,
        note=f"-> {B / ms * 1e3:,.0f} tok/s projected",
    )
    # the same step with the MoE or the attention left out, to split the time
    for name in ("fused_moe", "paged_decode_attention"):
        saved = getattr(tk, name)
        setattr(tk, name, lambda x, *a, **kw: x)
        try:
            ms_without = graph_time_ms([step], reps=10)
        finally:
            setattr(tk, name, saved)
        report(
            f"  step without {name}",
            "",
            ms_without,
            note=f"{name} share {(ms - ms_without) / ms:.0%}",
        )


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="attn,moe,linear,small,step")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        choices=(1, 2, 4),
        help="attention and MoE at one tensor-parallel rank's shapes (heads and the expert "
        "intermediate size divided by TP)",
    )
    args = ap.parse_args()
    STATE["tp"] = args.tp
    import triton

    import coserve.engine.kernels.triton as tk

    props = torch.cuda.get_device_properties(0)
    copy, read = measure_bandwidth()
    STATE["copy_gbs"] = max(copy, read)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"triton {triton.__version__}; measured D2D copy {copy:.0f} GB/s (read+write), "
        f"read-only {read:.0f} GB/s; %bw below is of {STATE['copy_gbs']:.0f} GB/s; "
        f"bf16 peak ~{BF16_PEAK_TFLOPS:.0f} TFLOP/s",
        flush=True,
    )
    print(f"{'kernel':<34} {'shape':<34} {'time':>13} {'GB/s':>13} {'':>8} {'TFLOP/s':>15}")
    parts = {
        "attn": bench_attention,
        "moe": bench_moe,
        "linear": bench_linear,
        "small": bench_small,
        "step": lambda t: bench_step(t, args.layers),
    }
    for name in args.only.split(","):
        try:
            parts[name](tk)
        except Exception as e:  # noqa: BLE001 - keep the other parts' figures
            import traceback

            traceback.print_exc()
            print(f"!! part {name} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(device=props.name, copy_gbs=copy, read_gbs=read, results=RESULTS), indent=1
            )
        )


if __name__ == "__main__":
    main()
