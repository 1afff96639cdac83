"""/v1/chat/completions on the gen server (tiny-dense, random weights, CPU) through the
official `openai` client: whole and streamed answers in OpenAI's shapes, max_completion_tokens
and max_tokens, include_usage, n, logprobs; the plain template and a model directory's own."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from test_server_util import coserve_serve

from coserve.engine.presets import get_preset
from coserve.engine.tokenizer import HFTokenizer
from coserve.server.chat import parse_chat, plain_template, render
from coserve.server.errors import ApiError

MODEL = "tiny-dense"
MAX_LEN = 128
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


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
        "4",
        "--kv-cache-bytes",
        "16M",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    kw.setdefault("temperature", 0)
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra, **kw)


def test_chat_answer_shape_and_usage(client):
    r = chat(client, max_completion_tokens=6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and len(choice.model_extra["token_ids"]) == 6
    prompt = len(plain_template(MESSAGES).encode())  # the byte tokenizer: one token per byte
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt,
        6,
        prompt + 6,
    )
    assert chat(client, max_tokens=3).usage.completion_tokens == 3  # the older name works too
    both = chat(client, max_completion_tokens=2, extra_body={"max_tokens": 5})
    assert both.usage.completion_tokens == 2  # max_completion_tokens wins, as in vLLM


def test_chat_default_length_is_the_rest_of_the_context(client):
    r = chat(client)
    assert r.usage.completion_tokens == MAX_LEN - r.usage.prompt_tokens


def test_chat_stream_matches_the_whole_answer(client):
    whole = chat(client, max_completion_tokens=12)
    chunks = list(
        chat(client, max_completion_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first = chunks[0].choices[0]
    assert (
        first.delta.role == "assistant"
        and first.delta.content == ""
        and first.finish_reason is None
    )
    body = [c for c in chunks if c.choices]
    assert all(c.choices[0].delta.role is None for c in body[1:])
    assert (
        "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    )
    ids = [t for c in body for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert ids == whole.choices[0].model_extra["token_ids"]
    assert body[-1].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(chat(client, max_completion_tokens=2, stream=True))
    assert all(c.usage is None for c in plain)


def test_chat_n_and_logprobs(client):
    r = chat(client, max_completion_tokens=4, n=2, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 8
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: the same twice
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 4
        for item in content:
            assert len(item.top_logprobs) == 3 and item.logprob <= 0
            # greedy picks the most likely token: its logprob is the top one
            assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
            assert item.bytes == list(item.token.encode())
    plain = chat(client, max_completion_tokens=2, logprobs=True)
    assert [len(i.top_logprobs) for i in plain.choices[0].logprobs.content] == [0, 0]
    assert chat(client, max_completion_tokens=2).choices[0].logprobs is None


def test_chat_stream_logprobs(client):
    chunks = list(chat(client, max_completion_tokens=5, stream=True, logprobs=True, top_logprobs=1))
    items = [
        i
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for i in c.choices[0].logprobs.content
    ]
    assert len(items) == 5 and all(len(i.top_logprobs) == 1 for i in items)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt=[1], max_tokens=2)


def test_chat_text_parts_and_bad_messages(client):
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}],
        }
    ]
    r = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1)
    assert r.usage.prompt_tokens == len(
        plain_template([{"role": "user", "content": "hello\nthere"}]).encode()
    )
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "robot", "content": "x"}], max_tokens=1
        )


def test_model_directory_chat_template(tmp_path):
    """A tokenizer_config.json chat template is loaded with the tokenizer and rendered with
    the model's special tokens; a template that raises is a 400 naming messages."""
    minilm = get_preset("all-minilm-l6-v2").model_dir
    shutil.copy(minilm / "tokenizer.json", tmp_path / "tokenizer.json")
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
        "{% if messages[0].role == 'tool' %}{{ raise_exception('no tools first') }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": template, "bos_token": {"content": "[CLS]"}, "eos_token": "[SEP]"}
        )
    )
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert render(MESSAGES, tok) == "[CLS][system] be brief\n[user] hello there\n[assistant]"
    req = parse_chat({"messages": MESSAGES, "max_tokens": 2}, ["m"], tok, 512)
    assert req.prompts[0] == tok.encode(render(MESSAGES, tok))
    with pytest.raises(ApiError, match="no tools first") as e:
        parse_chat({"messages": [{"role": "tool", "content": "x"}]}, ["m"], tok, 512)
    assert e.value.param == "messages"
    no_config = tmp_path / "bare"
    no_config.mkdir()
    shutil.copy(minilm / "tokenizer.json", no_config / "tokenizer.json")
    assert render(MESSAGES, HFTokenizer(no_config / "tokenizer.json")) == plain_template(MESSAGES)


def test_chat_needs_a_tokenizer():
    with pytest.raises(ApiError, match="no tokenizer"):
        parse_chat({"messages": MESSAGES}, ["m"], None, 64)
