"""What a real engine does not do on demand: fail mid-step. The real HTTP server runs over a
fake engine (tests/test_server_util.py) in a subprocess."""

from __future__ import annotations

from test_server_util import fake_serve, post, request, sse_events


def test_engine_failure_is_reported_and_the_server_exits_1():
    with fake_serve("gen", fail_after_steps=3) as server:
        url = server.url
        events = sse_events(
            url + "/v1/completions", {"prompt": [1], "max_tokens": 50, "stream": True}
        )
        tokens = [e for e in events if isinstance(e, dict) and "choices" in e]
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(tokens) == 3 and len(errors) == 1
        assert (
            errors[0]["error"]["code"] == 500
            and "fake engine failure" in errors[0]["error"]["message"]
        )
        assert server.proc.wait(20) == 1  # a dead engine ends the process, so a launcher sees it
        assert "engine loop died" in server.log_tail(200)


def test_engine_failure_fails_waiting_requests_with_500():
    with fake_serve("gen", fail_after_steps=0) as server:
        status, body = post(server.url + "/v1/completions", {"prompt": [1], "max_tokens": 5})
        assert status == 500 and body["error"]["type"] == "InternalServerError"
        assert server.proc.wait(20) == 1


def test_embed_server_over_fake_engine():
    with fake_serve("embed") as server:
        status, body = post(server.url + "/v1/embeddings", {"input": ["ab", "abc"]})
        assert status == 200 and [d["embedding"][0] for d in body["data"]] == [2.0, 3.0]
        assert request(server.url + "/health")[0] == 200
