"""The stream test server as other tests use it: its own process, the OpenAI routes, timing,
failure modes, several processes on one port, a clean stop."""

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from coserve.bench import stream_server


def _post(url, body, timeout=10):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def test_routes_and_timing():
    with stream_server.spawn(
        ttft_ms=30, itl_ms=20, embed_latency_ms=40, model="tm", embed_dim=4, token_ids=True
    ) as srv:
        models = json.load(urllib.request.urlopen(srv.url + "/v1/models"))
        assert models["data"][0]["id"] == "tm"
        assert urllib.request.urlopen(srv.url + "/health").status == 200

        t = time.monotonic()
        with _post(
            srv.url + "/v1/completions",
            {
                "prompt": [1, 2, 3],
                "max_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            events = [e for e in r.read().decode().split("\n\n") if e]
        took = time.monotonic() - t
        assert 0.030 + 4 * 0.020 - 0.005 < took < 0.030 + 4 * 0.020 + 0.1
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert [c["choices"][0]["token_ids"] for c in chunks[:5]] == [[0], [1], [2], [3], [4]]
        assert chunks[4]["choices"][0]["finish_reason"] == "length"
        assert chunks[5]["choices"] == [] and chunks[5]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "total_tokens": 8,
        }

        t = time.monotonic()
        body = json.load(_post(srv.url + "/v1/completions", {"prompt": "a b", "max_tokens": 3}))
        assert time.monotonic() - t >= 0.030 + 2 * 0.020 - 0.005
        assert body["usage"]["completion_tokens"] == 3

        t = time.monotonic()
        emb = json.load(_post(srv.url + "/v1/embeddings", {"input": [[1, 2], [3]]}))
        assert time.monotonic() - t >= 0.035
        assert [d["index"] for d in emb["data"]] == [0, 1] and len(emb["data"][0]["embedding"]) == 4

        for path, body, code in [
            ("/v1/nothing", {}, 404),
            ("/v1/completions", {"prompt": [1], "max_tokens": 0}, 400),
        ]:
            try:
                _post(srv.url + path, body)
                raise AssertionError("expected an error")
            except urllib.error.HTTPError as e:
                assert e.code == code and "message" in json.load(e)["error"]


def test_embeddings_in_base64_are_little_endian_float32s():
    with stream_server.spawn(embed_latency_ms=1, embed_dim=5) as srv:
        emb = json.load(
            _post(srv.url + "/v1/embeddings", {"input": ["a b", "c"], "encoding_format": "base64"})
        )
        vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in emb["data"]]
        assert [v.tolist() for v in vecs] == [[np.float32(0.1)] * 5] * 2
        flt = json.load(
            _post(srv.url + "/v1/embeddings", {"input": ["a b"], "encoding_format": "float"})
        )
        assert flt["data"][0]["embedding"] == [0.1] * 5
        try:
            _post(srv.url + "/v1/embeddings", {"input": ["a"], "encoding_format": "binary"})
            raise AssertionError("expected an error")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "encoding_format" in json.load(e)["error"]["message"]


def test_the_openai_client_reads_its_default_answer():
    openai = pytest.importorskip("openai")
    with stream_server.spawn(embed_latency_ms=1, embed_dim=6) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)
        out = client.embeddings.create(model="stream-test", input=[[1, 2], [3]])
        client.close()
    assert [len(d.embedding) for d in out.data] == [6, 6]
    assert out.data[1].embedding == pytest.approx([0.1] * 6)


def test_failure_modes_and_stats(tmp_path):
    with stream_server.spawn(
        ttft_ms=5,
        itl_ms=5,
        fail_every=2,
        fail_status=429,
        drop_every=3,
        drop_after=1,
        stats_dir=str(tmp_path),
    ) as srv:
        codes = []
        for _ in range(4):
            try:
                with _post(
                    srv.url + "/v1/completions", {"prompt": [1], "max_tokens": 4, "stream": True}
                ) as r:
                    r.read()
                codes.append(r.status)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
            except Exception:  # the dropped connection: the 3rd request
                codes.append("dropped")
        assert codes == [200, 429, "dropped", 429]
    stats = [json.loads(p.read_text()) for p in tmp_path.iterdir()]
    assert len(stats) == 1 and stats[0]["served"]["failed"] == 2
    assert stats[0]["served"]["dropped"] == 1 and sum(stats[0]["chunk_lateness_hist_10us"]) > 0


def test_runs_as_a_module_with_workers_and_stops_on_sigterm():
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coserve.bench.stream_server",
            "--port",
            "0",
            "--workers",
            "2",
            "--ttft-ms",
            "1",
            "--itl-ms",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = p.stdout.readline()
        url = line.strip().rsplit(" ", 1)[1]
        for _ in range(6):  # connections land on either process
            with _post(
                url + "/v1/completions", {"prompt": [1], "max_tokens": 2, "stream": True}
            ) as r:
                assert r.read().endswith(b"data: [DONE]\n\n")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def test_chat_streams_as_the_openai_client_reads_it():
    openai = pytest.importorskip("openai")
    with stream_server.spawn(ttft_ms=20, itl_ms=5, model="tm") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="tm",
                messages=[{"role": "user", "content": "one two three"}],
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        whole = client.chat.completions.create(
            model="tm", messages=[{"role": "user", "content": "a b"}], max_tokens=3
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert content == [" tok"] * 6
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 3
    assert whole.choices[0].message.content == " tok" * 3
    assert whole.usage.completion_tokens == 3
