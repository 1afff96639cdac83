"""`coserve serve colocated` on CPU: both engines in one engine process, each behind its own
endpoint, both answering at once, and a SIGTERM stops the lot."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_server_split import alive, children
from test_server_util import ROOT, ServerProcess, post, request, wait_for

pytestmark = pytest.mark.slow


def start(*extra: str) -> ServerProcess:
    return ServerProcess(
        [
            sys.executable,
            "-m",
            "coserve",
            "serve",
            "colocated",
            "--model",
            "tiny-dense",
            "--embed-model",
            "tiny-embed",
            "--random-weights",
            "--device",
            "cpu",
            "--max-model-len",
            "256",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--embed-port",
            "0",
            *extra,
        ],
        120.0,
    )


def engine_processes(front_pid: int) -> list[int]:
    return [
        p for p in children(front_pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def test_both_endpoints_from_one_engine_process():
    server = start()
    try:
        embed_line = server.stdout.get(timeout=30)
        assert "coserve serve embed: ready at " in embed_line
        assert server.ready_line.startswith("coserve serve gen: ready at ")
        embed_url = embed_line.split(" ready at ", 1)[1].split()[0]
        (core,) = wait_for(lambda: engine_processes(server.proc.pid), what="the engine process")

        results = {}

        def gen():
            results["gen"] = post(
                server.url + "/v1/completions",
                {"prompt": [1, 2], "max_tokens": 32, "ignore_eos": True},
            )

        t = threading.Thread(target=gen)
        t.start()
        status, body = post(embed_url + "/v1/embeddings", {"input": [[3, 4, 5], [6]]})
        t.join(60)
        assert status == 200 and len(body["data"]) == 2
        assert results["gen"][0] == 200 and results["gen"][1]["usage"]["completion_tokens"] == 32
        # each endpoint is the one kind
        assert post(server.url + "/v1/embeddings", {"input": "x"})[0] == 400
        assert post(embed_url + "/v1/completions", {"prompt": [1]})[0] == 400
        assert request(embed_url + "/metrics")[0] == 200
        # one process, one thread count: gen's one-thread default is for a process of its own
        log = Path(server.log.name).read_text()
        counts = re.findall(r"(gen|embed) engine on the CPU: (\d+) intra-op thread", log)
        assert {kind for kind, _ in counts} == {"gen", "embed"}, log
        torch_default = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert {n for _, n in counts} == {torch_default}, counts
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_tail()
        wait_for(lambda: not alive(core), what="the engine process to exit")
    finally:
        server.kill()


def test_sigterm_while_both_endpoints_are_busy_drains_them_and_exits_0():
    server = start()
    try:
        embed_url = server.stdout.get(timeout=30).split(" ready at ", 1)[1].split()[0]
        (core,) = wait_for(lambda: engine_processes(server.proc.pid), what="the engine process")
        gen: dict = {}
        embeds: list = []

        def one_gen():
            body = {"prompt": [1, 2], "max_tokens": 200, "ignore_eos": True}
            gen["r"] = post(server.url + "/v1/completions", body)

        def embed_loop():
            while True:
                try:
                    embeds.append(post(embed_url + "/v1/embeddings", {"input": [[3, 4]] * 8})[0])
                except OSError:  # the endpoint has stopped listening
                    return

        threads = [threading.Thread(target=one_gen), threading.Thread(target=embed_loop)]
        for t in threads:
            t.start()
        wait_for(lambda: embeds, what="an embed answer")
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_tail()
        for t in threads:
            t.join(30)
        assert gen["r"][0] == 200 and gen["r"][1]["usage"]["completion_tokens"] == 200
        assert 200 in embeds and set(embeds) <= {200, 503}  # 503: arrived while draining
        wait_for(lambda: not alive(core), what="the engine process to exit")
    finally:
        server.kill()


def test_sigterm_while_the_engines_load_stops_them_at_once_without_a_traceback():
    """The front waited 5 s for the engine process, which meanwhile finished loading and
    died on its `ready` to a closed pipe: a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "coserve", "serve", "colocated"]
        + ["--model", "tiny-dense", "--embed-model", "tiny-embed", "--random-weights"]
        + ["--device", "cpu", "--port", "0", "--embed-port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        (core,) = wait_for(lambda: engine_processes(proc.pid), what="the engine process")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "ready at" not in err
        wait_for(lambda: not alive(core), what="the engine process to exit")
    finally:
        proc.kill()


@pytest.mark.parametrize(
    "embed_model, message",
    [
        ("/no/such/model", "neither a preset nor a directory"),
        ("tiny-dense", "is a generative model, not an embedding one"),
    ],
)
def test_a_model_that_cannot_load_fails_both_and_says_which(embed_model, message):
    """Without a traceback: the front stops at the first pipe's `Failed` and closes the
    other, to which the engine process was still writing it (a BrokenPipeError)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coserve",
            "serve",
            "colocated",
            "--model",
            "tiny-dense",
            "--embed-model",
            embed_model,
            "--random-weights",
            "--device",
            "cpu",
            "--port",
            "0",
            "--embed-port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "coserve serve colocated: embed: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_needs_an_embed_model():
    proc = subprocess.run(
        [sys.executable, "-m", "coserve", "serve", "colocated", "--model", "tiny-dense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "colocated needs --embed-model" in proc.stderr


def refused(*extra: str) -> str:
    """stderr of a `serve colocated` with tiny models and `extra` that must exit 2 before
    loading either (within seconds: a load would take longer than the timeout allows)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coserve",
            "serve",
            "colocated",
            "--model",
            "tiny-dense",
            "--embed-model",
            "tiny-embed",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "coserve serve colocated: " in proc.stderr
    return proc.stderr


def test_green_contexts_are_refused_on_cpu_before_loading():
    stderr = refused("--device", "cpu", "--embed-sms", "32")
    assert "--embed-sms: green contexts are a CUDA feature; the device is cpu" in stderr


def test_an_sm_split_is_refused_on_cpu_before_loading():
    stderr = refused("--device", "cpu", "--embed-sms", "32", "--gen-sms", "64")
    assert "--gen-sms: SM partitions are a CUDA feature; the device is cpu" in stderr


def test_gen_sms_needs_embed_sms():
    stderr = refused("--device", "cpu", "--gen-sms", "64")
    assert "--gen-sms needs --embed-sms" in stderr


def _has_driver_bindings() -> bool:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_driver_bindings(), reason="cuda-bindings is installed here")
def test_an_sm_split_without_cuda_bindings_is_refused_before_loading():
    stderr = refused("--device", "cuda", "--embed-sms", "32", "--gen-sms", "64")
    assert "--gen-sms needs the cuda-bindings package" in stderr
