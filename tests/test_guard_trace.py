"""The SLO guard's trace: its /metrics figures sampled into slo_guard.jsonl while a load
runs (experiment/guard_trace.py), against a loopback page and a closed port."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coserve.experiment.guard_trace import GuardTrace


class _Page(BaseHTTPRequestHandler):
    budget = "0.0203"

    def do_GET(self):  # noqa: N802 - http.server's name
        body = (
            "# TYPE coserve:slo_guard_budget_seconds gauge\n"
            f"coserve:slo_guard_budget_seconds {self.budget}\n"
            "coserve:slo_guard_tokens_per_forward 512\n"
            "coserve:slo_guard_cuts_total 6\n"
            "coserve:slo_guard_throttled_seconds_total 2\n"
            "coserve:num_requests_running 3\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def page():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_samples_the_guard_figures_until_stopped(page, tmp_path):
    out = tmp_path / "slo_guard.jsonl"
    trace = GuardTrace(page, 0.05, out)
    t0 = time.time()
    trace.start()
    time.sleep(0.4)
    n = trace.stop()
    assert trace.stop() == n  # idempotent
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == n and 4 <= n <= 10
    assert all(r["budget_seconds"] == 0.0203 and r["tokens_per_forward"] == 512 for r in rows)
    assert "num_requests_running" not in rows[0]  # only the guard's figures
    # a count of events is an integer (it read "6.0"); seconds stay seconds
    assert [repr(rows[0][k]) for k in ("cuts_total", "throttled_seconds_total")] == ["6", "2.0"]
    ts = [r["t"] for r in rows]
    assert ts == sorted(ts) and t0 - 1 < ts[0] < t0 + 1


def test_a_page_it_cannot_read_is_a_line_not_a_failure(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "slo_guard.jsonl"
    trace = GuardTrace(f"http://127.0.0.1:{port}", 0.05, out)
    trace.start()
    time.sleep(0.2)
    assert trace.stop() >= 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("cannot read" in r["error"] for r in rows)


@pytest.mark.parametrize("interval", [0, -1.0])
def test_a_bad_interval_is_refused_by_name(interval, tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        GuardTrace("http://127.0.0.1:1", interval, tmp_path / "x.jsonl")
