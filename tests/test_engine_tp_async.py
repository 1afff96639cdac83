"""Async scheduling (a greedy decode step launched before the previous step's tokens reach
the host, its input ids fed from the device) gives the tokens the synchronous path gives, at
TP=1 and TP=2 (gloo), through requests that finish or are aborted while a step is in flight;
and a TP=2 engine whose worker is killed fails its next step at once and shuts down."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_server_util import gone_within, running

from coserve.engine.gen_engine import GenEngine
from coserve.engine.tp_workers import WorkerDied
from coserve.engine.types import EngineArgs, SamplingParams


def _engine(tp: int, async_on: bool, model: str = "tiny-moe") -> GenEngine:
    return GenEngine(
        EngineArgs(
            model=model,
            random_weights=True,
            max_num_seqs=8,
            tensor_parallel_size=tp,
            async_scheduling=async_on,
        )
    )


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 20))] for _ in range(n)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp", [1, 2])
def test_async_gives_the_sync_tokens(tp):
    prompts = _prompts(6)
    # different lengths: sequences finish while the step after theirs is already launched
    params = [
        SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True)
        for i in range(len(prompts))
    ]
    got = {}
    for async_on in (False, True):
        engine = _engine(tp, async_on)
        try:
            got[async_on] = [r.token_ids for r in engine.generate(prompts, params)]
            fed = engine.runner.fed_steps
            assert engine.blocks.num_free == engine.blocks.num_blocks  # all freed
        finally:
            engine.shutdown()
        assert (fed > 0) == async_on
    assert got[True] == got[False]
    assert [len(t) for t in got[True]] == [p.max_tokens for p in params]


def _run_with_abort(async_on: bool) -> tuple[dict[str, list[int]], int, int]:
    engine = _engine(1, async_on)
    try:
        tokens: dict[str, list[int]] = {}
        for i, p in enumerate(_prompts(4)):
            engine.add_request(
                f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            )
            tokens[f"r{i}"] = []
        aborted_at = None
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            if aborted_at is None and len(tokens["r1"]) >= 4:
                engine.abort("r1")
                aborted_at = len(tokens["r1"])
        return tokens, aborted_at, engine.blocks.num_free
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
def test_abort_while_a_step_is_in_flight():
    sync, sync_at, sync_free = _run_with_abort(False)
    asyn, async_at, async_free = _run_with_abort(True)
    assert len(asyn["r1"]) == async_at  # nothing for it after the abort
    for rid in ("r0", "r2", "r3"):
        assert len(asyn[rid]) == 12 and asyn[rid] == sync[rid]
    assert asyn["r1"] == sync["r1"][:async_at] and async_free == sync_free


@pytest.mark.timeout(120)
def test_a_killed_worker_fails_the_next_step_and_shutdown_is_quick():
    engine = _engine(2, True, model="tiny-dense")
    try:
        for i, p in enumerate(_prompts(4)):
            engine.add_request(
                f"r{i}", p, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            )
        for _ in range(3):
            engine.step()
        worker = engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDied, match="died"):
            while time.monotonic() - t0 < 10:
                engine.step()
        assert time.monotonic() - t0 < 5
    finally:
        t1 = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - t1 < 5


@pytest.mark.timeout(120)
def test_clean_shutdown_ends_the_worker_without_a_kill(caplog):
    engine = _engine(2, True, model="tiny-dense")
    worker = engine.workers.procs[0]
    engine.generate(_prompts(2), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    t0 = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - t0 < 5
    assert worker.exitcode == 0
    assert "did not exit" not in caplog.text


_NEVER_SHUTS_DOWN = """
import os, signal, time
from coserve.engine.gen_engine import GenEngine
from coserve.engine.types import EngineArgs
if __name__ == "__main__":  # the worker is spawned: it imports this file
    engine = GenEngine(EngineArgs(model="tiny-dense", random_weights=True, max_num_seqs=4,
                                  tensor_parallel_size=2))
    print("built", flush=True)
    os.kill(engine.workers.procs[0].pid, signal.SIGKILL)
    time.sleep(30)  # a rank 0 stuck anywhere: it never calls shutdown()
    print("still here", flush=True)
"""


def _script(tmp_path, source: str) -> subprocess.Popen:
    """`source` run as a script of its own (the TP workers it spawns import it), pipes open."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.timeout(120)
def test_rank0_that_never_shuts_down_exits_on_its_own_after_a_worker_dies(tmp_path):
    p = _script(tmp_path, _NEVER_SHUTS_DOWN)
    assert p.stdout.readline().strip() == "built"
    t0 = time.monotonic()
    out, err = p.communicate(timeout=20)
    assert p.returncode == 1, err
    assert time.monotonic() - t0 < 3 + 2  # DEAD_EXIT_S plus the exit itself
    assert "still here" not in out
    assert "has not shut down 3 s after" in err and "between steps" in err
    assert "Thread 0x" in err  # the stacks say where it was


_HOLDS_A_WORKER = """
import time
from coserve.engine.gen_engine import GenEngine
from coserve.engine.types import EngineArgs
if __name__ == "__main__":
    engine = GenEngine(EngineArgs(model="tiny-dense", random_weights=True, max_num_seqs=4,
                                  tensor_parallel_size=2))
    print(engine.workers.procs[0].pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(120)
def test_a_stopped_worker_dies_with_rank0(tmp_path):
    # A SIGSTOPped worker cannot run its own watch of rank 0: the kernel's parent-death
    # signal must end it when rank 0 is killed, or it is left behind for good.
    p = _script(tmp_path, _HOLDS_A_WORKER)
    worker = int(p.stdout.readline())
    try:
        os.kill(worker, signal.SIGSTOP)
        p.kill()
        p.wait(10)
        assert gone_within([worker], 5)
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)


_STOPS_A_WORKER = """
import os, signal, sys
from coserve.engine import tp_workers
from coserve.engine.gen_engine import GenEngine
from coserve.engine.types import EngineArgs, SamplingParams
if __name__ == "__main__":
    tp_workers.STEP_TIMEOUT_S = 1.0
    engine = GenEngine(EngineArgs(model="tiny-dense", random_weights=True, max_num_seqs=4,
                                  tensor_parallel_size=2))
    worker = engine.workers.procs[0].pid
    print(worker, flush=True)
    os.kill(worker, signal.SIGSTOP)
    try:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    except tp_workers.WorkerDied as e:
        print("failed:", e, flush=True)
        engine.shutdown()
        sys.exit(0)
    print("generated", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_step_that_never_finishes_fails_the_engine(tmp_path):
    # A stopped worker leaves rank 0 in a collective (gloo here, a GPU wait on CUDA) with no
    # error: past STEP_TIMEOUT_S the engine fails, and whichever way rank 0 leaves (the step
    # raising, or the watcher's exit when it cannot), the stopped worker goes too.
    p = _script(tmp_path, _STOPS_A_WORKER)
    worker = int(p.stdout.readline())
    try:
        t0 = time.monotonic()
        out, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 1 + 3 + 5 + 3, err  # timeout, DEAD_EXIT_S, kill, exit
        assert "generated" not in out
        assert "no tensor-parallel step finished in" in err, err
        assert gone_within([worker], 5)
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)
        p.kill()
