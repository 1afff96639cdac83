"""`coserve serve gen` with the real engine (tiny-dense, random weights, CPU) through the
official `openai` client and plain HTTP: completions streamed and not, every bad input
answered 400 with the server still serving, disconnect aborts, overload queues, /metrics."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from pathlib import Path

import openai
import pytest
from test_server_util import coserve_serve, metric, post, request, sse_events, wait_for

MODEL = "tiny-dense"
MAX_LEN = 1024


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


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def greedy(client, prompt, n: int = 8, **kw):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kw,
    )


def test_ready_line_names_url_and_kv_capacity(server):
    assert re.search(
        r"ready at http://127\.0\.0\.1:\d+ \(model tiny-dense, max_model_len 1024, "
        r"KV cache capacity \d+ tokens",
        server.ready_line,
    ), server.ready_line
    assert int(re.search(r"capacity (\d+) tokens", server.ready_line).group(1)) > 0


def test_gen_engine_computes_with_one_cpu_thread(server):
    """Its decode steps are many tiny ops: a second thread cost the demo's gen 4x
    (engine/cpu_threads.py)."""
    log = Path(server.log.name).read_text()
    assert "gen engine on the CPU: 1 intra-op thread" in log, server.log_tail()


def test_models_health_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == MAX_LEN
    assert request(server.url + "/health")[0] == 200
    assert request(server.url + "/version")[1]["version"]


def test_greedy_token_ids_usage_and_determinism(client):
    r = greedy(client, [1, 2, 3], 8)
    (choice,) = r.choices
    assert choice.finish_reason == "length" and len(token_ids(choice)) == 8
    assert all(0 <= t < 512 for t in token_ids(choice)) and isinstance(choice.text, str)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 8, 11)
    assert token_ids(greedy(client, [1, 2, 3], 8).choices[0]) == token_ids(choice)
    # a longer greedy run starts with the same tokens
    assert token_ids(greedy(client, [1, 2, 3], 12).choices[0])[:8] == token_ids(choice)


def test_text_prompt_goes_through_the_tokenizer(client):
    r = greedy(client, "Hello", 4)
    assert r.usage.prompt_tokens == 5  # the tiny presets' byte tokenizer
    assert token_ids(r.choices[0]) == token_ids(greedy(client, list(b"Hello"), 4).choices[0])


def test_stream_equals_non_stream_and_reports_usage(client):
    full = greedy(client, "stream me", 16)
    chunks = list(
        greedy(client, "stream me", 16, stream=True, stream_options={"include_usage": True})
    )
    token_chunks = [c for c in chunks if c.choices]
    # One event per engine step, each carrying its ids; steps the front had not written yet
    # when the next came (a loaded machine) share an event.
    assert 2 <= len(token_chunks) <= 16
    assert [t for c in token_chunks for t in token_ids(c.choices[0])] == token_ids(full.choices[0])
    assert "".join(c.choices[0].text for c in token_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * (
        len(token_chunks) - 1
    ) + ["length"]
    assert all(c.usage is None for c in token_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len("stream me")


def test_stream_without_usage_and_with_continuous_usage(server):
    events = sse_events(
        server.url + "/v1/completions", {"prompt": [7], "max_tokens": 3, "stream": True}
    )
    assert (
        events[-1] == "[DONE]"
        and 2 <= len(events) <= 4
        and all("usage" not in e for e in events[:-1])
    )
    events = sse_events(
        server.url + "/v1/completions",
        {
            "prompt": [7],
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    counts = [e["usage"]["completion_tokens"] for e in events[:-2]]  # the last two: usage, [DONE]
    assert counts[-1] == 3 and counts == sorted(set(counts))
    assert counts == [
        sum(len(e["choices"][0]["token_ids"]) for e in events[: i + 1]) for i in range(len(counts))
    ]


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        r = client.completions.create(
            model=MODEL,
            prompt=[5, 6],
            max_tokens=16,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return token_ids(r.choices[0])

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_several_prompts_in_one_request(client):
    r = greedy(client, [[1, 2], [3, 4, 5], [9]], 6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 18
    for prompt, choice in zip([[1, 2], [3, 4, 5], [9]], r.choices, strict=True):
        assert token_ids(choice) == token_ids(greedy(client, prompt, 6).choices[0])
    streamed = list(greedy(client, ["ab", "cd"], 4, stream=True))
    by_index = {0: [], 1: []}
    for c in streamed:
        by_index[c.choices[0].index] += token_ids(c.choices[0])
    assert by_index[0] == token_ids(greedy(client, "ab", 4).choices[0])
    assert by_index[1] == token_ids(greedy(client, "cd", 4).choices[0])


def test_overload_queues_instead_of_failing(server, client):
    # 12 concurrent requests against --max-num-seqs 4: the rest wait in the engine's queue
    results, errors = {}, []

    def one(i):
        try:
            results[i] = greedy(client, [i + 1, 2], 24)
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    assert all(r.usage.completion_tokens == 24 for r in results.values())


BAD_REQUESTS = [
    ("not json", b"{prompt: 1", None),
    ("not an object", [1, 2, 3], None),
    ("missing prompt", {"model": MODEL, "max_tokens": 4}, "prompt"),
    ("n over the per-request limit", {"prompt": [1], "n": 10**6}, "n"),
    ("max_tokens 0", {"prompt": [1], "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"prompt": [1], "max_tokens": -3}, "max_tokens"),
    ("max_tokens a string", {"prompt": [1], "max_tokens": "8"}, "max_tokens"),
    ("prompt a number", {"prompt": 42}, "prompt"),
    ("prompt mixed list", {"prompt": [1, "a"]}, "prompt"),
    ("prompt empty", {"prompt": ""}, "prompt"),
    ("over-long prompt", {"prompt": [1] * (MAX_LEN + 10), "max_tokens": 1}, "prompt"),
    ("prompt + max_tokens too long", {"prompt": [1] * 1000, "max_tokens": 100}, "max_tokens"),
    ("token id out of vocabulary", {"prompt": [1, 100000], "max_tokens": 2}, None),
    ("negative token id", {"prompt": [1, -1], "max_tokens": 2}, "prompt"),
    ("temperature negative", {"prompt": [1], "temperature": -1}, "temperature"),
    ("top_p zero", {"prompt": [1], "top_p": 0}, "top_p"),
    ("stream not a bool", {"prompt": [1], "stream": "yes"}, "stream"),
    (
        "stream_options without stream",
        {"prompt": [1], "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("logprobs over 20", {"prompt": [1], "logprobs": 21}, "logprobs"),
]


@pytest.mark.parametrize("what, body, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_400_and_the_server_keeps_serving(server, what, body, param):
    status, answer = post(server.url + "/v1/completions", body)
    assert status == 400, answer
    err = answer["error"]
    assert (
        set(err) == {"message", "type", "param", "code"} and err["code"] == 400 and err["message"]
    )
    if param is not None:
        assert err["param"] == param
    status, good = post(server.url + "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    assert status == 200 and good["usage"]["completion_tokens"] >= 1


def test_wrong_endpoint_and_unknown_path(server):
    status, answer = post(server.url + "/v1/embeddings", {"input": "hello"})
    assert status == 400 and "Embeddings API" in answer["error"]["message"]
    status, answer = request(server.url + "/v1/nothing-here")
    assert status == 404 and answer["error"]["code"] == 404


def test_unknown_model_gets_404_not_found(server):
    status, answer = post(server.url + "/v1/completions", {"model": "gpt-5", "prompt": [1]})
    assert (
        status == 404
        and answer["error"]["type"] == "NotFoundError"
        and answer["error"]["code"] == 404
    )
    assert answer["error"]["param"] == "model"


def test_openai_client_raises_not_found_and_bad_request(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt=[1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=[1] * (MAX_LEN + 1), max_tokens=2)
    assert greedy(client, [1], 2).usage.completion_tokens == 2


def test_client_disconnect_mid_stream_aborts_the_request(server):
    aborted_before = metric(
        server.url,
        "coserve:requests_total",
        absent_is_zero=True,
        endpoint="completions",
        outcome="aborted",
    )
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = {"prompt": [1], "max_tokens": MAX_LEN - 1, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    wait_for(
        lambda: metric(server.url, "coserve:num_requests_running") == 1, what="the request to run"
    )
    conn.sock.close()  # walk away mid-stream
    conn.close()
    wait_for(
        lambda: metric(server.url, "coserve:num_requests_running") == 0,
        timeout_s=10,
        what="the engine to drop the request",
    )
    wait_for(
        lambda: (
            metric(server.url, "coserve:requests_total", endpoint="completions", outcome="aborted")
            == aborted_before + 1
        ),
        what="the abort to be counted",
    )
    assert metric(server.url, "coserve:generation_tokens_total") > 0


def test_metrics_page(server, client):
    greedy(client, [3, 3], 5)
    assert post(server.url + "/v1/completions", {"prompt": ""})[0] == 400  # one bad_request
    page = request(server.url + "/metrics")[1]
    assert "# TYPE coserve:num_requests_running gauge" in page
    assert "# TYPE coserve:prompt_tokens_total counter" in page
    m = lambda name, **labels: metric(server.url, name, **labels)  # noqa: E731
    # With async scheduling the engine is one step ahead of its outputs: the gauges it sends
    # with the step after a request's last token reach 0 a step after the answer does.
    wait_for(lambda: m("coserve:num_requests_running") == 0, 5, "no request running")
    assert m("coserve:num_requests_waiting") == 0
    assert 0 <= m("coserve:kv_cache_usage_perc") <= 1 and m("coserve:kv_cache_capacity_tokens") > 0
    assert m("coserve:prompt_tokens_total") >= 2 and m("coserve:generation_tokens_total") >= 5
    # 4 sequences x 1024 tokens fit in 16 MB (8192 tokens at 2048 B/token): never a preemption
    assert m("coserve:num_preemptions_total") == 0
    assert m("coserve:request_success_total", finished_reason="length") >= 1
    assert m("coserve:requests_total", endpoint="completions", outcome="success") >= 1
    assert m("coserve:requests_total", endpoint="completions", outcome="bad_request") >= 1


def test_a_kv_cache_too_small_for_the_batch_preempts():
    # tiny-dense: 2048 B/token; 7 blocks of 16 tokens (one is the null block) hold 96 tokens.
    # 8 prompts of 20 tokens admitted together grow past 2 blocks each: some must be preempted.
    with coserve_serve(
        "gen",
        "--model",
        MODEL,
        "--random-weights",
        "--device",
        "cpu",
        "--max-model-len",
        "96",
        "--max-num-seqs",
        "8",
        "--kv-cache-bytes",
        str(7 * 16 * 2048),
    ) as small:
        assert metric(small.url, "coserve:kv_cache_capacity_tokens") == 96
        assert metric(small.url, "coserve:num_preemptions_total") == 0
        status, answer = post(
            small.url + "/v1/completions",
            {
                "prompt": [[i + 1] * 20 for i in range(8)],
                "max_tokens": 24,
                "ignore_eos": True,
                "temperature": 0,
            },
        )
        assert status == 200, answer
        assert [len(c["token_ids"]) for c in answer["choices"]] == [24] * 8
        assert metric(small.url, "coserve:num_preemptions_total") > 0
