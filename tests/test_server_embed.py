"""`coserve serve embed` with the real engine: the trained all-MiniLM-L6-v2 (text, through
its tokenizer) and tiny-embed (Qwen3 last-token pooling, random weights), through the
official `openai` client and plain HTTP."""

from __future__ import annotations

import base64
import re
import threading

import numpy as np
import openai
import pytest
from test_server_util import coserve_serve, metric, post, request

MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm():
    with coserve_serve("embed", "--model", MINILM, "--device", "cpu") as s:
        yield s


@pytest.fixture(scope="module")
def tiny():
    with coserve_serve(
        "embed",
        "--model",
        "tiny-embed",
        "--random-weights",
        "--device",
        "cpu",
        "--served-model-name",
        "tiny",
        "tiny-alias",
    ) as s:
        yield s


def client_for(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def test_minilm_text_embeddings_through_openai_client(minilm):
    assert "embedding dim 384" in minilm.ready_line
    client = client_for(minilm)
    assert [m.id for m in client.models.list().data] == [MINILM]
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ]
    resp = client.embeddings.create(
        model=MINILM, input=texts
    )  # the client asks for base64 by default
    v = vectors(resp)
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    sim = v @ v.T
    assert sim[0, 1] > 0.5 > sim[0, 2]  # a trained model: paraphrases close, unrelated far
    assert resp.usage.prompt_tokens > 3 * 5 and resp.usage.total_tokens == resp.usage.prompt_tokens
    one = vectors(client.embeddings.create(model=MINILM, input=texts[1]))
    assert np.allclose(one[0], v[1], atol=1e-5)


def test_minilm_float_and_base64_agree(minilm):
    status, as_float = post(
        minilm.url + "/v1/embeddings", {"input": ["hello world"], "encoding_format": "float"}
    )
    assert status == 200 and as_float["object"] == "list" and as_float["model"] == MINILM
    status, as_b64 = post(
        minilm.url + "/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}
    )
    assert status == 200
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_float["data"][0]["embedding"], atol=1e-6)


def test_minilm_token_ids_equal_text(minilm):
    client = client_for(minilm)
    text = vectors(client.embeddings.create(model=MINILM, input="hello world"))
    # [CLS] hello world [SEP] in the uncased BERT vocabulary
    ids = client.embeddings.create(model=MINILM, input=[101, 7592, 2088, 102])
    assert ids.usage.prompt_tokens == 4
    assert np.allclose(vectors(ids), text, atol=1e-5)
    both = vectors(
        client.embeddings.create(model=MINILM, input=[[101, 7592, 2088, 102], [101, 2088, 102]])
    )
    assert np.allclose(both[0], text[0], atol=1e-5) and not np.allclose(both[1], text[0], atol=1e-2)


def test_concurrent_requests_are_batched_without_changing_results(minilm):
    client = client_for(minilm)
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(12)]
    alone = {t: vectors(client.embeddings.create(model=MINILM, input=t))[0] for t in texts}
    got, errors = {}, []

    def one(t):
        try:
            got[t] = vectors(client.embeddings.create(model=MINILM, input=[t, t]))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in texts:
        assert np.allclose(got[t], alone[t], atol=1e-4), t
    assert metric(minilm.url, "coserve:embedding_inputs_total") >= 36


BAD = [
    ("missing input", {"model": MINILM}, "input"),
    ("empty list", {"input": []}, "input"),
    ("empty string", {"input": ""}, "input"),
    ("input a number", {"input": 3}, "input"),
    ("input an object", {"input": {"text": "hi"}}, "input"),
    ("mixed list", {"input": ["a", 1]}, "input"),
    ("bad encoding_format", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ("dimensions", {"input": "hi", "dimensions": 128}, "dimensions"),
    ("over-long text", {"input": "word " * 600}, "input"),
    ("token id out of vocabulary", {"input": [101, 10**9, 102]}, None),
    ("bad json", b'{"input": ', None),
]


@pytest.mark.parametrize("what, body, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_400_and_the_server_keeps_serving(minilm, what, body, param):
    status, answer = post(minilm.url + "/v1/embeddings", body)
    assert status == 400, answer
    assert (
        set(answer["error"]) == {"message", "type", "param", "code"}
        and answer["error"]["code"] == 400
    )
    if param is not None:
        assert answer["error"]["param"] == param
    status, good = post(minilm.url + "/v1/embeddings", {"input": "still here"})
    assert status == 200 and len(good["data"][0]["embedding"]) == 384


def test_unknown_model_is_404(minilm):
    status, answer = post(
        minilm.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}
    )
    assert (
        status == 404
        and answer["error"]["type"] == "NotFoundError"
        and answer["error"]["param"] == "model"
    )
    with pytest.raises(openai.NotFoundError):
        client_for(minilm).embeddings.create(model="text-embedding-3-small", input="hi")


def test_completions_on_an_embedding_server_is_a_400(minilm):
    status, answer = post(minilm.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 400 and "/v1/embeddings" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client_for(minilm).completions.create(model=MINILM, prompt="hi", max_tokens=2)


def test_tiny_embed_token_ids_text_and_served_names(tiny):
    dim = int(re.search(r"embedding dim (\d+)", tiny.ready_line).group(1))
    client = client_for(tiny)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    v = vectors(
        client.embeddings.create(model="tiny-alias", input=[[1, 2, 3], [4, 5], list(b"abc")])
    )
    assert v.shape == (3, dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    text = vectors(client.embeddings.create(model="tiny", input="abc"))  # byte tokenizer
    assert np.allclose(text[0], v[2], atol=1e-5)
    status, answer = post(tiny.url + "/v1/embeddings", {"input": [1] * 513})
    assert status == 400 and "512" in answer["error"]["message"]
    assert post(tiny.url + "/v1/embeddings", {"input": [1] * 512})[0] == 200
    assert request(tiny.url + "/health")[0] == 200


def test_the_metrics_page_has_no_generation_rows(tiny):
    """An embed server once showed the KV cache, preemption and generated-token rows of a gen
    server, all 0: a scrape could not tell "none" from "not applicable"."""
    names = ("coserve:embedding_inputs_total", "coserve:prompt_tokens_total")
    before = [metric(tiny.url, n) for n in names]  # the module's server served other tests
    client_for(tiny).embeddings.create(model="tiny", input=[[1, 2, 3], [4, 5]])
    page = request(tiny.url + "/metrics")[1]
    for name in ("kv_cache", "preemptions", "generation_tokens"):
        assert name not in page, name
    assert [metric(tiny.url, n) - b for n, b in zip(names, before, strict=True)] == [2, 5]
