"""The bench workload: seeded, reproducible per request index, within the asked shape."""

import json

import pytest

from coserve.bench.config import ConfigError, LoadConfig
from coserve.bench.workload import Workload


def _cfg(**kw):
    base = dict(gen_url="http://127.0.0.1:1", embed_url="http://127.0.0.1:2")
    base.update(kw)
    return LoadConfig(**base).validate()


def test_same_seed_same_inputs_whatever_the_order():
    a, b = Workload(_cfg(seed=7)), Workload(_cfg(seed=7))
    forward = [a.gen_prompt(i) for i in range(20)]
    backward = [b.gen_prompt(i) for i in reversed(range(20))][::-1]
    assert forward == backward
    assert a.embed_input(3) == b.embed_input(3)


def test_other_seed_or_index_other_inputs():
    w0, w1 = Workload(_cfg(seed=0)), Workload(_cfg(seed=1))
    assert w0.gen_prompt(0) != w1.gen_prompt(0)
    assert w0.gen_prompt(0) != w0.gen_prompt(1)
    assert w0.embed_input(0) != w1.embed_input(0)
    # gen and embed draw from separate streams
    assert w0.gen_prompt(0) != w0.embed_input(0)[0][: len(w0.gen_prompt(0))]


def test_shapes_and_ranges():
    cfg = _cfg(input_len=30, embed_batch=8, embed_input_len=32, token_id_low=100, token_id_high=200)
    w = Workload(cfg)
    p = w.gen_prompt(5)
    assert len(p) == 30 and all(100 <= t < 200 for t in p)
    e = w.embed_input(5)
    assert len(e) == 8 and all(len(x) == 32 for x in e)
    assert all(100 <= t < 200 for x in e for t in x)


def test_text_inputs():
    w = Workload(_cfg(embed_text=True, embed_batch=3, embed_input_len=12))
    e = w.embed_input(0)
    assert len(e) == 3 and all(isinstance(x, str) and len(x.split()) == 12 for x in e)
    assert e == Workload(_cfg(embed_text=True, embed_batch=3, embed_input_len=12)).embed_input(0)


def test_request_bodies_follow_the_openai_api():
    w = Workload(_cfg(output_len=64))
    body = json.loads(w.gen_body("m", 0))
    assert body["model"] == "m"
    assert body["prompt"] == w.gen_prompt(0)
    assert body["max_tokens"] == 64
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True
    emb = json.loads(w.embed_body("e", 2))
    assert emb["model"] == "e" and emb["input"] == w.embed_input(2)
    assert emb["encoding_format"] == "base64"  # as the openai client asks by default
    emb = json.loads(Workload(_cfg(embed_encoding="float")).embed_body("e", 2))
    assert emb["encoding_format"] == "float" and emb["input"] == w.embed_input(2)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(gen_url=None, embed_url=None), "gen_url"),
        (dict(gen_url="localhost:8000"), "gen_url"),
        (dict(gen_concurrency=0), "gen_concurrency"),
        (dict(output_len=-1), "output_len"),
        (dict(duration_s=0), "duration_s"),
        (dict(warmup_s=-1), "warmup_s"),
        (dict(token_id_low=5, token_id_high=5), "token_id_low"),
        (dict(embed_encoding="binary"), "embed_encoding"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    base = dict(gen_url="http://127.0.0.1:1")
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        LoadConfig(**base).validate()
    assert e.value.field == field
    assert field in str(e.value)
