"""`coserve bench` as a user runs it: files written, the JSON contract, quiet output when
not on a terminal, a clear failure for an unreachable URL, Ctrl-C keeping what was measured."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from coserve.bench import stream_server
from coserve.cli import main

CONTRACT = {
    "gen": {
        "output_tokens_per_s",
        "requests_per_s",
        "completed",
        "failed",
        "tpot_ms",
        "ttft_ms",
        "itl_ms",
    },
    "embed": {"sequences_per_s", "requests_per_s", "completed", "failed", "latency_ms"},
}


def _bench(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "coserve", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


@pytest.fixture(scope="module")
def server():
    with stream_server.spawn(ttft_ms=20, itl_ms=5, embed_latency_ms=20) as srv:
        yield srv


def test_writes_the_contract_and_the_records(server, tmp_path):
    out = tmp_path / "run" / "bench.json"
    p = _bench(
        "--gen-url",
        server.url,
        "--embed-url",
        server.url + "/v1",
        "--gen-concurrency",
        "4",
        "--output-len",
        "16",
        "--embed-concurrency",
        "2",
        "--warmup",
        "0.4",
        "--duration",
        "1",
        "--out",
        str(out),
    )
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    s = json.loads(out.read_text())
    assert s["warmup_s"] == 0.4 and s["duration_s"] == 1 and s["cut_short"] is False
    for part, keys in CONTRACT.items():
        assert keys <= set(s[part]), part
        for k in keys:
            v = s[part][k]
            if k.endswith("_ms"):
                assert all(isinstance(v[q], float) for q in ("mean", "p50", "p95", "p99"))
            else:
                assert isinstance(v, (int, float))
        assert s[part]["completed"] > 0 and s[part]["failed"] == 0
    assert s["config"]["gen_concurrency"] == 4 and s["config"]["seed"] == 0
    assert s["embed"]["encoding"] == s["config"]["embed_encoding"] == "base64"
    rec = out.parent / "bench.records.jsonl"
    assert s["records_file"] == rec.name
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert {x["endpoint"] for x in lines} == {"gen", "embed"}
    assert all({"status", "start_s", "end_s"} <= set(x) for x in lines)
    # not a terminal: no live display, just the start line and the summary
    assert "\x1b[" not in stderr and "tok/s" in stderr and "wrote" in stderr
    assert stdout == ""


def test_gen_only_leaves_embed_null(server, tmp_path):
    out = tmp_path / "g.json"
    p = _bench(
        "--gen-url",
        server.url,
        "--gen-concurrency",
        "2",
        "--output-len",
        "8",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--out",
        str(out),
        "--quiet",
        "--json",
    )
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    s = json.loads(out.read_text())
    assert s["embed"] is None and s["gen"]["completed"] > 0
    assert json.loads(stdout)["gen"]["output_tokens_per_s"] == s["gen"]["output_tokens_per_s"]


def test_embed_encoding_float(server, tmp_path):
    out = tmp_path / "f.json"
    p = _bench(
        "--embed-url",
        server.url,
        "--embed-concurrency",
        "2",
        "--embed-encoding",
        "float",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--out",
        str(out),
        "--quiet",
    )
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    e = json.loads(out.read_text())["embed"]
    assert e["encoding"] == "float" and e["dim"] == 8
    assert e["completed"] > 0 and e["failed"] == 0


def test_unreachable_url_fails_at_once(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    p = _bench("--gen-url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "x.json"))
    _, stderr = p.communicate(timeout=30)
    assert time.monotonic() - t < 10
    assert p.returncode == 1
    assert f"cannot reach the gen server at http://127.0.0.1:{port}" in stderr
    assert not (tmp_path / "x.json").exists()


def test_bad_flags_are_named():
    p = _bench("--gen-url", "http://127.0.0.1:1", "--gen-concurrency", "0")
    _, stderr = p.communicate(timeout=30)
    assert p.returncode != 0 and "--gen-concurrency" in stderr
    p = _bench("--duration", "5")
    _, stderr = p.communicate(timeout=30)
    assert p.returncode != 0 and "--gen-url" in stderr
    p = _bench("--embed-url", "http://127.0.0.1:1", "--embed-encoding", "binary")
    _, stderr = p.communicate(timeout=30)
    assert p.returncode != 0 and "--embed-encoding" in stderr


def _wait_for(path_or_pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path_or_pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("when", ["measure", "warmup"])
def test_ctrl_c_writes_what_was_measured_marked_cut_short(server, tmp_path, when):
    out = tmp_path / "cut.json"
    warmup = "0.5" if when == "measure" else "30"
    p = _bench(
        "--gen-url",
        server.url,
        "--embed-url",
        server.url,
        "--gen-concurrency",
        "4",
        "--output-len",
        "16",
        "--embed-concurrency",
        "2",
        "--warmup",
        warmup,
        "--duration",
        "60",
        "--out",
        str(out),
    )
    # the start line is printed once the endpoints have answered; then give it some load
    first = p.stderr.readline()
    assert "coserve bench:" in first
    time.sleep(2.0)
    t = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    _, stderr = p.communicate(timeout=30)
    assert time.monotonic() - t < 10
    assert p.returncode == 130, stderr
    s = json.loads(out.read_text())
    assert s["cut_short"] is True and s["stopped_in"] == when
    assert s["planned_duration_s"] == 60
    lines = (tmp_path / "cut.records.jsonl").read_text().splitlines()
    assert len(lines) > 4
    if when == "measure":
        assert 0.5 < s["duration_s"] < 5
        assert s["gen"]["output_tokens_per_s"] > 0 and s["embed"]["sequences_per_s"] > 0
    else:
        assert s["duration_s"] == 0 and s["gen"]["output_tokens_per_s"] == 0
    assert "CUT SHORT" in stderr


def test_rates_goodput_and_a_rate_not_kept_up_on_the_console(tmp_path):
    out = tmp_path / "r.json"
    with stream_server.spawn(ttft_ms=10, itl_ms=2, embed_latency_ms=150) as srv:
        # embed: 60 req/s of 150 ms each with a cap of 2 in flight cannot be kept up
        p = _bench(
            "--gen-url",
            srv.url,
            "--gen-rate",
            "20",
            "--arrival",
            "constant",
            "--output-len",
            "8",
            "--embed-url",
            srv.url,
            "--embed-rate",
            "60",
            "--embed-concurrency",
            "2",
            "--goodput",
            "ttft:500",
            "e2el:1000",
            "--embed-slo",
            "100",
            "--warmup",
            "0.3",
            "--duration",
            "1.2",
            "--out",
            str(out),
        )
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    s = json.loads(out.read_text())
    assert s["gen"]["mode"] == "rate" and s["gen"]["kept_up"] is True
    assert s["gen"]["goodput"]["bounds_ms"] == {"ttft": 500.0, "e2el": 1000.0}
    assert s["gen"]["goodput"]["requests"] == s["gen"]["completed"] > 0
    assert s["embed"]["kept_up"] is False and s["embed"]["goodput"]["requests"] == 0
    assert s["load"] == {
        "arrival": "constant",
        "burstiness": 1.0,
        "gen_rate": 20.0,
        "embed_rate": 60.0,
        "slo": {"ttft_ms": 500.0, "tpot_ms": None, "e2el_ms": 1000.0, "embed_ms": 100.0},
    }
    assert "WARNING: embed did not keep up" in stderr and "rate 20/s offered" in stderr


def test_a_dead_endpoint_ends_the_run_with_its_reason_and_status_1(tmp_path):
    out = tmp_path / "dead.json"
    srv = stream_server.spawn(ttft_ms=10, itl_ms=2)
    try:
        p = _bench(
            "--gen-url",
            srv.url,
            "--gen-concurrency",
            "4",
            "--output-len",
            "8",
            "--warmup",
            "0.5",
            "--duration",
            "30",
            "--out",
            str(out),
        )
        assert "coserve bench:" in p.stderr.readline()
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGKILL)
        t = time.monotonic()
        _, stderr = p.communicate(timeout=30)
    finally:
        srv.stop()
    assert time.monotonic() - t < 5
    assert p.returncode == 1, stderr
    assert "gen server at" in stderr and "not answering" in stderr
    s = json.loads(out.read_text())
    assert "not answering" in s["aborted"] and "ABORTED" in stderr


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--goodput", "ttfb:100", "must be one of ttft, tpot, e2el"),
        ("--goodput", "ttft:fast", "a number of milliseconds"),
        ("--goodput", "tpot:-1", "--goodput"),
        ("--gen-rate", "0", "--gen-rate"),
        ("--gen-rate", "4e-324", "--gen-rate: 4.94066e-324 req/s is below 1e-05 req/s"),
        ("--embed-slo", "inf", "--embed-slo"),
        ("--burstiness", "0", "--burstiness"),
        ("--duration", "inf", "--duration"),
        ("--duration", "1e12", "--duration: must be a number of seconds in (0, 86400]"),
        ("--warmup", "1e12", "--warmup: must be a number of seconds in [0, 86400]"),
        ("--ramp", "inf", "--ramp: must be a number of seconds in [0, 86400]"),
        ("--ramp", "nan", "--ramp"),
        ("--stall", "0", "--stall"),
        ("--stall", "1e12", "--stall: must be a number of seconds"),
        # shorter than the run's watch (0.1 s): every run ended as frozen at its first look
        ("--stall", "1e-9", "--stall: must be a number of seconds in [0.1, 86400]"),
        # 1e9 closed-loop workers took the machine's memory before the first request
        ("--gen-concurrency", "1000000000", "--gen-concurrency: 1,000,000,000 requests in flight"),
        ("--embed-concurrency", "65537", "--embed-concurrency: 65,537 requests in flight"),
        # 100,000 inputs a request spent 50 s of the bench's CPU building a 1 s window's load
        ("--embed-batch", "100000", "--embed-batch: 100,000 inputs per request is above 2048"),
        # longer than any served model's context: every request refused, nothing measured
        ("--embed-input-len", "131073", "--embed-input-len: 131,073 is above 131,072 tokens"),
        ("--input-len", "1000000000", "--input-len: 1,000,000,000 is above 131,072 tokens"),
        ("--output-len", "131073", "--output-len: 131,073 is above 131,072 tokens"),
    ],
)
def test_bad_load_flags_are_named(flag, value, says, capsys):
    # in this process: the same parser and checks as `coserve bench`, without 21 interpreter
    # start-ups (test_bad_flags_are_named runs the command itself)
    try:
        code = main(["bench", "--gen-url", "http://127.0.0.1:1", flag, value])
    except SystemExit as e:
        code = e.code
    stderr = capsys.readouterr().err
    assert code == 2 and says in stderr, stderr


def test_stall_sets_how_long_a_silent_server_may_take():
    # the first token comes after 3 s: a frozen server by --stall 0.5, not by the default 10 s
    srv = stream_server.spawn(ttft_ms=3000, itl_ms=2)
    try:
        p = _bench("--gen-url", srv.url, "--gen-concurrency", "2", "--output-len", "4",
                   "--warmup", "0", "--duration", "30", "--stall", "0.5")  # fmt: skip
        t = time.monotonic()
        _, stderr = p.communicate(timeout=20)
    finally:
        srv.stop()
    assert time.monotonic() - t < 10, stderr
    assert p.returncode == 1, stderr
    assert "answered nothing for" in stderr and "--stall" in stderr, stderr


def test_a_server_that_refuses_every_request_is_named_and_exits_1(tmp_path):
    """`--embed-model nope` against a real server: 3,312 x 404, and the bench said "a window
    shorter than one request, or a stalled server" and exited 0."""
    with stream_server.spawn(
        embed_latency_ms=5, fail_every=1, fail_status=404, fail_message="no model nope"
    ) as srv:
        p = _bench(
            *("--embed-url", srv.url, "--embed-concurrency", "2", "--warmup", "0.2"),
            *("--duration", "0.5", "--out", str(tmp_path / "e.json")),
        )
        stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, stderr
    # no answer to read a dimension from: the summary leaves it out rather than "dim None"
    assert "batch 8  base64" in stdout + stderr and "dim None" not in stdout + stderr, stdout
    said = "every embed request failed, so nothing was measured"
    assert f"coserve bench: {said}" in stderr and "x 404 no model nope" in stderr, stderr
    s = json.loads((tmp_path / "e.json").read_text())
    assert s["embed"]["kept_up"] is False and said in s["embed"]["warning"]


@pytest.mark.parametrize("status, stops", [(400, True), (429, False)])
def test_a_client_error_on_every_request_ends_the_run_early(tmp_path, status, stops):
    """A gen server given as --embed-url answered 205,612 requests with 400 over the default
    30 s + 60 s before the bench said so; 429 (too many requests) is load and runs on."""
    with stream_server.spawn(
        embed_latency_ms=1, fail_every=1, fail_status=status, fail_message="not an embed model"
    ) as srv:
        p = _bench(
            *("--embed-url", srv.url, "--embed-concurrency", "4", "--warmup", "0"),
            *("--duration", "30" if stops else "2.5", "--quiet"),
        )
        t = time.monotonic()
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, stderr
    said = f"x {status} not an embed model"
    assert said in stderr and "every embed request failed" in stderr, stderr
    if stops:
        assert time.monotonic() - t < 15, stderr
        assert "the run stopped" in stderr and "client error" in stderr, stderr
        assert stderr.count(said) == 1, stderr  # said once, not again after the summary
    else:
        assert "the run stopped" not in stderr, stderr
