"""`coserve serve colocated` on a GPU: gen on a high-priority stream and embed on a green
context of a few SMs, or both on disjoint green contexts (`--gen-sms`: gen's CUDA graphs
captured in its own), both endpoints answering beside each other for many requests (a green
context whose Python object was dropped killed embed's loop at its first forward). GPU only."""

from __future__ import annotations

import signal
import threading

import pytest
import torch
from test_server_colocated import start
from test_server_util import post

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _has_driver_bindings() -> bool:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return True


SPLIT = pytest.param(
    ("--embed-sms", "16", "--gen-sms", "64"),
    id="split-16-64",
    marks=pytest.mark.skipif(not _has_driver_bindings(), reason="needs cuda-bindings"),
)


@pytest.mark.parametrize(
    "extra", [(), ("--embed-sms", "16"), SPLIT], ids=["priorities", "green-16", "split-16-64"]
)
def test_both_endpoints_serve_on_cuda(extra):
    # Both fit beside whatever else holds the card (the defaults, 0.9 + 0.3, would not).
    server = start(
        "--device",
        "cuda",
        "--gpu-memory-utilization",
        "0.2",
        "--embed-gpu-memory-utilization",
        "0.1",
        *extra,
    )
    try:
        embed_url = server.stdout.get(timeout=60).split(" ready at ", 1)[1].split()[0]
        gen = {}

        def generate():
            gen["out"] = post(
                server.url + "/v1/completions",
                {"prompt": [1, 2, 3], "max_tokens": 64, "ignore_eos": True},
            )

        t = threading.Thread(target=generate)
        t.start()
        for i in range(20):
            status, body = post(embed_url + "/v1/embeddings", {"input": [[i + 1, 2, 3]] * 8})
            assert status == 200, body
            assert len(body["data"]) == 8
        t.join(120)
        assert gen["out"][0] == 200 and gen["out"][1]["usage"]["completion_tokens"] == 64
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_tail()
    finally:
        server.kill()
