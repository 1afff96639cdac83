"""A SIGTERM or Ctrl-C that lands while the engine process is being spawned waits until the
spawn has handed the child its start-up data, then reaches its handler as before."""

from __future__ import annotations

import os
import signal

import pytest

from coserve.server.engine_client import start_holding_signals


class Spawn:
    """A process whose start() is signalled half-way, as `serve colocated` was by a SIGTERM
    while it spawned its engine process (the child: "EOFError: Ran out of input")."""

    def __init__(self, signum: int):
        self.signum = signum
        self.handed_over = False

    def start(self) -> None:
        os.kill(os.getpid(), self.signum)
        self.handed_over = True


def _quit(signum, frame):
    raise SystemExit(0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_spawn_waits_for_it_then_reaches_its_handler(signum):
    old = signal.signal(signum, _quit)
    try:
        proc = Spawn(signum)
        deliver = start_holding_signals(proc)
        assert proc.handed_over
        assert signal.getsignal(signum) is _quit  # the handler is back
        with pytest.raises(SystemExit):
            deliver()
    finally:
        signal.signal(signum, old)


def test_without_a_signal_nothing_is_delivered():
    proc = Spawn(signal.SIGTERM)
    proc.start = lambda: setattr(proc, "handed_over", True)
    deliver = start_holding_signals(proc)
    assert proc.handed_over
    deliver()


def test_the_default_disposition_of_a_held_ctrl_c_still_interrupts():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        deliver = start_holding_signals(Spawn(signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            deliver()
    finally:
        signal.signal(signal.SIGINT, old)
