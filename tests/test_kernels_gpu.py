"""Triton twins vs their plain-torch references, on random data.

GPU only (`-m gpu`); skipped without CUDA. With TRITON_INTERPRET=1 and Triton installed the
same tests run on the CPU through Triton's interpreter (slow; float32 data), which is how
the kernels' logic is checked on a machine without a GPU. The interpreter rounds float-to-FP8
conversions differently from the hardware, so FP8 tolerances apply on CUDA only."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from coserve.engine.kernels import activation as ref_act
from coserve.engine.kernels import attention as ref_attn
from coserve.engine.kernels import fp8 as ref_fp8
from coserve.engine.kernels import moe as ref_moe
from coserve.engine.kernels import rmsnorm as ref_norm
from coserve.engine.kernels import rotary as ref_rot

pytestmark = pytest.mark.gpu

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and _HAS_TRITON:
    DEV, DT = "cuda", torch.bfloat16
elif _INTERPRET and _HAS_TRITON:
    DEV, DT = "cpu", torch.float32
else:
    pytest.skip("needs CUDA and Triton (or TRITON_INTERPRET=1)", allow_module_level=True)

ON_GPU = DEV == "cuda"
BLOCK = (128, 128)


def tk():
    import coserve.engine.kernels.triton as t

    return t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, g, dtype=None, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype or DT)


# ------------------------------------------------------------------------------ attention
def _paged_case(B, Hq, Hkv, D, block_size, max_ctx, g, zero_rows=()):
    max_blocks = -(-max_ctx // block_size)
    num_blocks = B * max_blocks + 3
    k_cache = randn(num_blocks, block_size, Hkv, D, g=g)
    v_cache = randn(num_blocks, block_size, Hkv, D, g=g)
    perm = torch.randperm(num_blocks, generator=g, device=DEV)[: B * max_blocks]
    block_tables = perm.view(B, max_blocks).to(torch.int32)
    ctx = torch.randint(1, max_ctx + 1, (B,), generator=g, device=DEV).to(torch.int32)
    ctx[0] = max_ctx
    for r in zero_rows:
        ctx[r] = 0
    q = randn(B, Hq, D, g=g)
    return q, k_cache, v_cache, block_tables, ctx


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_decode_attention_matches_reference(block_size, num_splits):
    B = 9 if ON_GPU else 3
    Hq, Hkv, D = (32, 4, 128) if ON_GPU else (8, 2, 32)
    max_ctx = 600 if ON_GPU else 70
    q, kc, vc, bt, ctx = _paged_case(B, Hq, Hkv, D, block_size, max_ctx, gen(1))
    scale = D**-0.5
    out = tk().paged_decode_attention(q, kc, vc, bt, ctx, scale, num_splits=num_splits)
    ref = ref_attn.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < (1e-2 if DT == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_zero_length_rows_give_zeros(num_splits):
    q, kc, vc, bt, ctx = _paged_case(4, 8, 2, 64, 16, 64, gen(2), zero_rows=(2,))
    out = tk().paged_decode_attention(q, kc, vc, bt, ctx, 0.125, num_splits=num_splits)
    assert torch.isfinite(out.float()).all()
    assert out[2].abs().max().item() == 0.0
    keep = torch.tensor([0, 1, 3], device=DEV)
    ref = ref_attn.paged_decode_attention(q[keep], kc, vc, bt[keep], ctx[keep], 0.125)
    assert rel_err(out[keep], ref) < (1e-2 if DT == torch.bfloat16 else 1e-5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_paged_decode_attention_graph_replay_follows_new_lengths():
    q, kc, vc, bt, ctx = _paged_case(16, 32, 4, 128, 16, 300, gen(3))
    scale = 128**-0.5
    t = tk()
    t.paged_decode_attention(q, kc, vc, bt, ctx, scale)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = t.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    ctx.copy_(torch.randint(1, 301, ctx.shape, generator=gen(4), device=DEV).to(torch.int32))
    q.copy_(randn(*q.shape, g=gen(5)))
    graph.replay()
    ref = ref_attn.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "lens, heads, kv_heads, d",
    [
        ([32] * 12, 8, 2, 128),  # qwen3-embedding's shape: 32-token inputs, GQA
        ([1, 5, 17, 64, 65, 130], 4, 1, 64),  # tile edges, one-token sequences
        ([7, 40, 3], 12, 12, 32),  # MiniLM: no grouping, head_dim 32
        ([9, 20], 6, 2, 80),  # a head_dim and a group (3) that are not powers of two
        ([3, 70], 16, 1, 64),  # a group of 16: tiles of 16 queries
    ],
)
def test_varlen_attention_matches_reference(lens, heads, kv_heads, d, causal):
    g = gen(3)
    t = sum(lens)
    q, k, v = randn(t, heads, d, g=g), randn(t, kv_heads, d, g=g), randn(t, kv_heads, d, g=g)
    out = tk().varlen_attention(q, k, v, lens, d**-0.5, causal)
    ref = ref_attn.varlen_attention(q.float(), k.float(), v.float(), lens, d**-0.5, causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < (2e-2 if ON_GPU else 1e-5)


def test_varlen_attention_reads_strided_views_of_one_qkv_tensor():
    """The model hands q/k/v as column slices of one qkv projection (row stride H + 2 KVH)."""
    g = gen(4)
    lens, heads, kv_heads, d = [3, 33], 4, 2, 64
    qkv = randn(sum(lens), heads + 2 * kv_heads, d, g=g)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    out = tk().varlen_attention(q, k, v, lens, 0.125, True)
    ref = ref_attn.varlen_attention(q.float(), k.float(), v.float(), lens, 0.125, True)
    assert rel_err(out, ref) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion")
def test_varlen_attention_never_waits_for_the_gpu():
    """The reference's boolean indexing synchronises with the device in every layer; the twin
    must not, so the host can queue the next layers while this one runs."""
    g = gen(5)
    lens = [32, 20, 32]
    q, k, v = randn(84, 8, 128, g=g), randn(84, 2, 128, g=g), randn(84, 2, 128, g=g)
    tk().varlen_attention(q, k, v, lens, 0.1, True)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tk().varlen_attention(q, k, v, lens, 0.1, True)
        with pytest.raises(RuntimeError):
            ref_attn.varlen_attention(q, k, v, lens, 0.1, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_varlen_attention_refuses_lengths_that_do_not_add_up():
    q = torch.zeros(5, 2, 16, device=DEV, dtype=DT)
    with pytest.raises(ValueError, match="add up to 4"):
        tk().varlen_attention(q, q, q, [2, 2], 0.25, True)


# ------------------------------------------------------------------------------ FP8 linear
def _fp8_weight(N, K, g):
    w = torch.randn(N, K, generator=g, device=DEV) * 0.02
    return ref_fp8.block_quant(w, BLOCK)


def _w8a8_emulation(x, q, s):
    """What an exact w8a8 kernel computes: x quantised per 1x128 group (torch), both
    dequantised, product in float32."""
    M, K = x.shape
    xg = x.float().view(M, K // 128, 128)
    xs = xg.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    xq = (xg / xs).clamp(-448, 448).to(torch.float8_e4m3fn).float() * xs
    return xq.view(M, K) @ ref_fp8.block_dequant(q, s, BLOCK).t()


def test_per_token_group_quant_fp8_round_trips():
    g = gen(6)
    x = randn(37, 512, g=g)
    xq, xs = tk().per_token_group_quant_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (37, 4)
    back = (xq.float().view(37, 4, 128) * xs[..., None]).view(37, 512)
    assert rel_err(back, x) < (0.04 if ON_GPU else 0.08)
    amax = x.float().view(37, 4, 128).abs().amax(-1)
    torch.testing.assert_close(xs, amax / 448.0, rtol=1e-6, atol=1e-12)
    xq_c, xs_c = tk().per_token_group_quant_fp8(x, column_major_scales=True)
    assert xs_c.stride() == (1, 37)
    torch.testing.assert_close(xs_c, xs)
    assert torch.equal(xq_c.view(torch.uint8), xq.view(torch.uint8))


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (77, 640, 384), (512, 5120, 2048)])
def test_fp8_block_linear_matches_reference(backend, M, N, K, monkeypatch):
    from coserve.engine.kernels.triton import fp8 as tfp8

    if backend == "cublas" and not ON_GPU:
        pytest.skip("cuBLAS needs CUDA")
    if backend == "cublas" and M == 1:
        pytest.skip("covered by the triton backend")
    monkeypatch.setattr(tfp8, "_BACKEND", backend)
    g = gen(7)
    q, s = _fp8_weight(N, K, g)
    x = randn(M, K, g=g)
    try:
        y = tk().fp8_block_linear(x, q, s, BLOCK)
    except (RuntimeError, NotImplementedError) as e:  # cuBLAS without blockwise support
        if backend == "cublas":
            pytest.skip(f"cuBLAS blockwise scaled_mm unavailable: {e}")
        raise
    ref = ref_fp8.fp8_block_linear(x, q, s, BLOCK)
    assert y.shape == (M, N) and y.dtype == x.dtype
    if ON_GPU:
        assert rel_err(y, ref) < 0.05  # activation quantisation (FP8 e4m3) error
        assert rel_err(y, _w8a8_emulation(x, q, s)) < 1e-2
    else:
        assert rel_err(y, ref) < 0.12


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("column_major", [True, False])
def test_fp8_block_linear_takes_x_quantised_already(backend, column_major, monkeypatch):
    """Given x's FP8 values and scales (either scale layout), the GEMM's result is the one it
    computes quantising x itself."""
    from coserve.engine.kernels.fp8 import Fp8Activation
    from coserve.engine.kernels.triton import fp8 as tfp8

    if backend == "cublas" and not ON_GPU:
        pytest.skip("cuBLAS needs CUDA")
    monkeypatch.setattr(tfp8, "_BACKEND", backend)
    g = gen(23)
    q, s = _fp8_weight(384, 256, g)
    x = randn(40, 256, g=g)
    xq, xs = tk().per_token_group_quant_fp8(x, column_major_scales=column_major)
    try:
        want = tk().fp8_block_linear(x, q, s, BLOCK)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"cuBLAS blockwise scaled_mm unavailable: {e}")
    got = tk().fp8_block_linear(x, q, s, BLOCK, None, Fp8Activation(xq, xs))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="x_fp8 holds"):
        tk().fp8_block_linear(x[:3], q, s, BLOCK, None, Fp8Activation(xq, xs))


def test_fp8_block_linear_with_bias_and_leading_dims():
    g = gen(8)
    q, s = _fp8_weight(256, 256, g)
    x = randn(2, 5, 256, g=g)
    b = randn(256, g=g)
    y = tk().fp8_block_linear(x, q, s, BLOCK, b)
    ref = ref_fp8.fp8_block_linear(x, q, s, BLOCK, b)
    assert y.shape == (2, 5, 256)
    assert rel_err(y, ref) < (0.05 if ON_GPU else 0.12)


# ------------------------------------------------------------------------------ MoE
def test_topk_softmax_matches_reference():
    g = gen(9)
    logits = randn(70, 128, g=g)
    for renorm in (True, False):
        w, ids = tk().topk_softmax(logits, 8, renorm)
        rw, rids = ref_moe.topk_softmax(logits, 8, renorm)
        assert torch.equal(ids.long().sort(-1).values, rids.sort(-1).values)
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("column_major", [True, False])
def test_fused_moe_takes_x_quantised_already(column_major):
    """x's FP8 values and scales handed in (column-major as `rms_norm_quant` writes them, or
    row-major) give the result fused_moe computes quantising x itself."""
    from coserve.engine.kernels.fp8 import Fp8Activation

    g = gen(22)
    E, H, inter, k, T = (128, 2048, 768, 8, 300) if ON_GPU else (8, 256, 128, 2, 21)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    x_fp8 = Fp8Activation(*tk().per_token_group_quant_fp8(x, column_major_scales=column_major))
    base = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK)
    got = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, x_fp8=x_fp8)
    assert torch.equal(got, base)
    with pytest.raises(ValueError, match="x_fp8 holds"):
        tk().fused_moe(x[:5], w13, w2, weights[:5], ids[:5], s13, s2, BLOCK, x_fp8=x_fp8)


@pytest.mark.parametrize("block_m", [4, 16, 64])
@pytest.mark.parametrize("T", [33, 300])
def test_moe_align_groups_pairs_by_expert(block_m, T):
    """T=300: 900 pairs over several programs of each kernel."""
    from coserve.engine.kernels.triton.moe_routing import moe_align

    g = gen(10)
    E, k = 16, 3
    ids = torch.randint(0, E, (T, k), generator=g, device=DEV).to(torch.int32)
    ids[:, 0] = 5  # one crowded expert
    sorted_ids, expert_ids, npp = moe_align(ids, E, block_m)
    assert (sorted_ids[int(npp) :] == T * k).all()  # the sentinel past the padded runs
    numel = T * k
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(npp) == int(padded.sum())
    valid = sorted_ids[sorted_ids < numel]
    assert sorted(valid.tolist()) == list(range(numel))
    flat = ids.flatten()
    for b in range(int(npp) // block_m):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < numel].long()
        assert rows.numel() > 0
        assert (flat[rows] == expert_ids[b]).all()


@pytest.mark.parametrize("T, k, H", [(1, 8, 2048), (37, 8, 2048), (5, 2, 300)])
def test_moe_sum_is_the_torch_sum_over_k(T, k, H):
    """The combine: token t's k rows (t*k .. t*k+k-1) summed; H not a power of two masks."""
    pairs = randn(T * k, H, g=gen(21))
    out = tk().moe_sum(pairs, k)
    assert out.dtype == pairs.dtype and out.shape == (T, H)
    ref = pairs.float().view(T, k, H).sum(dim=1).to(pairs.dtype)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def _moe_weights(E, H, inter, g, fp8):
    w13 = torch.randn(E, 2 * inter, H, generator=g, device=DEV) * 0.03
    w2 = torch.randn(E, H, inter, generator=g, device=DEV) * 0.03
    if not fp8:
        return w13.to(DT), w2.to(DT), None, None
    q13, s13 = ref_fp8.block_quant(w13, BLOCK)
    q2, s2 = ref_fp8.block_quant(w2, BLOCK)
    return q13, q2, s13, s2


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("T", [1, 13, 300])
def test_fused_moe_matches_reference(fp8, T):
    g = gen(11)
    E, H, inter, k = (128, 2048, 768, 8) if ON_GPU else (8, 256, 128, 2)
    if not ON_GPU and T == 300:
        T = 40
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, fp8)
    x = randn(T, H, g=g)
    logits = randn(T, E, g=g)
    weights, ids = tk().topk_softmax(logits, k, True)
    blk = BLOCK if fp8 else None
    out = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, blk)
    ref = ref_moe.fused_moe(x, w13, w2, weights, ids.long(), s13, s2, blk)
    assert out.shape == (T, H) and out.dtype == x.dtype
    if fp8:
        assert rel_err(out, ref) < (0.06 if ON_GPU else 0.25)
    else:
        assert rel_err(out, ref) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fused_moe_tile_configs_agree(block_m):
    g = gen(12)
    E, H, inter, k, T = (32, 512, 256, 4, 100) if ON_GPU else (8, 256, 128, 2, 9)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    base = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK)
    cfg = dict(BLOCK_M=block_m, BLOCK_N2=64, GROUP_M=1)
    other = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, config=cfg)
    assert rel_err(other, base) < 1e-2


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("foreign", [False, True])
def test_fused_moe_tma_weights_equal_pointer_loads(fp8, foreign):
    """Expert weights read by TMA tiles in either GEMM give the pointer loads' result, with
    expert parallelism's foreign pairs too."""
    g = gen(19)
    E, H, inter, k, T = (32, 512, 256, 4, 100) if ON_GPU else (8, 256, 128, 2, 9)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, fp8)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    if foreign:
        ids = ids.masked_fill(ids >= E // 2, E)
    args = (x, w13, w2, weights, ids, s13, s2, BLOCK if fp8 else None)
    base = tk().fused_moe(*args, config=dict(B_TMA1=False, B_TMA2=False), foreign=foreign)
    for tma in (dict(B_TMA1=True, B_TMA2=False), dict(B_TMA1=False, B_TMA2=True)):
        assert rel_err(tk().fused_moe(*args, config=tma, foreign=foreign), base) < 1e-5, tma
    assert base.abs().sum() > 0


@pytest.mark.parametrize("tiled", ["w13", "w2", "both"])
@pytest.mark.parametrize("foreign", [False, True])
def test_fused_moe_tiled_weights_equal_row_major(tiled, foreign):
    """Expert weights stored tile by tile (read by TMA, one run per tile) give the row-major
    weights' result, with expert parallelism's foreign pairs too."""
    from coserve.engine.kernels.expert_layout import tile_experts

    g = gen(23)
    E, H, inter, k, T = (32, 512, 256, 4, 100) if ON_GPU else (8, 256, 128, 2, 9)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    if foreign:
        ids = ids.masked_fill(ids >= E // 2, E)
    base = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, foreign=foreign)
    t13 = tile_experts(w13) if tiled in ("w13", "both") else w13
    t2 = tile_experts(w2) if tiled in ("w2", "both") else w2
    out = tk().fused_moe(x, t13, t2, weights, ids, s13, s2, BLOCK, foreign=foreign)
    assert rel_err(out, base) < 1e-5
    assert base.abs().sum() > 0


@pytest.mark.parametrize("foreign", [False, True])
@pytest.mark.parametrize("T", [5, 40])
def test_fused_moe_sorted_intermediate_equals_pair_order(foreign, T):
    """GEMM1 writing its rows in sorted order and GEMM2 reading them by TMA (SORTED_INTER)
    gives the pair-order result bit for bit, padding rows (never written) included."""
    g = gen(25)
    E, H, inter, k = (16, 512, 256, 4) if ON_GPU else (8, 256, 128, 2)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    if foreign:
        ids = torch.where(ids % 3 == 0, E, ids).to(torch.int32)
    pair_order, sorted_order = dict(SORTED_INTER=False), dict(SORTED_INTER=True)
    base = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, pair_order, foreign)
    got = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, sorted_order, foreign)
    assert torch.equal(got, base)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("T", [5, 300])
def test_fused_moe_scalar_weight_scales_equal_per_column_ones(T, tiled):
    """Each K step's weight scale loaded once per tile (SCALAR_B_SCALE) gives the per-column
    loads' result bit for bit, for both GEMMs, small and large tiles (T=300: BLOCK_M 64)."""
    from coserve.engine.kernels.expert_layout import tile_experts

    g = gen(27)
    E, H, inter, k = (16, 512, 256, 4) if ON_GPU else (4, 256, 256, 2)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    if tiled:
        w13 = tile_experts(w13)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    # the unswapped GEMMs at every T (swapped ones always load one scale per K step)
    unswapped = dict(SWAP_AB1=False, SWAP_AB2=False)
    per_column = dict(unswapped, SCALAR_B_SCALE=False)
    scalar = dict(unswapped, SCALAR_B_SCALE=True)
    base = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, per_column)
    got = tk().fused_moe(x, w13, w2, weights, ids, s13, s2, BLOCK, scalar)
    assert torch.equal(got, base)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("foreign", [False, True])
@pytest.mark.parametrize("T, block_m", [(5, 16), (40, 32), (300, 64)])
def test_fused_moe_swapped_operands_match_the_unswapped_gemms(T, block_m, foreign, tiled):
    """GEMM1 and GEMM2 with their operands swapped (SWAP_AB1/2: the weights on the tensor
    core's M side) give the unswapped GEMMs' result up to float rounding order, each alone and
    both, with expert parallelism's foreign pairs, in pair and sorted intermediate order."""
    from coserve.engine.kernels.expert_layout import tile_experts

    g = gen(29)
    E, H, inter, k = (16, 512, 256, 4) if ON_GPU else (4, 256, 256, 2)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    if tiled:
        w13 = tile_experts(w13)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    if foreign:
        ids = torch.where(ids % 3 == 0, E, ids).to(torch.int32)
    args = (x, w13, w2, weights, ids, s13, s2, BLOCK)
    for sorted_inter in (False, True):
        tiles = dict(BLOCK_M=block_m, SORTED_INTER=sorted_inter, SWAP_AB1=False, SWAP_AB2=False)
        base = tk().fused_moe(*args, config=tiles, foreign=foreign)
        assert base.abs().sum() > 0
        for swap in (dict(SWAP_AB1=True), dict(SWAP_AB2=True), dict(SWAP_AB1=True, SWAP_AB2=True)):
            got = tk().fused_moe(*args, config=dict(tiles, **swap), foreign=foreign)
            assert rel_err(got, base) < 1e-2, (swap, sorted_inter)


@pytest.mark.parametrize("fp8, cfg", [(False, {}), (True, dict(BLOCK_N1=64, BLOCK_N2=64))])
def test_fused_moe_asked_to_swap_where_it_cannot_runs_unswapped(fp8, cfg):
    """SWAP_AB asked of bf16 experts or of 64-wide weight tiles (the swapped GEMM needs FP8
    and one 128-row scale block a tile): the unswapped GEMMs run, with their own weight reads,
    and give their result exactly."""
    g = gen(31)
    E, H, inter, k, T = (16, 512, 256, 4, 200) if ON_GPU else (4, 256, 256, 2, 40)
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, fp8)
    x = randn(T, H, g=g)
    weights, ids = tk().topk_softmax(randn(T, E, g=g), k, True)
    args = (x, w13, w2, weights, ids, s13, s2, BLOCK if fp8 else None)
    tiles = dict(cfg, BLOCK_M=32, B_TMA1=False, B_TMA2=False)
    base = tk().fused_moe(*args, config=dict(tiles, SWAP_AB1=False, SWAP_AB2=False))
    got = tk().fused_moe(*args, config=dict(tiles, SWAP_AB1=True, SWAP_AB2=True))
    assert torch.equal(got, base) and base.abs().sum() > 0


def test_fused_moe_refuses_a_stored_tile_unlike_its_own():
    from coserve.engine.kernels.expert_layout import tile_experts

    g = gen(24)
    w13, w2, s13, s2 = _moe_weights(4, 256, 128, g, True)
    x = randn(5, 256, g=g)
    weights, ids = tk().topk_softmax(randn(5, 4, g=g), 2, True)
    with pytest.raises(ValueError, match="128x128 tiles .* 64x128"):
        tk().fused_moe(
            x, tile_experts(w13), w2, weights, ids, s13, s2, BLOCK, config=dict(BLOCK_N1=64)
        )


def test_tma_weights_only_where_tiles_fit():
    """TMA tiles need one contiguous 2-D view and tiles inside one expert's gate or up rows."""
    from coserve.engine.kernels.triton.moe_gemm import tma_fits

    w = torch.empty(4, 256, 512, device=DEV, dtype=DT)
    assert tma_fits(w, 128, 512, 128, 128, 64)
    assert not tma_fits(w.transpose(1, 2), 128, 256, 128, 128, 64)  # not contiguous
    assert not tma_fits(w, 96, 512, 96, 32 * 4, 64)  # gate/up boundary inside a tile
    assert not tma_fits(w[:, :, :500], 128, 500, 128, 128, 64)  # rows not 16-byte multiples


def _rank_moe(inter, fp8, shard):
    from coserve.engine.config import QuantConfig
    from coserve.engine.moe_weights import FusedMoEWeights

    m = FusedMoEWeights(
        8, 256, inter, quant=QuantConfig() if fp8 else None, dtype=DT, device=DEV, **shard
    )
    m.init_random(gen(16), 0.03)  # every rank draws the same full tensors
    return m


@pytest.mark.parametrize("fp8, inter", [(True, 256), (False, 128)])
@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("T", [24, 200])
def test_fused_moe_of_two_ranks_sums_to_one_rank(fp8, inter, expert_parallel, T):
    """What Qwen3MoE's ranks compute before the all-reduce: each rank's window (half of
    every expert's intermediate dimension: FP8 kept, the FP8 groups those of one rank; or
    whole experts, the other rank's ids mapped to E) sums to the one-rank result. T=200 takes
    the swapped GEMMs (FP8)."""
    g = gen(17)
    x = randn(T, 256, g=g)
    weights, ids = tk().topk_softmax(randn(T, 8, g=g), 2, True)
    blk = BLOCK if fp8 else None
    whole = _rank_moe(inter, fp8, {})
    assert (whole.quant is not None) == fp8
    full = tk().fused_moe(
        x, whole.w13, whole.w2, weights, ids, whole.w13_scale, whole.w2_scale, blk
    )
    total = torch.zeros(full.shape, dtype=torch.float32, device=DEV)
    for rank in range(2):
        if expert_parallel:
            m = _rank_moe(inter, fp8, dict(expert_shard=(4 * rank, 4)))
            local = ids - 4 * rank
            local = local.masked_fill((local < 0) | (local >= 4), 4)
            kw = dict(foreign=True)
        else:
            m = _rank_moe(inter, fp8, dict(inter_shard=(rank * inter // 2, inter // 2)))
            local, kw = ids, {}
        assert (m.quant is not None) == fp8
        total += (
            tk()
            .fused_moe(x, m.w13, m.w2, weights, local, m.w13_scale, m.w2_scale, blk, **kw)
            .float()
        )
    assert rel_err(total, full) < (1e-2 if ON_GPU else 1e-5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_moe_and_fp8_linear_capture_in_a_cuda_graph():
    g = gen(13)
    E, H, inter, k, T = 64, 1024, 512, 8, 64
    w13, w2, s13, s2 = _moe_weights(E, H, inter, g, True)
    q, s = _fp8_weight(E, H, g)  # a router-sized FP8 linear, to exercise both
    x = randn(T, H, g=g)
    t = tk()

    def step():
        logits = t.fp8_block_linear(x, q, s, BLOCK)
        w, ids = t.topk_softmax(logits, k, True)
        return t.fused_moe(x, w13, w2, w, ids, s13, s2, BLOCK)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(randn(T, H, g=gen(14)))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, step()) < 1e-3


# ------------------------------------------------------------------------------ small ones
def test_rms_norm_matches_reference_on_strided_views():
    g = gen(15)
    w = randn(128, g=g, scale=0.5) + 1
    qkv = randn(19, 32 * 128 + 2 * 4 * 128, g=g)
    qv = qkv[:, : 32 * 128].view(19, 32, 128)  # a strided 3-D view, as q after the split
    torch.testing.assert_close(
        tk().rms_norm(qv, w, 1e-6), ref_norm.rms_norm(qv, w, 1e-6), rtol=2e-2, atol=2e-2
    )
    x = randn(33, 2048, g=g)
    w2 = randn(2048, g=g)
    torch.testing.assert_close(
        tk().rms_norm(x, w2, 1e-6), ref_norm.rms_norm(x, w2, 1e-6), rtol=2e-2, atol=2e-2
    )


def test_fused_add_rms_norm():
    g = gen(16)
    x, r, w = randn(21, 1024, g=g), randn(21, 1024, g=g), randn(1024, g=g)
    y, new_r = tk().fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_r, x + r)
    torch.testing.assert_close(y, ref_norm.rms_norm(x + r, w, 1e-6), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_quant_is_the_norm_then_the_quantisation(with_residual, column_major):
    """One launch gives the fused norm's y and r and, bit for bit, what
    per_token_group_quant_fp8 makes of y, scales in the layout asked for; no FP8 where
    D % 128 != 0."""
    g = gen(24)
    x, res, w = randn(37, 384, g=g), randn(37, 384, g=g), randn(384, g=g)
    residual = res if with_residual else None
    y, r, y_fp8 = tk().rms_norm_quant(x, residual, w, 1e-6, column_major)
    if with_residual:
        want_y, want_r = tk().fused_add_rms_norm(x, res, w, 1e-6)
    else:
        want_y, want_r = tk().rms_norm(x, w, 1e-6), x
    assert torch.equal(y, want_y) and torch.equal(r, want_r)
    torch.testing.assert_close(y, ref_norm.rms_norm(want_r, w, 1e-6), rtol=2e-2, atol=2e-2)
    xq, xs = tk().per_token_group_quant_fp8(want_y, column_major_scales=column_major)
    assert y_fp8.scales.stride() == xs.stride()
    assert torch.equal(y_fp8.values.view(torch.uint8), xq.view(torch.uint8))
    assert torch.equal(y_fp8.scales, xs)
    _, _, none = tk().rms_norm_quant(x[:, :96], None, w[:96], 1e-6)
    assert none is None


def test_apply_rotary_matches_reference():
    g = gen(17)
    cs = ref_rot.rope_cos_sin_cache(128, 4096, 1e6, DEV)
    pos = torch.randint(0, 4096, (25,), generator=g, device=DEV)
    qkv = randn(25, 40 * 128, g=g)
    k = qkv[:, 32 * 128 : 36 * 128].view(25, 4, 128)  # strided
    torch.testing.assert_close(
        tk().apply_rotary(k, pos, cs), ref_rot.apply_rotary(k, pos, cs), rtol=1e-2, atol=1e-2
    )


def test_silu_and_mul_matches_reference():
    g = gen(18)
    x = randn(3, 7, 2 * 1536, g=g)
    torch.testing.assert_close(tk().silu_and_mul(x), ref_act.silu_and_mul(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("with_cache", [True, False])
def test_qk_norm_rope_matches_the_unfused_references(with_cache):
    g = gen(19)
    T, Hq, Hkv, D, bs = 23, 32, 4, 128, 16
    qkv = randn(T, (Hq + 2 * Hkv) * D, g=g)
    qw, kw = randn(D, g=g, scale=0.3) + 1, randn(D, g=g, scale=0.3) + 1
    cs = ref_rot.rope_cos_sin_cache(D, 4096, 1e6, DEV)
    pos = torch.randint(0, 4096, (T,), generator=g, device=DEV)
    q_ref = ref_rot.apply_rotary(
        ref_norm.rms_norm(qkv[:, : Hq * D].view(T, Hq, D), qw, 1e-6), pos, cs
    )
    k_ref = ref_rot.apply_rotary(
        ref_norm.rms_norm(qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D), kw, 1e-6), pos, cs
    )
    v_ref = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    caches = slots = None
    if with_cache:
        caches = [torch.zeros(8, bs, Hkv, D, device=DEV, dtype=DT) for _ in range(2)]
        slots = torch.randperm(8 * bs, generator=g, device=DEV)[:T]
        slots[3] = -1  # a padding row: nothing stored
    q, k, v = tk().qk_norm_rope(
        qkv, Hq, Hkv, D, qw, kw, 1e-6, pos, cs, *(caches or (None, None)), slots
    )
    tol = dict(rtol=2e-2, atol=2e-2) if DT == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, v_ref)
    if with_cache:
        kc, vc = (c.view(-1, Hkv, D) for c in caches)
        keep = slots >= 0
        torch.testing.assert_close(kc[slots[keep]], k_ref[keep], **tol)
        assert torch.equal(vc[slots[keep]], v_ref[keep])
        assert int((kc.abs().sum((1, 2)) > 0).sum()) == int(keep.sum())
