"""The engine in a process of its own: it dies with the server (SIGTERM, SIGKILL of the
front), a dead engine process ends the server, and the float JSON of embeddings reads back
to the very float32 values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_server_util import TESTS, fake_serve, post, wait_for

from coserve.server.float_json import float32_rows_json


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def engine_pid(front_pid: int) -> int:
    """The spawned engine process (not multiprocessing's resource tracker)."""

    def find():
        return [
            p
            for p in children(front_pid)
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]

    (pid,) = wait_for(find, what="the engine process")
    return pid


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")


def test_sigterm_stops_the_engine_process_too():
    with fake_serve("gen") as server:
        pid = engine_pid(server.proc.pid)
        assert post(server.url + "/v1/completions", {"prompt": [1], "max_tokens": 3})[0] == 200
        server.signal(signal.SIGTERM)  # the whole group, as a launcher or Ctrl-C does
        assert server.proc.wait(20) == 0
        wait_for(lambda: not alive(pid), what="the engine process to exit")


def test_engine_process_dies_with_a_killed_front():
    with fake_serve("gen") as server:
        pid = engine_pid(server.proc.pid)
        os.kill(server.proc.pid, signal.SIGKILL)  # the front only: no chance to clean up
        server.proc.wait(10)
        wait_for(lambda: not alive(pid), what="the orphaned engine process to exit")


def test_a_front_killed_while_the_model_loads_leaves_no_engine_process():
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_server_util as u; "
        "u.serve_fake('gen', {'load_s': 120})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        pid = engine_pid(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        wait_for(lambda: not alive(pid), what="the loading engine process to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_engine_process_ends_the_server_with_1():
    with fake_serve("gen", step_s=0.01) as server:
        pid = engine_pid(server.proc.pid)
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(20) == 1
        assert "the engine process exited" in server.log_tail(50)


def test_float_json_reads_back_to_the_same_float32():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((5, 300)) * 10.0 ** rng.integers(-40, 38, (5, 300))).astype(np.float32)
    v[0, :9] = [0.0, -0.0, 1.0, -1.0, 9.99999999, 1e-45, 3.4028235e38, 0.1, 123456789.0]
    v = np.where(np.isfinite(v), v, 1.0).astype(np.float32)
    rows = float32_rows_json(v)
    back = np.array([json.loads(r) for r in rows], dtype=np.float32)
    assert np.array_equal(back, v) and np.array_equal(np.signbit(back), np.signbit(v))
    assert np.isnan(
        json.loads(float32_rows_json(np.array([[np.nan, 1.0]], dtype=np.float32))[0])[0]
    )
