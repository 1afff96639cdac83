"""`coserve serve --tensor-parallel-size 2` on CPU: it answers, and its worker rank ends with
it, whether the server stops on SIGTERM or is killed outright; a worker killed mid-stream
fails the stream and ends the server within 5 s; expert parallelism serves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server_util import (
    ROOT,
    StreamInThread,
    coserve_serve,
    descendants,
    gone_within,
    post,
    running,
)


def _worker_pids(server) -> list[int]:
    m = re.search(r"tensor parallel: 2 ranks \(workers \[([\d, ]+)\]\)", server.log_tail(400))
    assert m, server.log_tail()
    return [int(p) for p in m.group(1).split(",")]


def _listening(pids) -> list[str]:
    """The TCP addresses ("ip:port", IPv6 in hex) the processes `pids` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ip, port = f[1].split(":")
                if table == "tcp":  # little-endian IPv4
                    ip = ".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0))
                out.append(f"{ip}:{int(port, 16)}")
    return out


_LOOPBACK = ("127.", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def assert_listens_on_loopback_only(server) -> None:
    """Every TCP socket the server's ranks listen on is bound to loopback (torch's TCP store
    listened on every interface; NCCL's bootstrap takes the first non-loopback interface)."""
    ports = _listening([server.proc.pid, *descendants(server.proc.pid)])
    assert len(ports) >= 2 and all(a.startswith(_LOOPBACK) for a in ports), ports


def long_stream(server) -> StreamInThread:
    """A 2,000-token greedy stream from `server`, once its first token has come."""
    stream = StreamInThread(
        server.url,
        {"prompt": [1, 2, 3], "max_tokens": 2000, "temperature": 0, "ignore_eos": True},
    )
    assert stream.first.wait(60) and stream.error is None, server.log_tail()
    return stream


_COMMON = ("--random-weights", "--device", "cpu", "--tensor-parallel-size", "2")


@pytest.mark.timeout(120)
def test_tp2_gen_server_answers_and_its_worker_dies_when_it_is_killed():
    with coserve_serve("gen", "--model", "tiny-dense", "--max-model-len", "512", *_COMMON) as s:
        status, body = post(
            s.url + "/v1/completions",
            {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        workers = _worker_pids(s)
        assert all(running(p) for p in workers)
        assert_listens_on_loopback_only(s)
        os.kill(s.proc.pid, signal.SIGKILL)  # the server alone, not its process group
        s.proc.wait(10)
        assert gone_within(workers, 10)


@pytest.mark.timeout(120)
def test_tp2_embed_server_stops_its_worker_on_sigterm():
    # NCCL's interface (unused by CPU ranks) set by the user: kept, and said
    env = {"NCCL_SOCKET_IFNAME": "bogus0"}
    with coserve_serve("embed", "--model", "tiny-embed", *_COMMON, env=env) as s:
        said = "sockets follow NCCL_SOCKET_IFNAME=bogus0 from the environment, not loopback"
        assert said in s.log_tail(400)
        status, body = post(s.url + "/v1/embeddings", {"input": [[1, 2, 3], [4, 5]]})
        assert status == 200 and len(body["data"]) == 2, body
        workers = _worker_pids(s)
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(20) == 0
        assert gone_within(workers, 5)


@pytest.mark.timeout(120)
def test_a_killed_worker_fails_the_stream_and_ends_the_server():
    with coserve_serve("gen", "--model", "tiny-dense", "--max-model-len", "2048", *_COMMON) as s:
        stream = long_stream(s)
        os.kill(_worker_pids(s)[0], signal.SIGKILL)
        t0 = time.monotonic()
        assert s.proc.wait(10) == 1, s.log_tail()
        assert time.monotonic() - t0 < 5
        events = stream.join(10)
        assert stream.token_count() < 2000
        assert any(isinstance(e, dict) and "error" in e for e in events) or stream.error, events[
            -3:
        ]
        assert "died" in s.log_tail(200)


@pytest.mark.timeout(120)
def test_a_worker_killed_while_idle_ends_the_server_at_once():
    # nothing steps, so no step meets the dead rank: the idle loop's check must (before, the
    # server answered /health for 3 s until the watcher's last-resort exit ended it)
    with coserve_serve("gen", "--model", "tiny-dense", "--max-model-len", "512", *_COMMON) as s:
        os.kill(_worker_pids(s)[0], signal.SIGKILL)
        t0 = time.monotonic()
        assert s.proc.wait(10) == 1, s.log_tail()
        assert time.monotonic() - t0 < 2.5, s.log_tail()
        log = s.log_tail(200)
        assert "WorkerDied" in log and "has not shut down" not in log, log


@pytest.mark.timeout(120)
def test_a_worker_that_dies_during_the_drain_makes_the_exit_code_1():
    with coserve_serve("gen", "--model", "tiny-dense", "--max-model-len", "2048", *_COMMON) as s:
        stream = long_stream(s)
        workers = _worker_pids(s)
        os.kill(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "draining" not in s.log_tail(50) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(workers[0], signal.SIGKILL)
        assert s.proc.wait(15) == 1, s.log_tail()
        assert "the engine failed while stopping" in s.log_tail(200)
        stream.join(10)
        assert stream.token_count() < 2000


@pytest.mark.timeout(120)
def test_tp2_expert_parallel_server_answers():
    with coserve_serve(
        "gen", "--model", "tiny-moe", "--max-model-len", "512", "--enable-expert-parallel", *_COMMON
    ) as s:
        status, body = post(
            s.url + "/v1/completions",
            {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        assert "expert parallel" in s.log_tail(400)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [3, 99999])
def test_a_tp_size_the_model_cannot_be_split_by_is_one_line_and_exit_2(size):
    # refused before any rank starts: 99999 started that many processes, and each rank said
    # the same error again
    proc = subprocess.run(
        [sys.executable, "-m", "coserve", "serve", "gen", "--model", "tiny-dense"]
        + ["--random-weights", "--device", "cpu", "--tensor-parallel-size", str(size)]
        + ["--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"num_attention_heads (4) is not divisible by tensor_parallel_size {size}" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr and " rank1 " not in proc.stderr, proc.stderr
    assert "tensor parallel:" not in proc.stderr, proc.stderr  # no worker was started


@pytest.mark.timeout(120)
def test_a_worker_killed_at_start_up_ends_the_server_with_its_reason():
    # Rank 0 then waits in the group's rendezvous, which nothing ends but the watcher's exit;
    # its stacks said "between steps" and told nothing new.
    proc = subprocess.Popen(
        [sys.executable, "-m", "coserve", "serve", "gen", "--model", "tiny-dense", *_COMMON]
        + ["--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # the worker is the engine process's child; it needs a second or more to import
        # torch and join, and is killed within ~10 ms of its start
        worker, deadline = None, time.monotonic() + 60
        while worker is None and time.monotonic() < deadline:
            grandchildren = set().union(*map(descendants, descendants(proc.pid)))
            worker = next(iter(grandchildren), None)
            time.sleep(0.01)
        assert worker is not None, "no worker started"
        os.kill(worker, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert f"pid {worker}) died (exit code -9)" in out, out
    assert "the engine failed while starting" in out and "while loading" in out, out
    assert "Thread 0x" not in out and "between steps" not in out, out
