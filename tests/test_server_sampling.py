"""vLLM's sampling fields on /v1/completions through the official `openai` client: the default
max_tokens of 16, `stop` strings (over a fake engine whose text is known in advance),
`stop_token_ids`, `min_tokens`, `top_k`, `n` with seeds and `logprobs` (over the real
engine: tiny-dense, random weights, CPU)."""

from __future__ import annotations

import openai
import pytest
from test_server_util import coserve_serve, fake_serve

from coserve.engine.tokenizer import ByteTokenizer
from coserve.server.choices import Choice

MODEL = "tiny-dense"
MAX_LEN = 256


@pytest.fixture(scope="module")
def server():
    with coserve_serve(
        "gen",
        "--model",
        MODEL,
        "--random-weights",
        "--device",
        "cpu",
        "--max-model-len",
        str(MAX_LEN),
        "--max-num-seqs",
        "8",
        "--kv-cache-bytes",
        "16M",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def fake():
    """The fake engine answers prompt [96] with 'abcdefgh...' (token k = 97 + k)."""
    with fake_serve("gen") as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, prompt=(1, 2, 3), **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    kw.setdefault("temperature", 0)
    return client.completions.create(
        model=kw.pop("model", MODEL), prompt=list(prompt), extra_body=extra, **kw
    )


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_default_max_tokens_is_16_capped_by_the_context(client):
    assert complete(client).usage.completion_tokens == 16
    assert complete(client, prompt=[1] * (MAX_LEN - 5)).usage.completion_tokens == 5


def test_stop_strings_end_the_text_before_them(fake):
    r = complete(fake, [96], model="fake", max_tokens=20, stop=["de", "zz"])
    (c,) = r.choices
    assert c.text == "abc" and c.finish_reason == "stop" and c.model_extra["stop_reason"] == "de"
    assert (
        r.usage.completion_tokens == len(ids_of(c)) == 5
    )  # up to the token that completed the stop string
    chunks = list(complete(fake, [96], model="fake", max_tokens=20, stop=["de"], stream=True))
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == "abc" and not any(
        "d" in t for t in texts
    )  # nothing of a stop string goes out
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert complete(fake, [96], model="fake", max_tokens=4, stop="zz").choices[0].text == "abcd"
    # the stop string earliest in the text wins, whatever its place in the list
    assert (
        complete(fake, [96], model="fake", max_tokens=20, stop=["fg", "bc"]).choices[0].text == "a"
    )


def test_choice_holds_back_a_possible_stop_string():
    c = Choice(0, ByteTokenizer(), ["xyz"], None)
    assert (
        c.advance([ord("a"), ord("b"), ord("x")], [None] * 3, None) == "a"
    )  # "bx" may start "xyz"
    assert c.advance([ord("y")], [None], None) == "b"
    assert c.advance([ord("q")], [None], None) == "x"
    assert c.advance([ord("x"), ord("y"), ord("z"), ord("k")], [None] * 4, None) == "yq"
    assert c.finish == "stop" and c.stop_reason == "xyz" and c.stopped_by_text


def test_stop_token_ids(client):
    ids = ids_of(complete(client, max_tokens=16).choices[0])
    stop = ids[4]
    first = ids.index(stop)
    (c,) = complete(client, max_tokens=16, extra_body={"stop_token_ids": [stop]}).choices
    assert (
        ids_of(c) == ids[: first + 1]
        and c.finish_reason == "stop"
        and c.model_extra["stop_reason"] == stop
    )


def test_min_tokens_holds_stop_tokens_back(client):
    ids = ids_of(complete(client, max_tokens=16).choices[0])
    stop = ids[1]
    (c,) = complete(
        client, max_tokens=16, extra_body={"stop_token_ids": [stop], "min_tokens": 8}
    ).choices
    got = ids_of(c)
    assert (
        len(got) >= 8 and stop not in got[:8]
    )  # vLLM: the stop tokens are masked until min_tokens
    assert c.finish_reason == "length" or got[-1] == stop


def test_top_k(client):
    greedy = ids_of(complete(client, max_tokens=12).choices[0])
    sampled = ids_of(
        complete(client, max_tokens=12, temperature=1.0, seed=3, extra_body={"top_k": 1}).choices[0]
    )
    assert sampled == greedy  # top_k 1 is greedy whatever the temperature
    free = ids_of(complete(client, max_tokens=12, temperature=5.0, seed=3).choices[0])
    assert free != greedy  # so the test above can fail: at temperature 5 sampling leaves the argmax
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=20,
        temperature=5.0,
        seed=1,
        logprobs=True,
        top_logprobs=3,
        extra_body={"top_k": 3, "ignore_eos": True},
    )
    for item in chat.choices[0].logprobs.content:  # every draw is among the 3 most likely tokens
        assert item.logprob >= min(t.logprob for t in item.top_logprobs) - 1e-5


def test_n_choices_and_seeds(client):
    r = complete(client, max_tokens=8, n=3, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.prompt_tokens == 3
    assert r.usage.completion_tokens == 24
    # vLLM's parallel sampling: choice j draws with seed + j
    again = complete(client, max_tokens=8, temperature=1.0, seed=12)
    assert ids_of(again.choices[0]) == ids_of(r.choices[1])
    two = complete(client, prompt=[[1, 2], [3]], max_tokens=2, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.prompt_tokens == 3


def test_completion_logprobs(client):
    r = complete(client, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    )
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the most likely token
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(complete(client, max_tokens=6, logprobs=2, stream=True))
    streamed = [
        v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert complete(client, max_tokens=2).choices[0].logprobs is None
    zero = complete(client, max_tokens=2, logprobs=0).choices[0].logprobs
    assert [len(t) for t in zero.top_logprobs] == [1, 1]  # only the sampled token, as vLLM


def test_logprobs_without_a_tokenizer_name_token_ids():
    c = Choice(0, None, [], 1)
    c.advance([300], [(-0.5, 1, [300], [-0.5])], "length")
    assert c.completion_logprobs(c.logprobs)["tokens"] == ["token_id:300"]
