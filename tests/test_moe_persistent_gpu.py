"""The persistent MoE expert GEMM (kernels/triton/moe_persistent.py) against the per-tile kernel
and the plain-torch reference.

GPU only (`-m gpu`), or on the CPU through Triton's interpreter with TRITON_INTERPRET=1 (float32
data), as tests/test_kernels_gpu.py. There each program walks several tiles (the interpreter
counts 2 SMs), so tile hand-overs, padding M-blocks and experts without pairs are all met."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from coserve.engine.kernels import fp8 as ref_fp8
from coserve.engine.kernels import moe as ref_moe

pytestmark = pytest.mark.gpu

_HAS_TRITON = importlib.util.find_spec("triton") is not None
if torch.cuda.is_available() and _HAS_TRITON:
    DEV, DT = "cuda", torch.bfloat16
elif os.environ.get("TRITON_INTERPRET") == "1" and _HAS_TRITON:
    DEV, DT = "cpu", torch.float32
else:
    pytest.skip("needs CUDA and Triton (or TRITON_INTERPRET=1)", allow_module_level=True)

ON_GPU = DEV == "cuda"
BLOCK = (128, 128)
E, H, INTER, K_TOP = 8, 256, 128, 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _weights(fp8: bool, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, H, generator=g, device=DEV) * 0.03
    w2 = torch.randn(E, H, INTER, generator=g, device=DEV) * 0.03
    if not fp8:
        return w13.to(DT), w2.to(DT), None, None
    q13, s13 = ref_fp8.block_quant(w13, BLOCK)
    q2, s2 = ref_fp8.block_quant(w2, BLOCK)
    return q13, q2, s13, s2


def _routing(T: int, seed: int = 1):
    """Routing that leaves experts 2, 4, 5 and 7 without pairs and crowds expert 0 (more than
    one M-block of 16), with the weights of a softmax."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    used = torch.tensor([0, 1, 3, 6], device=DEV)
    ids = used[torch.randint(0, 4, (T, K_TOP), generator=g, device=DEV)]
    ids[:, 0] = 0
    ids[:, 1] = torch.where(ids[:, 1] == 0, 6, ids[:, 1])
    w = torch.rand(T, K_TOP, generator=g, device=DEV) + 0.1
    return (w / w.sum(1, keepdim=True)).float(), ids.to(torch.int32)


def _x(T: int, seed: int = 2):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(T, H, generator=g, device=DEV).to(DT)


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("loop", [1, 2])
@pytest.mark.parametrize("block_n, progs_per_sm", [(128, 1), (64, 3)])
def test_persistent_moe_matches_per_tile_kernel_and_reference(fp8, loop, block_n, progs_per_sm):
    """fused_moe end to end. BLOCK_N 128 takes GEMM1's FP8 re-quantising epilogue, 64 its
    16-bit one (re-quantised after); 3 programs per SM leave some programs without a tile."""
    from coserve.engine.kernels.triton import fused_moe

    T = 21
    w13, w2, s13, s2 = _weights(fp8)
    x = _x(T)
    weights, ids = _routing(T)
    blk = BLOCK if fp8 else None
    tiles = dict(BLOCK_M=16, BLOCK_N1=block_n, BLOCK_N2=block_n, GROUP_M=2)
    base = fused_moe(x, w13, w2, weights, ids, s13, s2, blk, config=tiles)
    cfg = dict(
        tiles,
        PERSISTENT1=loop,
        PERSISTENT2=loop,
        progs_per_sm1=progs_per_sm,
        progs_per_sm2=progs_per_sm,
    )
    out = fused_moe(x, w13, w2, weights, ids, s13, s2, blk, config=cfg)
    ref = ref_moe.fused_moe(x, w13, w2, weights, ids.long(), s13, s2, blk)
    assert out.shape == (T, H) and out.dtype == x.dtype
    assert rel_err(out, base) < (1e-2 if ON_GPU else 1e-6)
    if fp8:
        assert rel_err(out, ref) < (0.06 if ON_GPU else 0.25)
    else:
        assert rel_err(out, ref) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("loop", [1, 2])
def test_persistent_moe_gemms_one_by_one(fp8, loop):
    """Each GEMM alone, on the same inputs as the per-tile kernel: GEMM1's (re-quantised)
    intermediate and its scales, GEMM2's per-pair rows times the routing weight. Rows of no
    pair are never written by either kernel, so only the pairs' rows are compared."""
    from coserve.engine.kernels.triton import moe, moe_align, per_token_group_quant_fp8

    T, bm = 19, 16
    w13, w2, s13, s2 = _weights(fp8, seed=3)
    x = _x(T, seed=4)
    weights, ids = _routing(T, seed=5)
    numel = T * K_TOP
    sorted_ids, expert_ids, npp = moe_align(ids, E, bm)
    assert sorted_ids.numel() // bm > int(npp) // bm  # the grid's worst case has spare blocks
    a1, a1_s = per_token_group_quant_fp8(x) if fp8 else (x, None)
    inter_dt = torch.float8_e4m3fn if fp8 else DT

    def gemm1(persistent):
        c = torch.zeros(numel, INTER, device=DEV, dtype=inter_dt)
        c_s = torch.zeros(numel, INTER // 128, device=DEV) if fp8 else None
        moe._launch_gemm(
            a1, a1_s, w13, s13, c, c_s, None, sorted_ids, expert_ids, npp,
            INTER, H, INTER, numel, K_TOP, True, fp8, False, bm, 128, 2, 4, 3,
            persistent=persistent, progs_per_sm=2,
        )  # fmt: skip
        return c, c_s

    def gemm2(persistent, h, h_s):
        c = torch.zeros(numel, H, device=DEV, dtype=DT)
        moe._launch_gemm(
            h, h_s, w2, s2, c, None, weights.reshape(-1), sorted_ids, expert_ids, npp,
            H, INTER, 0, numel, 1, False, False, True, bm, 64, 2, 4, 3,
            persistent=persistent, progs_per_sm=2,
        )  # fmt: skip
        return c

    h_ref, hs_ref = gemm1(0)
    h, h_s = gemm1(loop)
    assert h.float().abs().sum() > 0
    assert rel_err(h.float(), h_ref.float()) < (1e-2 if ON_GPU else 1e-6)
    if fp8:
        torch.testing.assert_close(h_s, hs_ref, rtol=1e-2 if ON_GPU else 1e-6, atol=0)
    out_ref = gemm2(0, h_ref, hs_ref)
    out = gemm2(loop, h_ref, hs_ref)
    assert rel_err(out, out_ref) < (1e-2 if ON_GPU else 1e-6)
    # each pair's row is that pair's expert output times its routing weight: no row is missed
    assert bool((out.float().abs().sum(1) > 0).all())


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("loop", [1, 2])
def test_persistent_moe_foreign_experts_add_nothing(fp8, loop):
    """Expert parallel: ids equal to E are held by another rank. Their pairs contribute zero,
    so the result equals the reference over the local pairs only."""
    from coserve.engine.kernels.triton import fused_moe

    T = 17
    w13, w2, s13, s2 = _weights(fp8, seed=6)
    x = _x(T, seed=7)
    weights, ids = _routing(T, seed=8)
    foreign = ids == 6
    local = ids.masked_fill(foreign, E)
    blk = BLOCK if fp8 else None
    cfg = dict(BLOCK_M=16, PERSISTENT1=loop, PERSISTENT2=3 - loop)
    out = fused_moe(x, w13, w2, weights, local, s13, s2, blk, config=cfg, foreign=True)
    base = fused_moe(
        x, w13, w2, weights, local, s13, s2, blk, config=dict(BLOCK_M=16), foreign=True
    )
    ref = ref_moe.fused_moe(x, w13, w2, weights.masked_fill(foreign, 0.0), ids.long(), s13, s2, blk)
    assert rel_err(out, base) < (1e-2 if ON_GPU else 1e-6)
    assert rel_err(out, ref) < ((0.06 if ON_GPU else 0.25) if fp8 else (2e-2 if ON_GPU else 1e-5))


def test_persistent_moe_rejects_an_unknown_loop_form():
    from coserve.engine.kernels.triton import fused_moe

    w13, w2, s13, s2 = _weights(True)
    weights, ids = _routing(4)
    with pytest.raises(ValueError, match="PERSISTENT"):
        fused_moe(_x(4), w13, w2, weights, ids, s13, s2, BLOCK, config=dict(PERSISTENT2=3))
    with pytest.raises(ValueError, match="progs_per_sm"):
        fused_moe(
            _x(4),
            w13,
            w2,
            weights,
            ids,
            s13,
            s2,
            BLOCK,
            config=dict(PERSISTENT1=1, progs_per_sm1=0),
        )


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
@pytest.mark.parametrize("loop", [1, 2])
def test_persistent_moe_captures_in_a_cuda_graph(loop):
    """The grid depends on T only and the tile count is read on the device: a captured graph
    replays correctly after the routing changes."""
    from coserve.engine.kernels.triton import fused_moe

    T = 64
    w13, w2, s13, s2 = _weights(True)
    x = _x(T)
    weights, ids = _routing(T)
    cfg = dict(PERSISTENT1=loop, PERSISTENT2=loop)

    def step():
        return fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, config=cfg)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_w, new_ids = _routing(T, seed=9)
    new_ids = torch.randint(0, E, new_ids.shape, device=DEV, dtype=torch.int32)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, step()) < 1e-3
