"""`coserve serve --tensor-parallel-size 2` on 2 GPUs, with each all-reduce: a killed worker
fails the stream in flight and ends the server within 5 s (issue 12: not a wait in a
collective until NCCL's timeout), SIGTERM ends every rank without a kill, and no rank listens
beyond loopback. The CPU (gloo) twins are in tests/test_engine_tp_server.py. Skipped without 2
GPUs and Triton."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from test_engine_tp_server import _worker_pids, assert_listens_on_loopback_only, long_stream
from test_server_util import coserve_serve, gone_within, post

from coserve.engine.kernels import ops

pytestmark = pytest.mark.gpu
if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and ops.twins_enabled()):
    pytest.skip("needs 2 CUDA GPUs and Triton", allow_module_level=True)

ALL_REDUCES = ["nccl", "symm-mem"]


def _serve(all_reduce: str, max_model_len: int):
    return coserve_serve(
        "gen",
        "--model",
        "tiny-dense",
        "--random-weights",
        "--device",
        "cuda",
        "--gpu-memory-utilization",
        "0.10",
        "--max-model-len",
        str(max_model_len),
        "--tensor-parallel-size",
        "2",
        "--tp-all-reduce",
        all_reduce,
        ready_timeout_s=180.0,
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("all_reduce", ALL_REDUCES)
def test_a_killed_worker_fails_the_stream_and_ends_the_server_on_gpus(all_reduce):
    # tiny-dense allows 2,048 positions; the kill lands right after the first token.
    with _serve(all_reduce, 2048) as s:
        stream = long_stream(s)
        os.kill(_worker_pids(s)[0], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            code = s.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after the kill:\n{s.log_tail(200)}")
        assert code == 1, s.log_tail()
        assert time.monotonic() - t0 < 5, s.log_tail(200)
        # the engine shut down by itself, not by the watchdog's last resort
        assert "has not shut down" not in s.log_tail(200), s.log_tail(200)
        stream.join(10)
        assert stream.token_count() < 2000
        assert "died" in s.log_tail(200)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("all_reduce", ALL_REDUCES)
def test_sigterm_ends_every_rank_without_a_kill_on_gpus(all_reduce):
    with _serve(all_reduce, 512) as s:
        status, body = post(
            s.url + "/v1/completions",
            {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body
        assert_listens_on_loopback_only(s)  # NCCL's sockets too (NCCL_SOCKET_IFNAME)
        workers = _worker_pids(s)
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log_tail()
        assert gone_within(workers, 5)
        assert "did not exit" not in s.log_tail(400)
