"""Request parsing, streaming detokenisation and the metrics page, without a server."""

from __future__ import annotations

import argparse

import pytest

from coserve.engine.tokenizer import ByteTokenizer
from coserve.server.command import parse_bytes
from coserve.server.detokenize import IncrementalDecoder
from coserve.server.errors import ApiError
from coserve.server.fields import RequestLimits
from coserve.server.metrics import Metrics
from coserve.server.protocol import parse_completion, parse_embedding

NAMES = ["m"]
BYTES = ByteTokenizer()


def completion(body, tokenizer=BYTES, max_model_len=32, eos=()):
    return parse_completion(body, NAMES, tokenizer, max_model_len, eos_token_ids=eos)


def test_completion_prompt_forms_and_defaults():
    r = completion({"model": "m", "prompt": "hi"})
    assert r.prompts == [[104, 105]] and r.params[0].max_tokens == 16  # OpenAI's and vLLM's default
    assert (
        completion({"prompt": list(range(20))}).params[0].max_tokens == 12
    )  # capped by the context
    assert r.params[0].temperature == 1.0 and r.params[0].top_p == 1.0 and not r.stream
    assert completion({"prompt": [1, 2, 3], "max_tokens": 4}).prompts == [[1, 2, 3]]
    assert completion({"prompt": ["a", "b"]}).prompts == [[97], [98]]
    r = completion(
        {
            "prompt": [[1], [2, 3]],
            "max_tokens": 3,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 7,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert r.prompts == [[1], [2, 3]] and len(r.params) == 2
    p = r.params[1]
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.ignore_eos) == (3, 0.0, 0.5, 7, True)
    assert r.stream and r.include_usage and not r.continuous_usage
    # neutral values of unsupported fields are fine (the openai client may send them)
    completion(
        {
            "prompt": [1],
            "n": 1,
            "echo": False,
            "logprobs": None,
            "stop": None,
            "presence_penalty": 0,
        }
    )


def test_completion_sampling_fields_as_vllm():
    r = completion(
        {
            "prompt": ["a", "b"],
            "n": 2,
            "seed": 5,
            "top_k": 3,
            "min_tokens": 2,
            "max_tokens": 4,
            "stop": ["x", ""],
            "stop_token_ids": [7],
            "logprobs": 2,
        },
        eos=(257,),
    )
    assert (
        r.prompts == [[97], [97], [98], [98]] and r.num_prompts == 2
    )  # choice i*n+j from prompt i
    assert [p.seed for p in r.params] == [5, 6, 5, 6]  # vLLM's parallel sampling: seed + j
    p = r.params[0]
    assert (p.top_k, p.min_tokens, p.stop_token_ids, p.all_stop_token_ids, p.logprobs) == (
        3,
        2,
        (7,),
        (7, 257),
        2,
    )
    assert r.stop == ["x"] and r.logprobs == 2
    p = completion(
        {"prompt": [1], "ignore_eos": True, "stop_token_ids": [7], "top_k": -1}, eos=(257,)
    ).params[0]
    assert p.all_stop_token_ids == (7,) and p.top_k == 0  # ignore_eos: EOS is no stop token


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"max_tokens": 3}, "prompt", "required"),
        ({"prompt": 5}, "prompt", "must be a string"),
        ({"prompt": []}, "prompt", "empty list"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": [[]]}, "prompt", "empty"),
        ({"prompt": [1, "a"]}, "prompt", "mixing"),
        ({"prompt": [1, -2]}, "prompt", "token id"),
        ({"prompt": [1, True]}, "prompt", "token id"),
        ({"prompt": [1.5]}, "prompt", "mixing"),
        ({"prompt": [1], "n": 0}, "n", "at least 1"),
        ({"prompt": [1], "n": 257}, "n", "at most 256"),
        ({"prompt": [[1]] * 129, "n": 2}, "prompt", "129 prompts (n=2)"),
        ({"prompt": [1], "seed": 2**63}, "seed", "at most"),
        ({"prompt": [1], "seed": -(2**63) - 1}, "seed", "at least"),
        ({"prompt": [1], "temperature": float("nan")}, "temperature", "must be a finite number"),
        ({"prompt": [1], "temperature": float("inf")}, "temperature", "must be a finite number"),
        ({"prompt": [1], "temperature": 10**400}, "temperature", "must be a finite number"),
        ({"prompt": [1], "logprobs": 21}, "logprobs", "at most 20"),
        ({"prompt": [1], "logprobs": True}, "logprobs", "integer"),
        ({"prompt": [1], "top_k": -2}, "top_k", "at least -1"),
        ({"prompt": [1], "min_tokens": 5, "max_tokens": 4}, "min_tokens", "must not exceed"),
        ({"prompt": [1], "stop": 5}, "stop", "string or a list"),
        ({"prompt": [1], "stop": ["a"] * 65}, "stop", "more than 64"),
        ({"prompt": [1], "stop": ["\ud800"]}, "stop", "not valid Unicode"),
        ({"prompt": [1], "stop_token_ids": [-1]}, "stop_token_ids", "token id"),
        ({"prompt": "a\ud800b"}, "prompt", "not valid Unicode"),
        ({"prompt": "x" * 513}, "prompt", "513 characters"),
        ({"prompt": [1], "model": 3}, "model", "must be a string"),
        ({"prompt": [1], "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": [1], "max_tokens": -1}, "max_tokens", "at least 1"),
        ({"prompt": [1], "max_tokens": "4"}, "max_tokens", "integer"),
        ({"prompt": [1], "max_tokens": 2.0}, "max_tokens", "integer"),
        ({"prompt": [1], "max_tokens": True}, "max_tokens", "integer"),
        ({"prompt": [1], "max_tokens": 32}, "max_tokens", "maximum context length is 32"),
        ({"prompt": list(range(32))}, "prompt", "maximum context length is 32"),
        ({"prompt": [1], "temperature": -0.1}, "temperature", "must be in"),
        ({"prompt": [1], "temperature": "hot"}, "temperature", "number"),
        ({"prompt": [1], "top_p": 0}, "top_p", "must be in"),
        ({"prompt": [1], "top_p": 1.5}, "top_p", "must be in"),
        ({"prompt": [1], "seed": 1.5}, "seed", "integer"),
        ({"prompt": [1], "stream": "yes"}, "stream", "boolean"),
        ({"prompt": [1], "ignore_eos": 1}, "ignore_eos", "boolean"),
        (
            {"prompt": [1], "stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed",
        ),
        ({"prompt": [1], "stream": True, "stream_options": []}, "stream_options", "object"),
        (
            {"prompt": [1], "stream": True, "stream_options": {"include_usage": "y"}},
            "include_usage",
            "boolean",
        ),
        ({"prompt": [1], "echo": True}, "echo", "not supported"),
        ({"prompt": [1], "best_of": 3}, "best_of", "not supported"),
    ],
)
def test_completion_bad_input_names_the_field(body, param, words):
    with pytest.raises(ApiError) as e:
        completion(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400


def test_text_without_tokenizer_is_refused():
    with pytest.raises(ApiError, match="no tokenizer"):
        completion({"prompt": "hello"}, tokenizer=None)
    assert completion({"prompt": [5, 6]}, tokenizer=None).prompts == [[5, 6]]
    with pytest.raises(ApiError, match="no tokenizer"):
        parse_embedding({"input": ["a"]}, NAMES, None, 16, 4)
    with pytest.raises(ApiError, match="stop_token_ids"):
        completion({"prompt": [1], "stop": "x"}, tokenizer=None)
    assert completion({"prompt": [1], "stop_token_ids": [3]}, tokenizer=None).params[
        0
    ].stop_token_ids == (3,)


def test_unknown_model_is_404():
    with pytest.raises(ApiError) as e:
        completion({"prompt": [1], "model": "other"})
    assert e.value.status == 404 and e.value.body()["error"]["type"] == "NotFoundError"


def test_rejected_values_are_quoted_cut():
    for body in (
        {"prompt": [1], "stop": 7, "best_of": "x" * 10**6},
        {"prompt": [1], "best_of": list(range(10**6))},
        {"prompt": [1, "a" * 10**6]},
        {"prompt": [1], "model": "m" * 10**6},
    ):
        with pytest.raises(ApiError) as e:
            completion(body)
        assert len(e.value.message) < 400, e.value.message[:500]


def test_limits_are_checked_before_tokenising():
    class Counting(ByteTokenizer):
        calls = 0

        def encode(self, text):
            Counting.calls += 1
            return super().encode(text)

    tok = Counting()
    with pytest.raises(ApiError, match="3 inputs, more than"):
        parse_embedding(
            {"input": ["a", "b", "c"]}, NAMES, tok, 8, 4, RequestLimits(max_embed_inputs=2)
        )
    with pytest.raises(ApiError, match="characters"):
        parse_embedding(
            {"input": ["a", "b" * 20]}, NAMES, tok, 8, 4, RequestLimits(max_prompt_chars=10)
        )
    with pytest.raises(ApiError, match="5 prompts"):
        parse_completion({"prompt": ["a"] * 5}, NAMES, tok, 32, RequestLimits(max_gen_choices=4))
    assert Counting.calls == 1  # only "a" of the second request, before "b" * 20 was refused


def test_embedding_forms_and_errors():
    def emb(body):
        return parse_embedding(body, NAMES, BYTES, 8, 4)

    assert emb({"input": "ab"}).inputs == [[97, 98]]
    assert emb({"input": ["a", "b"], "encoding_format": "base64"}).encoding_format == "base64"
    assert emb({"input": [1, 2]}).inputs == [[1, 2]]
    assert emb({"input": [[1], [2, 3]], "dimensions": 4, "model": "m"}).inputs == [[1], [2, 3]]
    for body, param in [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": {"a": 1}}, "input"),
        ({"input": "x" * 9}, "input"),
        ({"input": [[1], list(range(9))]}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 2}, "dimensions"),
        ({"input": "a", "model": "x"}, "model"),
        ({"input": "\udfff"}, "input"),
    ]:
        with pytest.raises(ApiError) as e:
            emb(body)
        assert e.value.param == param, body


def test_incremental_decoder_never_splits_characters():
    text = "naïve café — 日本語 ok"
    ids = list(text.encode())
    dec = IncrementalDecoder(BYTES)
    pieces = [dec.add([t]) for t in ids[:-1]] + [dec.add(ids[-1:], final=True)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # a sequence cut inside a character: the held-back bytes come out on the final call
    dec = IncrementalDecoder(BYTES)
    assert dec.add(list("é".encode())[:1]) == ""
    assert dec.add([], final=True) == "\ufffd"
    assert IncrementalDecoder(None).add([1, 2], final=True) == ""


def test_metrics_text_format():
    m = Metrics('we"ird', "gen")
    m.requests[("completions", "success")] += 3
    m.finished["length"] += 2
    text = m.render(
        {
            "num_running": 2,
            "num_waiting": 1,
            "kv_cache_usage": 0.25,
            "num_preemptions": 4,
            "prompt_tokens_total": 10,
            "generation_tokens_total": 20,
            "kv_capacity_tokens": 4096,
        },
        7,
    )
    lines = text.splitlines()
    assert 'coserve:num_requests_running{model_name="we\\"ird"} 2' in lines
    assert 'coserve:kv_cache_usage_perc{model_name="we\\"ird"} 0.25' in lines
    assert (
        'coserve:requests_total{model_name="we\\"ird",endpoint="completions",outcome="success"} 3'
        in lines
    )
    assert "# TYPE coserve:generation_tokens_total counter" in lines
    for line in lines:  # every sample line: name{labels} number
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("coserve:") and name.endswith("}")


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("256M") == 256 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
