"""What a real engine does not do on demand: fail mid-step. The real HTTP server runs over a
fake engine (tests/test_server_util.py) in a subprocess."""

from __future__ import annotations

import signal
import threading
import time

from test_server_util import fake_serve, post, request, sse_events


def test_engine_failure_is_reported_and_the_server_exits_1():
    with fake_serve("gen", fail_after_steps=3) as server:
        url = server.url
        events = sse_events(
            url + "/v1/completions", {"prompt": [1], "max_tokens": 50, "stream": True}
        )
        chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        # one byte-token a character; on a loaded machine two steps' tokens can share a chunk
        assert "".join(c["choices"][0]["text"] for c in chunks) == "\x02\x03\x04"
        assert len(errors) == 1
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


def test_sigterm_answers_a_request_a_stuck_core_never_took_and_exits_1():
    # A core stuck in a step (here a 60 s one; a SIGSTOPped tensor-parallel worker did it)
    # never acknowledges an add: the shutdown's abort must still answer it, not leave it to
    # be cut without a response when the connections close.
    with fake_serve("gen", step_s=60.0, shutdown_timeout_s=0.5, core_stop_s=2.0) as server:
        got: list = []
        t = threading.Thread(
            target=lambda: got.append(
                post(server.url + "/v1/completions", {"prompt": [1], "max_tokens": 5})
            )
        )
        t.start()
        time.sleep(1.0)  # the add is sent, the core is in its step
        server.signal(signal.SIGTERM)
        t.join(10)
        assert got, "no answer within 10 s of SIGTERM"
        status, body = got[0]
        assert status == 503 and "shutting down" in body["error"]["message"]
        # the front waits (30 s; 2 s here) for the core to stop, then kills it: not a clean stop
        assert server.proc.wait(45) == 1, server.log_tail()
        assert "did not stop within 30 s; killed it" in server.log_tail(200)
