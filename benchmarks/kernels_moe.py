"""The MoE part of benchmarks/kernels.py (`--only moe`): fused_moe at the decode shape with its
tile sweep, each stage alone, GEMM2 and BLOCK_M sweeps, torch's grouped GEMMs for the record,
and the torch reference. CUDA only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kernel_timing import BLOCK, DEV, STATE, eager_time_ms, graph_time_ms, rand_fp8_weight, report

from coserve.engine.kernels import moe as ref_moe


def _moe_bytes(T, E, k, H, inter):
    """DRAM bytes of one fused_moe call: FP8 weights (+ scales) of the experts that get at
    least one token (expected count for uniform routing), activations in and out, the FP8
    intermediate and the bf16 per-pair outputs (written, read back by the combine)."""
    touched = E * (1 - (1 - k / E) ** T)
    per_expert = 3 * H * inter + 3 * (H // 128) * (inter // 128) * 4
    act = 2 * T * H * 2 + T * k * inter * 2 + T * k * H * 2 * 2
    return touched * per_expert + act


@dataclass
class GemmInputs:
    """One decode step's inputs to the two expert GEMMs (routing done), and their outputs."""

    T: int
    k: int
    H: int
    inter: int
    bm: int
    group_m: int
    a1: torch.Tensor
    a1s: torch.Tensor
    w13: torch.Tensor
    s13: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    npp: torch.Tensor
    topw: torch.Tensor
    inter_q: torch.Tensor
    inter_s: torch.Tensor
    out_pairs: torch.Tensor

    def gemm1(self, bn, warps, stages, tma=None):
        """GEMM1 alone; `tma` None: the weights read as fused_moe reads them (B_TMA1)."""
        from coserve.engine.kernels.triton import moe as tmoe
        from coserve.engine.kernels.triton import moe_gemm

        tma = tmoe.B_TMA1 if tma is None else tma
        moe_gemm.launch_gemm(
            self.a1, self.a1s, self.w13, self.s13, self.inter_q, self.inter_s, None,
            self.sorted_ids, self.expert_ids, self.npp,
            self.inter, self.H, self.inter, self.T * self.k, self.k, True, True, False,
            self.bm, bn, self.group_m, warps, stages, b_tma=tma,
        )  # fmt: skip

    def gemm2(self, bn, warps, stages, tma=None):
        """GEMM2 alone; `tma` None: the weights read as fused_moe reads them (B_TMA2)."""
        from coserve.engine.kernels.triton import moe as tmoe
        from coserve.engine.kernels.triton import moe_gemm

        tma = tmoe.B_TMA2 if tma is None else tma
        moe_gemm.launch_gemm(
            self.inter_q, self.inter_s, self.w2, self.s2, self.out_pairs, None, self.topw,
            self.sorted_ids, self.expert_ids, self.npp,
            self.H, self.inter, 0, self.T * self.k, 1, False, False, True,
            self.bm, bn, self.group_m, warps, stages, b_tma=tma,
        )  # fmt: skip


def _alternatives(T, E, H, inter, k) -> None:
    """The grouped GEMMs torch has, on GEMM1's shape (uniform routing), for the record."""
    try:
        perm = torch.randn(T * k, H, device=DEV).to(torch.bfloat16)
        counts = torch.full((E,), T * k // E, device=DEV, dtype=torch.int32)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w13b = torch.randn(E, H, 2 * inter, device=DEV).to(torch.bfloat16)
        ms = graph_time_ms([lambda: torch._grouped_mm(perm, w13b, offs=offs)], reps=10)
        report(
            "  alt: torch._grouped_mm bf16 GEMM1",
            f"T={T} uniform 32 rows/expert",
            ms,
            E * 2 * inter * H * 2,
            2 * T * k * 2 * inter * H,
        )
    except Exception as e:  # noqa: BLE001
        print(f"  torch._grouped_mm bf16: {type(e).__name__}: {str(e)[:160]}")
    try:
        pq = perm.to(torch.float8_e4m3fn)
        w13q = torch.randn(E, 2 * inter, H, device=DEV).to(torch.float8_e4m3fn)
        sa = torch.ones(T * k, device=DEV)
        sb = torch.ones(E, 2 * inter, device=DEV)
        ms = graph_time_ms(
            [
                lambda: torch._scaled_grouped_mm(
                    pq, w13q.transpose(-2, -1), sa, sb, offs=offs, out_dtype=torch.bfloat16
                )
            ],
            reps=10,
        )
        report(
            "  alt: torch._scaled_grouped_mm rowwise",
            f"T={T} uniform 32 rows/expert",
            ms,
            E * 2 * inter * H,
            2 * T * k * 2 * inter * H,
            "rowwise scales, not 128x128",
        )
    except Exception as e:  # noqa: BLE001
        print(f"  torch._scaled_grouped_mm: {type(e).__name__}: {str(e)[:160]}")


def bench_moe(tk) -> None:
    from coserve.engine.kernels.triton import moe as tmoe

    E, k, H, inter = 128, 8, 2048, 768 // STATE["tp"]
    print(f"\n== MoE, FP8 block-quantised experts (E={E} top-{k} H={H} I={inter}) ==", flush=True)
    g = torch.Generator(device=DEV).manual_seed(1)
    sets_w = [
        rand_fp8_weight((E, 2 * inter, H), g) + rand_fp8_weight((E, H, inter), g) for _ in range(2)
    ]  # (w13, s13, w2, s2) x 2 = 1.2 GB

    def inputs(T):
        """(x, router logits, (routing weights, expert ids)) of T random tokens."""
        x = torch.randn(T, H, generator=g, device=DEV).to(torch.bfloat16)
        logits = torch.randn(T, E, generator=g, device=DEV).to(torch.bfloat16)
        return x, logits, tk.topk_softmax(logits, k, True)

    def make(T, cfg=None):
        calls = []
        for w13, s13, w2, s2 in sets_w:
            x, _, (wts, ids) = inputs(T)
            calls.append(
                lambda x=x, w=wts, ids=ids, w13=w13, s13=s13, w2=w2, s2=s2: tk.fused_moe(
                    x, w13, w2, w, ids, s13, s2, BLOCK, config=cfg
                )
            )
        return calls

    flops_per_tok = 2 * k * 3 * H * inter
    # tile sweep at the decode shape, GEMM2's weights by pointer loads and by TMA
    T = 512
    best = None
    for tma, bm, gm in (
        (False, 32, 8), (False, 64, 1), (False, 64, 8), (False, 64, 16),
        (True, 32, 8), (True, 64, 8), (True, 64, 16),
    ):  # fmt: skip
        for w1, st1, w2_, st2 in ((4, 3, 4, 4), (8, 3, 4, 3), (8, 4, 4, 4)):
            cfg = dict(
                B_TMA2=tma,
                BLOCK_M=bm,
                GROUP_M=gm,
                num_warps1=w1,
                num_stages1=st1,
                num_warps2=w2_,
                num_stages2=st2,
            )
            try:
                ms = graph_time_ms(make(T, cfg), reps=15)
            except Exception as e:  # noqa: BLE001 - a config that does not compile
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            report(
                "  fused_moe sweep",
                f"T={T} " + ",".join(f"{v}" for v in cfg.values()),
                ms,
                _moe_bytes(T, E, k, H, inter),
                flops_per_tok * T,
            )
            if best is None or ms < best[0]:
                best = (ms, cfg)
    STATE["moe_best_cfg"] = best[1] if best else None
    print(f"  best decode config: {best}", flush=True)
    for T in (1, 64, 256, 512, 2048):
        cfg = best[1] if (best and T == 512) else None
        ms = graph_time_ms(make(T, cfg), reps=15)
        report(
            "fused_moe (topk -> combine)",
            f"T={T} E={E} k={k}",
            ms,
            _moe_bytes(T, E, k, H, inter),
            flops_per_tok * T,
            "best cfg" if cfg else "default cfg",
        )

    # the expert weights by pointer loads in both GEMMs, and by TMA in both, against the
    # default (TMA in GEMM2 only), at the best config's tiles for T=512
    for name, variant in (
        ("fused_moe, pointer loads", dict(B_TMA1=False, B_TMA2=False)),
        ("fused_moe, TMA in both", dict(B_TMA1=True, B_TMA2=True)),
    ):
        for T in (64, 256, 512, 2048):
            cfg = dict(best[1] if (best and T == 512) else {}, **variant)
            report(
                name,
                f"T={T} E={E} k={k}",
                graph_time_ms(make(T, cfg), reps=15),
                _moe_bytes(T, E, k, H, inter),
                flops_per_tok * T,
                "best cfg" if T == 512 and best else "default cfg",
            )

    # where the time goes at T=512 (best config): each stage alone as fused_moe runs it,
    # graph-timed; the GEMM sweeps below give both ways of reading the weights
    T = 512
    cfg = dict(tmoe.default_config(T), **(best[1] if best else {}))
    w13, s13, w2, s2 = sets_w[0]
    x, logits, (wts, ids) = inputs(T)
    bm = cfg["BLOCK_M"]
    sorted_ids, expert_ids, npp = tk.moe_align(ids, E, bm)
    a1, a1s = tk.per_token_group_quant_fp8(x)
    gi = GemmInputs(
        T, k, H, inter, bm, cfg["GROUP_M"], a1, a1s, w13, s13, w2, s2,
        sorted_ids, expert_ids, npp, wts.reshape(-1),
        torch.empty(T * k, inter, device=DEV, dtype=torch.float8_e4m3fn),
        torch.empty(T * k, inter // 128, device=DEV, dtype=torch.float32),
        torch.empty(T * k, H, device=DEV, dtype=torch.bfloat16),
    )  # fmt: skip
    stages = {
        "topk_softmax": lambda: tk.topk_softmax(logits, k, True),
        "moe_align": lambda: tk.moe_align(ids, E, bm),
        "quant A (1x128)": lambda: tk.per_token_group_quant_fp8(x),
        "GEMM1 gate|up + silu*up + quant": lambda: gi.gemm1(
            cfg["BLOCK_N1"], cfg["num_warps1"], cfg["num_stages1"]
        ),
        "GEMM2 down * weight": lambda: gi.gemm2(
            cfg["BLOCK_N2"], cfg["num_warps2"], cfg["num_stages2"]
        ),
        "combine (sum over k), torch": lambda: gi.out_pairs.view(T, k, H).sum(dim=1),
        "combine (sum over k), moe_sum": lambda: tk.moe_sum(gi.out_pairs, k),
    }
    wbytes = {
        "GEMM1 gate|up + silu*up + quant": E * 2 * inter * H,
        "GEMM2 down * weight": E * H * inter,
    }
    for name, fn in stages.items():
        ms = graph_time_ms([fn], reps=20, inner=1 if name.startswith("GEMM") else 20)
        report(f"  stage: {name}", f"T={T}", ms, wbytes.get(name, 0))

    # GEMM1 (at 2 stages two programs share an SM, 80 KB of shared memory each at BM=64: slower
    # on an H200, 147-182 us against 131-134, 2026-12-01)
    for tma in (False, True):
        for w1, st1 in ((8, 3), (8, 4)):
            report(
                "  GEMM1 sweep",
                f"T={T} warps={w1} stages={st1}" + (" TMA" if tma else ""),
                graph_time_ms(
                    [lambda w1=w1, st1=st1, t=tma: gi.gemm1(cfg["BLOCK_N1"], w1, st1, tma=t)],
                    reps=20,
                ),
                E * 2 * inter * H,
            )

    # GEMM2 (K=768: a short K loop) tile sweep
    for tma in (False, True):
        for bn2, w2_, st2 in ((64, 4, 3), (128, 4, 3), (128, 4, 4), (128, 8, 4), (256, 8, 3)):
            report(
                "  GEMM2 sweep",
                f"T={T} BN={bn2} warps={w2_} stages={st2}" + (" TMA" if tma else ""),
                graph_time_ms(
                    [lambda bn2=bn2, w2_=w2_, st2=st2, t=tma: gi.gemm2(bn2, w2_, st2, tma=t)],
                    reps=20,
                ),
                E * H * inter,
            )

    for T2, bm2 in ((64, 16), (64, 32), (256, 32), (256, 64)):
        cfg2 = dict(tmoe.default_config(T2), BLOCK_M=bm2)
        report(
            "  fused_moe BLOCK_M sweep",
            f"T={T2} BM={bm2}",
            graph_time_ms(make(T2, cfg2), reps=10),
            _moe_bytes(T2, E, k, H, inter),
            flops_per_tok * T2,
        )

    _alternatives(T, E, H, inter, k)

    ms_ref = eager_time_ms(
        lambda: ref_moe.fused_moe(x, w13, w2, wts, ids.long(), s13, s2, BLOCK), 3
    )
    report(
        "  reference (torch loop, eager)",
        f"T={T}",
        ms_ref,
        _moe_bytes(T, E, k, H, inter),
        flops_per_tok * T,
    )
