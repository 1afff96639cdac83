"""The engine core's loop with an embed engine whose passes overlap (a GPU pass simulated on
the CPU engine): a request that arrives while a pass runs, with nothing queued behind it,
is queued behind that pass, not after it."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time

import pytest

from coserve.engine import embed_engine
from coserve.engine.embed_engine import EmbedEngine
from coserve.engine.messages import Add, NewEmbed, Step, Stop
from coserve.engine.types import EngineArgs
from coserve.server import engine_core

PASS_S = 0.4  # how long a simulated pass runs unless something waits for it


class _Pass:
    """A CUDA event of a pass that runs PASS_S seconds; waiting for it ends it."""

    def __init__(self):
        self.done_at = time.monotonic() + PASS_S

    def query(self) -> bool:
        return time.monotonic() >= self.done_at

    def synchronize(self) -> None:
        self.done_at = min(self.done_at, time.monotonic())


@pytest.fixture
def engine(monkeypatch):
    e = EmbedEngine(EngineArgs(model="tiny-embed", random_weights=True))
    launches: list[int] = []  # per launch: passes still running when it was queued
    passes: list[_Pass] = []
    launch = e._launch

    def simulated(batch):
        flight = launch(batch)
        if flight is None:
            return None
        launches.append(sum(not p.query() for p in passes))
        passes.append(_Pass())
        return embed_engine._InFlight(flight.batch, flight.vectors, passes[-1])

    monkeypatch.setattr(e, "_launch", simulated)
    e.launches = launches
    return e


def _serve(engine):
    front, core = multiprocessing.Pipe()
    thread = threading.Thread(target=engine_core.serve_pipe, args=(engine, core), daemon=True)
    thread.start()
    return front, thread


def _answers(front, ids: set[str], timeout_s: float = 10.0) -> set[str]:
    got: set[str] = set()
    end = time.monotonic() + timeout_s
    while got != ids and front.poll(max(0.0, end - time.monotonic())):
        msg = pickle.loads(front.recv_bytes())
        if isinstance(msg, Step):
            got |= {o.request_id for o in msg.outputs}
    return got


def test_a_request_arriving_during_a_pass_is_queued_behind_it(engine):
    front, thread = _serve(engine)
    try:
        front.send_bytes(pickle.dumps([Add(1, [NewEmbed("a", [[5] * 20])])]))
        time.sleep(PASS_S / 4)  # "a" runs; the loop must not sit waiting for it
        front.send_bytes(pickle.dumps([Add(2, [NewEmbed("b", [[6] * 20])])]))
        assert _answers(front, {"a", "b"}) == {"a", "b"}
        assert engine.launches == [0, 1]  # "b" went in while "a" still ran
    finally:
        front.send_bytes(pickle.dumps([Stop()]))
        thread.join(5)
    assert not thread.is_alive()


def test_without_overlap_the_loop_waits_for_each_pass(engine):
    """The guard's pauses turn overlap off: then each step answers its own pass."""
    engine.overlap = False
    front, thread = _serve(engine)
    try:
        front.send_bytes(pickle.dumps([Add(1, [NewEmbed("a", [[5] * 20])])]))
        assert _answers(front, {"a"}) == {"a"}
        front.send_bytes(pickle.dumps([Add(2, [NewEmbed("b", [[6] * 20])])]))
        assert _answers(front, {"b"}) == {"b"}
        assert engine.launches == [0, 0]
    finally:
        front.send_bytes(pickle.dumps([Stop()]))
        thread.join(5)
