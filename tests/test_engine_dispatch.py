"""The kernel dispatch point and the static-shape step on CPU: references everywhere off the
GPU, the fused references equal their parts, prompts that join a decode batch take the
static path (one row per token) and change no output."""

from __future__ import annotations

import random

import torch

from coserve.engine.gen_engine import GenEngine
from coserve.engine.kernels import attention, fused, ops, rmsnorm, rotary
from coserve.engine.kv_cache import BlockManager
from coserve.engine.scheduler import Scheduler
from coserve.engine.sequence import Sequence
from coserve.engine.types import EngineArgs, SamplingParams


def test_cpu_tensors_take_the_references():
    assert not ops.graph_safe(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), rmsnorm.rms_norm(x, w, 1e-6))
    r = torch.randn(5, 64, generator=g)
    y, s = ops.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and torch.equal(y, rmsnorm.rms_norm(x + r, w, 1e-6))


def test_qk_norm_rope_reference_is_norms_rotary_and_cache_write():
    g = torch.Generator().manual_seed(1)
    T, Hq, Hkv, D = 6, 4, 2, 32
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    qw, kw = torch.randn(D, generator=g), torch.randn(D, generator=g)
    pos = torch.tensor([0, 1, 2, 7, 8, 30])
    cs = rotary.rope_cos_sin_cache(D, 64, 10000.0)
    kc, vc = torch.zeros(4, 16, Hkv, D), torch.zeros(4, 16, Hkv, D)
    slots = torch.tensor([0, 1, 2, 17, 18, 40])
    q, k, v = fused.qk_norm_rope(qkv, Hq, Hkv, D, qw, kw, 1e-6, pos, cs, kc, vc, slots)
    q_ref = rotary.apply_rotary(
        rmsnorm.rms_norm(qkv[:, : Hq * D].view(T, Hq, D), qw, 1e-6), pos, cs
    )
    k_ref = rotary.apply_rotary(
        rmsnorm.rms_norm(qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D), kw, 1e-6), pos, cs
    )
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(v, qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D))
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    attention.store_kvcache(k_ref, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def _seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(n)), n, SamplingParams(max_tokens=8, ignore_eos=True))


def test_prompts_share_a_step_with_decodes_within_the_static_budget():
    s = Scheduler(
        BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=100, max_tokens_with_decodes=20
    )
    for i in range(3):
        s.add(_seq(f"d{i}", 5))
    first = s.schedule()
    assert first.num_decode == 0 and first.num_new_tokens == [5, 5, 5]
    s.postprocess(first, [1, 1, 1], set(), 512)
    s.add(_seq("p", 30))
    mixed = s.schedule()
    # the three decodes first, then the prompt's first chunk: 20 - 3 tokens
    assert mixed.num_decode == 3 and mixed.num_new_tokens == [1, 1, 1, 17]
    assert [mixed.samples(i) for i in range(4)] == [True, True, True, False]


def test_joining_prompts_ride_the_static_path_and_change_nothing():
    e = GenEngine(
        EngineArgs(model="tiny-moe", random_weights=True, max_num_seqs=16, max_model_len=256)
    )
    rng = random.Random(3)
    prompts = {f"j{i}": [rng.randrange(256) for _ in range(rng.randint(2, 14))] for i in range(8)}
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    pending = list(prompts)
    mixed_steps = 0
    while pending or e.has_unfinished():
        if pending:
            rid = pending.pop(0)
            e.add_request(rid, prompts[rid], params)
            mixed_steps += bool(e.scheduler.running)
        for o in e.step():
            out[o.request_id] += o.new_token_ids
    assert mixed_steps == 7
    assert e.runner.steps["varlen"] == 0
    alone = {rid: e.generate([p], params)[0].token_ids for rid, p in prompts.items()}
    assert out == alone
