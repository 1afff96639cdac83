"""The Triton kernels and the timing harness of `moe_gemm1_variants.py` (its docstring says
what each family is), in a module of their own so that the script's `--help` and its refusal
without a GPU or Triton need neither."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coserve.engine.kernels import fp8 as ref_fp8  # noqa: E402
from coserve.engine.kernels import triton as tk  # noqa: E402
from coserve.engine.kernels.triton import moe as M  # noqa: E402
from coserve.engine.kernels.triton import moe_gemm  # noqa: E402
from coserve.engine.kernels.triton.fp8 import FP8_MAX, per_token_group_quant_fp8  # noqa: E402
from coserve.engine.kernels.triton.moe_routing import moe_align  # noqa: E402
from coserve.engine.kernels.triton.tile_order import grouped_tile  # noqa: E402


@triton.jit
def _silu_mul_quant_store(
    acc, acc2, c_ptr, cs_ptr, pair, row_mask, offs_n, pid_n, stride_cm, stride_csm, FP8_MAX
):
    """Both kernels' epilogue, as the engine's GEMM1 does it: silu(gate) * up, re-quantised to
    FP8 per row of the tile (one 128-wide group), rows written at their pair index."""
    acc = acc / (1.0 + tl.exp(-acc)) * acc2
    c_row = pair.to(tl.int64)
    amax = tl.max(tl.abs(acc), 1)
    s = tl.maximum(amax, 1e-10) / FP8_MAX
    q = tl.clamp(acc / s[:, None], -FP8_MAX, FP8_MAX)
    tl.store(
        c_ptr + c_row[:, None] * stride_cm + offs_n[None, :],
        q.to(c_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )
    tl.store(cs_ptr + c_row * stride_csm + pid_n, s, mask=row_mask)


@triton.jit
def _gemm1_desc(
    a_desc,
    as_ptr,
    b_desc,
    bs_ptr,
    c_ptr,
    cs_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    num_valid,
    num_pid_m,
    b_rows,
    up_offset,
    stride_bse,
    stride_bsn,
    stride_cm,
    stride_csm,
    K: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    WS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = up_offset // BLOCK_N
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_valid
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_row = (expert * b_rows + pid_n * BLOCK_N).to(tl.int32)
    a_row0 = (pid_m * BLOCK_M).to(tl.int32)
    as_ptrs = as_ptr + offs_m * (K // BLOCK_K)
    bs_base = bs_ptr + expert * stride_bse
    bs_ptrs = bs_base + (offs_n // 128) * stride_bsn
    bs2_ptrs = bs_base + ((offs_n + up_offset) // 128) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in tl.range(0, K // BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([a_row0, kb * BLOCK_K])
        b = b_desc.load([b_row, kb * BLOCK_K]).T
        b2 = b_desc.load([b_row + up_offset, kb * BLOCK_K]).T
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        b2_s = tl.load(bs2_ptrs + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        acc2 += tl.dot(a, b2) * a_s[:, None] * b2_s[None, :]
    _silu_mul_quant_store(
        acc, acc2, c_ptr, cs_ptr, pair, row_mask, offs_n, pid_n, stride_cm, stride_csm, FP8_MAX
    )


@triton.jit
def _gemm1_persistent(
    a_ptr,
    as_ptr,
    b_desc,
    bs_ptr,
    c_ptr,
    cs_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    num_valid,
    b_rows,
    up_offset,
    stride_am,
    stride_asm,
    stride_bse,
    stride_bsn,
    stride_cm,
    stride_csm,
    A_ROW_DIV: tl.constexpr,
    K: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    STAGES: tl.constexpr,
    FLATTEN: tl.constexpr,
    TILED: tl.constexpr,
):
    num_pid_n = up_offset // BLOCK_N
    num_tiles = (tl.load(num_post_pad_ptr) // BLOCK_M) * num_pid_n
    offs_k = tl.arange(0, BLOCK_K)
    KB: tl.constexpr = K // BLOCK_K
    for tile in tl.range(
        tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN, num_stages=STAGES
    ):
        # n-major inside an M-block: the tiles of one expert run side by side
        pid_m = tile // num_pid_n
        pid_n = tile % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        row_mask = pair < num_valid
        a_row = (pair // A_ROW_DIV).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_row = (expert * b_rows + pid_n * BLOCK_N).to(tl.int32)
        # tiled: b_desc views the weights as [E, 2I/BLOCK_N, K/BLOCK_K, BLOCK_N, BLOCK_K], so
        # one box is one contiguous tile
        gate_tile = (expert * (b_rows // BLOCK_N) + pid_n) * KB
        up_tile = gate_tile + (up_offset // BLOCK_N) * KB
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
        as_ptrs = as_ptr + a_row * stride_asm
        bs_base = bs_ptr + expert * stride_bse
        bs_ptrs = bs_base + (offs_n // 128) * stride_bsn
        bs2_ptrs = bs_base + ((offs_n + up_offset) // 128) * stride_bsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(KB):
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=row_mask[:, None], other=0.0)
            if TILED:
                b = b_desc.load([((gate_tile + kb) * BLOCK_N).to(tl.int32), 0]).T
                b2 = b_desc.load([((up_tile + kb) * BLOCK_N).to(tl.int32), 0]).T
            else:
                b = b_desc.load([b_row, kb * BLOCK_K]).T
                b2 = b_desc.load([b_row + up_offset, kb * BLOCK_K]).T
            a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptrs + kb)
            b2_s = tl.load(bs2_ptrs + kb)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            acc2 += tl.dot(a, b2) * a_s[:, None] * b2_s[None, :]
        _silu_mul_quant_store(
            acc, acc2, c_ptr, cs_ptr, pair, row_mask, offs_n, pid_n, stride_cm, stride_csm, FP8_MAX
        )


@dataclass
class Gemm1Case:
    """GEMM1's inputs at one shape, and the engine kernel's output as the reference."""

    tokens: int
    k: int
    hidden: int
    inter: int
    block_m: int
    a1: torch.Tensor  # [T, H] FP8 activations
    a1_s: torch.Tensor  # [T, H/128] their scales
    w13: torch.Tensor  # [E, 2I, H] FP8
    s13: torch.Tensor  # [E, 2I/128, H/128]
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_post_pad: torch.Tensor
    cfg: dict

    @property
    def pairs(self) -> int:
        return self.tokens * self.k

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(self.pairs, self.inter, device="cuda", dtype=torch.float8_e4m3fn),
            torch.zeros(self.pairs, self.inter // 128, device="cuda", dtype=torch.float32),
        )

    def dequant(self, out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return out.float().view(self.pairs, self.inter // 128, 128) * scales[:, :, None]

    def engine(self, out: torch.Tensor, scales: torch.Tensor) -> None:
        c = self.cfg
        moe_gemm.launch_gemm(
            self.a1, self.a1_s, self.w13, self.s13, out, scales, None, self.sorted_ids,
            self.expert_ids, self.num_post_pad, self.inter, self.hidden, self.inter, self.pairs,
            self.k, gated=True, quant_out=True, mul_weight=False, block_m=self.block_m,
            block_n=128, group_m=c["GROUP_M"], num_warps=c["num_warps1"],
            num_stages=c["num_stages1"],
        )  # fmt: skip


def make_case(tokens: int) -> Gemm1Case:
    E, k, H, inter = 128, 8, 2048, 768
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(E, 2 * inter, H, generator=g, device="cuda") * 0.02
    w13, s13 = ref_fp8.block_quant(w, (128, 128))
    x = torch.randn(tokens, H, generator=g, device="cuda").to(torch.bfloat16)
    logits = torch.randn(tokens, E, generator=g, device="cuda").to(torch.bfloat16)
    _, ids = tk.topk_softmax(logits, k, True)
    cfg = M.default_config(tokens)
    bm = cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_post_pad = moe_align(ids, E, bm)
    a1, a1_s = per_token_group_quant_fp8(x)
    return Gemm1Case(tokens, k, H, inter, bm, a1, a1_s, w13, s13, sorted_ids, expert_ids,
                     num_post_pad, cfg)  # fmt: skip


def graph_time_us(fn, reps: int = 20, iters: int = 10) -> float:
    """Best of `iters` replays of a CUDA graph of `reps` calls, per call, in us."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def time_variant(label: str, case: Gemm1Case, ref: torch.Tensor, launch) -> None:
    """Times `launch(out, scales)` and prints it with its largest difference from `ref`."""
    out, scales = case.outputs()
    try:
        t = graph_time_us(partial(launch, out, scales))
    except Exception as e:  # a variant Triton cannot compile is a result, not a crash
        print(f"{label}: FAILED {type(e).__name__}: {str(e)[-200:]}")
        return
    err = (case.dequant(out, scales) - ref).abs().max().item()
    print(f"{label}: {t:.1f} us, max|diff| {err:.3g} (reference max {ref.abs().max().item():.3g})")


def engine_reference(case: Gemm1Case) -> torch.Tensor:
    out, scales = case.outputs()
    t = graph_time_us(partial(case.engine, out, scales))
    c = case.cfg
    print(f"T={case.tokens} live M-blocks={int(case.num_post_pad.item()) // case.block_m}")
    print(
        f"engine GEMM1 (A by pointers, B_TMA1={M.B_TMA1}, {c['num_warps1']} warps, "
        f"{c['num_stages1']} stages): {t:.1f} us"
    )
    return case.dequant(out, scales)


def desc_variants(case: Gemm1Case, ref: torch.Tensor) -> None:
    rows, bm, H = case.sorted_ids.shape[0], case.block_m, case.hidden
    a_sorted = torch.zeros(rows, H, device="cuda", dtype=torch.float8_e4m3fn)
    as_sorted = torch.zeros(rows, H // 128, device="cuda", dtype=torch.float32)

    def gather():
        tok = torch.where(case.sorted_ids < case.pairs, case.sorted_ids // case.k, 0)
        a_sorted.copy_(case.a1.index_select(0, tok))
        as_sorted.copy_(case.a1_s.index_select(0, tok))

    print(f"gather of A into expert order (torch index_select): {graph_time_us(gather):.1f} us")
    a_desc = TensorDescriptor.from_tensor(a_sorted, [bm, 128])
    b_desc = TensorDescriptor.from_tensor(case.w13.view(-1, H), [128, 128])
    grid = ((rows // bm) * (case.inter // 128),)

    def launch(ws, warps, stages, out, scales):
        _gemm1_desc[grid](
            a_desc, as_sorted, b_desc, case.s13, out, scales, case.sorted_ids, case.expert_ids,
            case.num_post_pad, case.pairs, rows // bm, 2 * case.inter, case.inter,
            case.s13.stride(0), case.s13.stride(1), out.stride(0), scales.stride(0), K=H,
            FP8_MAX=FP8_MAX, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=case.cfg["GROUP_M"],
            STAGES=stages, WS=ws, num_warps=warps,
        )  # fmt: skip

    for ws in (False, True):
        for warps in (4, 8):
            for stages in (3, 4):
                label = f"desc ws={ws} warps={warps} stages={stages}"
                time_variant(label, case, ref, partial(launch, ws, warps, stages))


def persistent_variants(case: Gemm1Case, ref: torch.Tensor) -> None:
    H = case.hidden
    b_desc = TensorDescriptor.from_tensor(case.w13.view(-1, H), [128, 128])
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def launch(flatten, progs, warps, stages, out, scales):
        _gemm1_persistent[(progs,)](
            case.a1, case.a1_s, b_desc, case.s13, out, scales, case.sorted_ids, case.expert_ids,
            case.num_post_pad, case.pairs, 2 * case.inter, case.inter, case.a1.stride(0),
            case.a1_s.stride(0), case.s13.stride(0), case.s13.stride(1), out.stride(0),
            scales.stride(0), A_ROW_DIV=case.k, K=H, FP8_MAX=FP8_MAX, BLOCK_M=case.block_m,
            BLOCK_N=128, BLOCK_K=128, NUM_PROGS=progs, STAGES=stages, FLATTEN=flatten,
            TILED=False, num_warps=warps,
        )  # fmt: skip

    for flatten in (False, True):
        for progs in (sms, 2 * sms):
            for warps, stages in ((8, 4), (4, 4), (8, 3), (4, 2)):
                label = f"persistent flatten={flatten} progs={progs} warps={warps} stages={stages}"
                time_variant(label, case, ref, partial(launch, flatten, progs, warps, stages))


def tiled_variants(case: Gemm1Case, ref: torch.Tensor) -> None:
    """The weights stored tile by tile ([E, 2I/128, H/128, 128, 128]: each 16 KB box one
    contiguous run) against the checkpoint's row-major layout (each box 128 runs of 128 B,
    2 KB apart), both by TMA, one tile a program or persistent."""
    H, E = case.hidden, case.w13.shape[0]
    nb, kb = case.w13.shape[1] // 128, H // 128
    tiled = case.w13.view(E, nb, 128, kb, 128).permute(0, 1, 3, 2, 4).contiguous()
    descs = {
        False: TensorDescriptor.from_tensor(case.w13.view(-1, H), [128, 128]),
        True: TensorDescriptor.from_tensor(tiled.view(-1, 128), [128, 128]),
    }
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    every_tile = (case.sorted_ids.shape[0] // case.block_m) * (case.inter // 128)

    def launch(is_tiled, progs, stages, out, scales):
        _gemm1_persistent[(progs,)](
            case.a1, case.a1_s, descs[is_tiled], case.s13, out, scales, case.sorted_ids,
            case.expert_ids, case.num_post_pad, case.pairs, 2 * case.inter, case.inter,
            case.a1.stride(0), case.a1_s.stride(0), case.s13.stride(0), case.s13.stride(1),
            out.stride(0), scales.stride(0), A_ROW_DIV=case.k, K=H, FP8_MAX=FP8_MAX,
            BLOCK_M=case.block_m, BLOCK_N=128, BLOCK_K=128, NUM_PROGS=progs, STAGES=1,
            FLATTEN=False, TILED=is_tiled, num_warps=8, num_stages=stages,
        )  # fmt: skip

    for is_tiled in (False, True):
        for progs in (every_tile, 2 * sms):
            for stages in (3, 4):
                where = "one tile a program" if progs == every_tile else f"{progs} programs"
                label = (
                    f"{'tiled' if is_tiled else 'row-major'} weights, {where}, 8 warps, "
                    f"{stages} stages"
                )
                time_variant(label, case, ref, partial(launch, is_tiled, progs, stages))


def run(tokens: int, only: str | None) -> None:
    """Times the engine's GEMM1 at `tokens` and then each family (all, or `only`)."""
    case = make_case(tokens)
    ref = engine_reference(case)
    for name, family in (
        ("desc", desc_variants),
        ("persistent", persistent_variants),
        ("tiled", tiled_variants),
    ):
        if only in (None, name):
            family(case, ref)
