"""Reference kernels: paged attention against dense attention, FP8 block quantisation,
sampling, MoE routing."""

from __future__ import annotations

import pytest
import torch

from coserve.engine.kernels import attention as A
from coserve.engine.kernels.fp8 import block_dequant, block_quant, fp8_block_linear
from coserve.engine.kernels.moe import fused_moe, topk_softmax
from coserve.engine.kernels.sampling import sample, top_p_filter

G = torch.Generator().manual_seed(0)
H, KVH, D, BS = 8, 2, 16, 4


def _paged_setup(lens: list[int], num_blocks: int = 64):
    """Random k/v per sequence written into shuffled cache blocks."""
    k_cache = torch.zeros(num_blocks + 1, BS, KVH, D)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=G).tolist()
    tables, ks, vs = [], [], []
    for n in lens:
        nb = -(-n // BS)
        table = [free.pop() for _ in range(nb)]
        k, v = torch.randn(n, KVH, D, generator=G), torch.randn(n, KVH, D, generator=G)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        A.store_kvcache(k, v, k_cache, v_cache, slots)
        tables.append(table)
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables) + 2
    bt = torch.tensor([t + [num_blocks] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, bt, ks, vs


def test_paged_prefill_with_cached_prefix_matches_dense():
    # last `chunk` tokens are this step's queries; chunk == len: nothing cached before
    lens, chunks = [13, 5, 30, 6, 7, 2], [4, 5, 11, 6, 7, 2]
    k_cache, v_cache, bt, ks, vs = _paged_setup(lens)
    qs = [torch.randn(n, H, D, generator=G) for n in lens]
    q = torch.cat([qq[-c:] for qq, c in zip(qs, chunks, strict=True)])
    k = torch.cat([kk[-c:] for kk, c in zip(ks, chunks, strict=True)])
    v = torch.cat([vv[-c:] for vv, c in zip(vs, chunks, strict=True)])
    out = A.paged_prefill_attention(q, k, v, k_cache, v_cache, bt, chunks, lens, D**-0.5)
    dense = A.varlen_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), lens, D**-0.5, True)
    ends = torch.tensor(lens).cumsum(0).tolist()
    ref = torch.cat([dense[e - c : e] for e, c in zip(ends, chunks, strict=True)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_decode_matches_dense_and_ignores_padding():
    lens = [1, 7, 16, 33]
    k_cache, v_cache, bt, ks, vs = _paged_setup(lens)
    qs = [torch.randn(n, H, D, generator=G) for n in lens]
    q = torch.stack([qq[-1] for qq in qs])
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = A.paged_decode_attention(q, k_cache, v_cache, bt, ctx, D**-0.5)
    dense = A.varlen_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), lens, D**-0.5, True)
    ends = torch.tensor(lens).cumsum(0) - 1
    torch.testing.assert_close(out, dense[ends], atol=1e-5, rtol=1e-5)
    # a padded row (null block, context 1) changes nothing for the real rows
    null = torch.full((1, bt.shape[1]), k_cache.shape[0] - 1, dtype=torch.int32)
    out2 = A.paged_decode_attention(
        torch.cat([q, torch.randn(1, H, D)]),
        k_cache,
        v_cache,
        torch.cat([bt, null]),
        torch.cat([ctx, torch.ones(1, dtype=torch.int32)]),
        D**-0.5,
    )
    torch.testing.assert_close(out2[:4], out)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_batched_groups_equal_one_by_one(causal):
    lens = [5, 1, 7, 6, 30, 8, 2]
    assert sorted(i for g in A._length_groups(lens) for i in g) == list(range(7))
    assert any(len(g) > 1 for g in A._length_groups(lens))
    T = sum(lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    out = A.varlen_attention(q, k, v, lens, 0.25, causal)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        torch.testing.assert_close(
            out[sl], A._sdpa(q[sl], k[sl], v[sl], 0.25, 0 if causal else None), atol=1e-5, rtol=1e-5
        )
        start += n


def test_varlen_attention_equals_sdpa_per_sequence():
    q, k, v = torch.randn(9, H, D), torch.randn(9, KVH, D), torch.randn(9, KVH, D)
    out = A.varlen_attention(q, k, v, [4, 5], 0.3, causal=False)
    for sl in (slice(0, 4), slice(4, 9)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1),
            k[sl].repeat_interleave(4, 1).transpose(0, 1),
            v[sl].repeat_interleave(4, 1).transpose(0, 1),
            scale=0.3,
        ).transpose(0, 1)
        torch.testing.assert_close(out[sl], ref)


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 128, 256)])
def test_fp8_block_quant_round_trip(shape):
    w = torch.randn(*shape, generator=G) * 0.05
    q, s = block_quant(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape[-2:] == (-(-shape[-2] // 128), -(-shape[-1] // 128))
    deq = block_dequant(q, s, (128, 128))
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4
    assert ((deq - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-9).all()
    # re-quantising dequantised values is exact (the block grid is a fixed point)
    q2, s2 = block_quant(deq, (128, 128))
    torch.testing.assert_close(s2, s)
    assert torch.equal(block_dequant(q2, s2, (128, 128)), deq)


def test_fp8_block_linear_is_matmul_with_dequantised_weight():
    w, x = torch.randn(192, 256, generator=G), torch.randn(5, 256, generator=G)
    q, s = block_quant(w, (128, 128))
    b = torch.randn(192, generator=G)
    torch.testing.assert_close(
        fp8_block_linear(x, q, s, (128, 128), b), x @ block_dequant(q, s, (128, 128)).t() + b
    )


def test_moe_reference_matches_dense_loop():
    T, Hd, Im, E, K = 7, 32, 16, 6, 2
    x = torch.randn(T, Hd, generator=G)
    w13, w2 = torch.randn(E, 2 * Im, Hd, generator=G), torch.randn(E, Hd, Im, generator=G)
    weights, ids = topk_softmax(torch.randn(T, E, generator=G), K, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T))
    out = fused_moe(x, w13, w2, weights, ids)
    for t in range(T):
        ref = sum(
            weights[t, j]
            * (w2[e] @ (torch.nn.functional.silu(w13[e, :Im] @ x[t]) * (w13[e, Im:] @ x[t])))
            for j, e in enumerate(ids[t].tolist())
        )
        torch.testing.assert_close(out[t], ref, atol=1e-4, rtol=1e-4)


def test_tiled_expert_weights_hold_the_same_matrices():
    from coserve.engine.kernels import expert_layout as L

    w = torch.randn(3, 256, 384, generator=G)
    t = L.tile_experts(w)
    assert t.shape == (3, 2, 3, 128, 128) and t.is_contiguous() and L.is_tiled(t)
    assert L.expert_shape(t) == L.expert_shape(w) == (3, 256, 384)
    # tile (n, k) of expert e is one contiguous run
    torch.testing.assert_close(t[2, 1, 2].reshape(-1), w[2, 128:, 256:].reshape(-1))
    torch.testing.assert_close(L.untile_experts(t), w)
    for e in range(3):
        torch.testing.assert_close(L.expert_matrix(t, e), w[e])
    with pytest.raises(ValueError, match=r"\[3, 200, 384\] do not divide into 128x128"):
        L.tile_experts(torch.zeros(3, 200, 384))


def test_moe_reference_takes_tiled_weights():
    from coserve.engine.kernels.expert_layout import tile_experts

    T, Hd, Im, E = 5, 256, 128, 4
    x = torch.randn(T, Hd, generator=G)
    w13, w2 = torch.randn(E, 2 * Im, Hd, generator=G), torch.randn(E, Hd, Im, generator=G)
    weights, ids = topk_softmax(torch.randn(T, E, generator=G), 2, renormalize=True)
    want = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(
        fused_moe(x, tile_experts(w13), tile_experts(w2), weights, ids), want
    )


def test_moe_weights_tile_after_loading_and_refuse_loads_then():
    """FP8 experts store the tiles expert_layout names; 16-bit ones and misfit windows stay
    row-major; dequantising tiled weights gives the row-major dequantisation."""
    from coserve.engine import moe_weights
    from coserve.engine.config import QuantConfig
    from coserve.engine.kernels import expert_layout as L

    def build(quant, **shard):
        m = moe_weights.FusedMoEWeights(
            4, 256, 256, quant=quant, dtype=torch.float32, device="cpu", **shard
        )
        m.init_random(torch.Generator().manual_seed(5), 0.03)
        return m

    m = build(QuantConfig())
    w13 = m.w13.detach().clone()
    m.tile_()
    assert L.is_tiled(m.w13) == L.TILED_W13 and L.is_tiled(m.w2) == L.TILED_W2
    torch.testing.assert_close(L.untile_experts(m.w13.data).float(), w13.float())
    with pytest.raises(RuntimeError, match="load them before tile_"):
        m.load_expert(0, "gate", torch.zeros(256, 256))
    want = build(QuantConfig())
    want.dequantize_()
    m.dequantize_()
    assert not L.is_tiled(m.w13) and not L.is_tiled(m.w2)
    torch.testing.assert_close(m.w13, want.w13)
    torch.testing.assert_close(m.w2, want.w2)

    plain = build(None)
    plain.tile_()
    assert not L.is_tiled(plain.w13)
    half = build(QuantConfig(), inter_shard=(0, 128))  # 2 x 128 gate|up rows: tiles fit
    half.tile_()
    assert L.is_tiled(half.w13) == L.TILED_W13


def test_sampling_greedy_seeded_and_top_p():
    logits = torch.randn(4, 50, generator=G)
    zeros = torch.zeros(4)
    assert torch.equal(sample(logits, zeros, torch.ones(4), [None] * 4), logits.argmax(-1))
    gens = lambda: [torch.Generator().manual_seed(7) for _ in range(4)]  # noqa: E731
    a = sample(logits, torch.ones(4), torch.ones(4), gens())
    b = sample(logits, torch.ones(4), torch.ones(4), gens())
    assert torch.equal(a, b)
    # a seeded row does not depend on its neighbours
    c = sample(torch.cat([torch.randn(1, 50), logits[1:]]), torch.ones(4), torch.ones(4), gens())
    assert torch.equal(a[1:], c[1:])
    # top_p small enough keeps only the most likely token
    probs = torch.softmax(logits, -1)
    kept = top_p_filter(probs, torch.full((4,), 1e-3))
    assert torch.equal(kept.argmax(-1), probs.argmax(-1)) and ((kept > 0).sum(-1) == 1).all()
    draws = torch.stack(
        [
            sample(
                logits,
                torch.ones(4),
                torch.full((4,), 1e-3),
                [None] * 4,
                torch.Generator().manual_seed(i),
            )
            for i in range(5)
        ]
    )
    assert (draws == logits.argmax(-1)).all()
    # the empirical distribution follows softmax(logits / T)
    one = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(3)
    ids = torch.cat(
        [sample(one.repeat(2000, 1), torch.ones(2000), torch.ones(2000), [None] * 2000, g)]
    )
    freq = torch.bincount(ids, minlength=3).float() / 2000
    assert (freq - torch.softmax(one[0], -1)).abs().max() < 0.04
