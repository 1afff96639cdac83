"""The sampler's vLLM fields on one batch, without a model: top_k, min_tokens (stop tokens
masked until then), logprobs of the raw distribution; a batch that asks for none of them
records nothing. On CUDA too where there is one."""

from __future__ import annotations

import pytest
import torch

from coserve.engine.sampler import Sampler
from coserve.engine.sequence import Sequence
from coserve.engine.types import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seq(rid: str, sampler: Sampler, completion: int = 0, **kw) -> Sequence:
    params = SamplingParams(max_tokens=100, **kw)
    gen = sampler.new_generator(params.seed) if params.seed is not None else None
    return Sequence(rid, [1] * (3 + completion), 3, params, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_min_tokens_and_logprobs(device):
    torch.manual_seed(0)
    sampler = Sampler(torch.device(device), seed=0)
    logits = torch.randn(4, 64, device=device)
    order = logits.argsort(dim=-1, descending=True).cpu()
    top = int(order[1, 0])
    seqs = [
        seq("plain", sampler, temperature=0),
        seq("banned", sampler, temperature=0, min_tokens=2, all_stop_token_ids=(top, 9999)),
        seq(
            "done",
            sampler,
            completion=2,
            temperature=0,
            min_tokens=2,
            all_stop_token_ids=(int(order[2, 0]),),
        ),
        seq("lp", sampler, temperature=0, logprobs=3),
    ]
    before = logits.clone()
    ids = sampler(logits, seqs)
    assert torch.equal(logits, before)  # the caller's logits are left as they were
    assert ids[0] == int(order[0, 0])
    assert ids[1] == int(
        order[1, 1]
    )  # the stop token is masked before min_tokens: the runner-up wins
    assert ids[2] == int(order[2, 0])  # min_tokens reached: no mask
    assert ids[3] == int(order[3, 0])
    lps = sampler.take_logprobs()
    assert set(lps) == {"lp"} and sampler.take_logprobs() == {}
    chosen, rank, top_ids, top_lps = lps["lp"]
    raw = torch.log_softmax(before[3].float(), dim=-1).cpu()
    assert rank == 1 and chosen == pytest.approx(float(raw[ids[3]]), abs=1e-5)
    assert top_ids == order[3, :3].tolist() and top_lps == pytest.approx(
        raw[order[3, :3]].tolist(), abs=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_draws_only_from_the_k_most_likely(device):
    sampler = Sampler(torch.device(device), seed=0)
    logits = torch.zeros(1, 32, device=device)
    logits[0, :8] = torch.arange(8, 0, -1, dtype=torch.float32, device=device) * 0.1  # nearly flat
    drawn = set()
    for i in range(200):
        drawn |= set(sampler(logits, [seq(f"r{i}", sampler, temperature=1.0, top_k=3, seed=i)]))
    assert drawn == {0, 1, 2}
    free = set()
    for i in range(200):
        free |= set(sampler(logits, [seq(f"f{i}", sampler, temperature=1.0, seed=i)]))
    assert len(free) > 3  # without top_k the same draws leave the top 3


def test_rank_of_a_sampled_token_and_plain_batches():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 5.0, -50.0, 4.0]])
    s = seq("r", sampler, temperature=1.0, top_k=2, seed=1, logprobs=0)
    for _ in range(20):
        (t,) = sampler(logits, [s])
        chosen, rank, top_ids, _ = sampler.take_logprobs()["r"]
        assert t in (1, 3) and rank == (1 if t == 1 else 2) and top_ids == []
    assert not seq("p", sampler).special and seq("q", sampler, top_k=5).special
    sampler(logits, [seq("p", sampler)])
    assert sampler.take_logprobs() == {}
