"""Server life: API key, SIGTERM (drain what can finish, abort the rest, exit 0, nothing left
running), start-up failures. Real engine: tiny-moe (FP8 block-quantised experts) on CPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from test_server_util import ROOT, coserve_serve, metric, post, request, sse_events, wait_for

MODEL = "tiny-moe"
ARGS = ("gen", "--model", MODEL, "--random-weights", "--device", "cpu", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def keyed():
    with coserve_serve(*ARGS, "--api-key", "s3cret") as s:
        yield s


def test_api_key_is_required_on_v1(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, body = post(keyed.url + "/v1/completions", {"prompt": [1], "max_tokens": 2}, headers)
        assert status == 401 and body["error"]["type"] == "AuthenticationError" and body["error"]["code"] == 401
        assert request(keyed.url + "/v1/models", headers=headers)[0] == 401
    # health and metrics stay open, as in vLLM, so launchers and scrapers need no key
    assert request(keyed.url + "/health")[0] == 200
    assert request(keyed.url + "/metrics")[0] == 200
    status, body = post(keyed.url + "/v1/completions", {"prompt": [1], "max_tokens": 2},
                        {"Authorization": "Bearer s3cret"})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_openai_client_with_and_without_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="MoE", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="MoE", max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == r.choices[0].model_extra["token_ids"]


def _stream_in_thread(url: str, body: dict, out: list) -> threading.Thread:
    def go():
        try:
            out.extend(sse_events(url + "/v1/completions", body))
        except Exception as e:  # noqa: BLE001 - the test asserts on what came back
            out.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_sigterm_drains_short_requests_aborts_long_ones_and_exits_0():
    with coserve_serve(*ARGS, "--shutdown-timeout", "1.5") as server:
        long_out, short_out = [], []
        long_t = _stream_in_thread(server.url, {"prompt": [1], "max_tokens": 2000, "ignore_eos": True,
                                                "stream": True}, long_out)
        wait_for(lambda: metric(server.url, "coserve:num_requests_running") == 1, what="the long request to run")
        short_t = _stream_in_thread(server.url, {"prompt": [2], "max_tokens": 8, "ignore_eos": True,
                                                 "stream": True}, short_out)
        time.sleep(0.3)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        rc = server.proc.wait(20)
        took = time.monotonic() - started
        long_t.join(10)
        short_t.join(10)
        log = server.log_tail(100)
        assert rc == 0, log
        assert took < 10, f"shutdown took {took:.1f} s"
        # the short request finished normally inside the grace period
        assert short_out[-1] == "[DONE]" and short_out[-2]["choices"][0]["finish_reason"] == "length", short_out[-3:]
        assert sum(len(e["choices"][0]["token_ids"]) for e in short_out[:-1]) == 8
        # the long one was cut at the end of the grace period, and said so
        assert long_out[-1] == "[DONE]", long_out[-3:]
        assert long_out[-2]["choices"][0]["finish_reason"] == "abort"
        assert sum(len(e["choices"][0]["token_ids"]) for e in long_out[:-1]) < 2000
        assert "aborted 1 request" in log and "stopped" in log
    # the port is closed: nothing is listening any more
    with pytest.raises(OSError):
        request(server.url + "/health", timeout=2)


def test_sigterm_when_idle_exits_0_at_once():
    with coserve_serve(*ARGS) as server:
        assert request(server.url + "/health")[0] == 200
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 5


def test_startup_failures_exit_nonzero_with_a_message():
    bad_flag = subprocess.run([sys.executable, "-m", "coserve", "serve", "gen", "--model", MODEL, "--port", "x"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad_flag.returncode == 2 and "--port" in bad_flag.stderr
    unknown = subprocess.run([sys.executable, "-m", "coserve", "serve", "gen", "--model", "no-such-preset",
                              "--random-weights", "--device", "cpu", "--port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "no-such-preset" in unknown.stderr
    assert "Traceback" not in unknown.stderr, unknown.stderr[-2000:]


def test_port_in_use_fails_cleanly(keyed):
    port = keyed.url.rsplit(":", 1)[1]
    busy = subprocess.run([sys.executable, "-m", "coserve", "serve", *ARGS, "--port", port],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1 and "cannot listen" in busy.stderr
    assert request(keyed.url + "/health")[0] == 200  # the first server is unharmed


def test_hf_directory_without_tokenizer_takes_token_ids_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   max_position_embeddings=256, bos_token_id=298, eos_token_id=299)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)  # config.json + safetensors, no tokenizer
    with coserve_serve("gen", "--model", str(tmp_path), "--device", "cpu") as server:
        url = server.url + "/v1/completions"
        status, body = post(url, {"model": str(tmp_path), "prompt": "some text", "max_tokens": 2})
        assert status == 400 and "no tokenizer" in body["error"]["message"] and body["error"]["param"] == "prompt"
        status, body = post(url, {"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True})
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 3 and body["choices"][0]["text"] == ""
        assert body["model"] == str(tmp_path)  # served under the --model value, as vLLM does
        status, body = post(url, {"prompt": [1, 300], "max_tokens": 2})  # vocabulary of 300
        assert status == 400 and "vocabulary" in body["error"]["message"]
