"""Server life: API key, SIGTERM (drain what can finish, abort the rest, exit 0, nothing left
running), start-up failures. Real engine: tiny-moe (FP8 block-quantised experts) on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import openai
import pytest
from test_server_util import ROOT, StreamInThread, coserve_serve, post, request

MODEL = "tiny-moe"
ARGS = ("gen", "--model", MODEL, "--random-weights", "--device", "cpu", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def keyed():
    with coserve_serve(*ARGS, "--api-key", "s3cret") as s:
        yield s


def test_api_key_is_required_on_v1(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, body = post(
            keyed.url + "/v1/completions", {"prompt": [1], "max_tokens": 2}, headers
        )
        assert (
            status == 401
            and body["error"]["type"] == "AuthenticationError"
            and body["error"]["code"] == 401
        )
        assert request(keyed.url + "/v1/models", headers=headers)[0] == 401
    # health and metrics stay open, as in vLLM, so launchers and scrapers need no key
    assert request(keyed.url + "/health")[0] == 200
    assert request(keyed.url + "/metrics")[0] == 200
    status, body = post(
        keyed.url + "/v1/completions",
        {"prompt": [1], "max_tokens": 2},
        {"Authorization": "Bearer s3cret"},
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_openai_client_with_and_without_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(
        model=MODEL, prompt="MoE", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="MoE",
            max_tokens=5,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == r.choices[
        0
    ].model_extra["token_ids"]


def test_sigterm_drains_short_requests_aborts_long_ones_and_exits_0():
    # A grace period of 3 s, and the signal once the short request holds 5 of its 10 tokens:
    # its last 5 fit 3 s unless a token takes over 0.6 s (with 15 left, a suite beside two
    # busy processes on this 2-core machine once missed it); the long one's 2,000 took 5.8 s
    # unloaded (2026-11-30; 6.9 s before the engine's host work shrank), so with the 6 s grace
    # this test once had, it sometimes ended inside the grace and was not cut.
    with coserve_serve(*ARGS, "--shutdown-timeout", "3") as server:
        long = StreamInThread(server.url, {"prompt": [1], "max_tokens": 2000, "ignore_eos": True})
        assert long.first.wait(30) and not long.error
        short = StreamInThread(server.url, {"prompt": [2], "max_tokens": 10, "ignore_eos": True})
        assert short.first.wait(30) and not short.error
        deadline = time.monotonic() + 30
        while short.token_count() < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert 5 <= short.token_count() < 10, short.token_count()
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        rc = server.proc.wait(20)
        took = time.monotonic() - started
        long.join()
        short.join()
        log = server.log_tail(100)
        assert rc == 0, log
        assert took < 12, f"shutdown took {took:.1f} s"
        assert "draining 2 in-flight request(s)" in log
        # the short request finished normally inside the grace period
        assert (
            short.events[-1] == "[DONE]"
            and short.finish_reason() == "length"
            and short.token_count() == 10
        )
        # the long one was cut at the end of the grace period, and said so
        assert (
            long.events[-1] == "[DONE]"
            and long.finish_reason() == "abort"
            and long.token_count() < 2000
        )
        assert "aborted 1 request" in log and "exiting with 0; no threads left" in log
    # the port is closed: nothing is listening any more
    with pytest.raises(OSError):
        request(server.url + "/health", timeout=2)


def test_startup_failures_exit_nonzero_with_a_message():
    bad_flag = subprocess.run(
        [sys.executable, "-m", "coserve", "serve", "gen", "--model", MODEL, "--port", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_flag.returncode == 2 and "--port" in bad_flag.stderr
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "coserve",
            "serve",
            "gen",
            "--model",
            "no-such-preset",
            "--random-weights",
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode != 0 and "no-such-preset" in unknown.stderr
    assert "Traceback" not in unknown.stderr, unknown.stderr[-2000:]


def test_port_in_use_fails_cleanly(keyed):
    port = keyed.url.rsplit(":", 1)[1]
    busy = subprocess.run(
        [sys.executable, "-m", "coserve", "serve", *ARGS, "--port", port],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert busy.returncode == 1 and "cannot listen" in busy.stderr
    assert request(keyed.url + "/health")[0] == 200  # the first server is unharmed


def write_tiny_qwen3_checkpoint(
    path,
    vocab: int = 300,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 32,
    inter: int = 128,
) -> None:
    """An HF Qwen3 directory as save_pretrained writes one (config.json + model.safetensors, HF
    parameter names), one layer, random weights, and no tokenizer."""
    import torch
    from safetensors.torch import save_file

    config = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 298,
        "eos_token_id": 299,
        "torch_dtype": "float32",
    }
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    layer = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": w(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": w(vocab, hidden),
        layer + "input_layernorm.weight": torch.ones(hidden),
        layer + "post_attention_layernorm.weight": torch.ones(hidden),
        layer + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
        layer + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
        layer + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
        layer + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
        layer + "self_attn.q_norm.weight": torch.ones(head_dim),
        layer + "self_attn.k_norm.weight": torch.ones(head_dim),
        layer + "mlp.gate_proj.weight": w(inter, hidden),
        layer + "mlp.up_proj.weight": w(inter, hidden),
        layer + "mlp.down_proj.weight": w(hidden, inter),
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def test_hf_directory_without_tokenizer_takes_token_ids_only_and_idle_sigterm(tmp_path):
    write_tiny_qwen3_checkpoint(tmp_path)
    with coserve_serve("gen", "--model", str(tmp_path), "--device", "cpu") as server:
        url = server.url + "/v1/completions"
        status, body = post(url, {"model": str(tmp_path), "prompt": "some text", "max_tokens": 2})
        assert (
            status == 400
            and "no tokenizer" in body["error"]["message"]
            and body["error"]["param"] == "prompt"
        )
        status, body = post(url, {"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True})
        assert (
            status == 200
            and len(body["choices"][0]["token_ids"]) == 3
            and body["choices"][0]["text"] == ""
        )
        assert body["model"] == str(tmp_path)  # served under the --model value, as vLLM does
        status, body = post(url, {"prompt": [1, 300], "max_tokens": 2})  # vocabulary of 300
        assert status == 400 and "vocabulary" in body["error"]["message"]
        # SIGTERM with nothing in flight: out at once, exit 0, every thread joined
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert "exiting with 0; no threads left" in server.log_tail()
