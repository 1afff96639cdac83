"""How a run hears that it must stop, and how its tear-down is kept whole.

A terminal's Ctrl-C is SIGINT to the whole foreground process group; a script's `kill -INT`
or `timeout -s INT` may reach only the runner. Either way the runner must raise
KeyboardInterrupt. A process started in the background by a non-interactive shell (`cmd &`,
`setsid cmd &`) inherits SIGINT as *ignored*, and Python then installs no handler at all:
the interrupt was silently dropped and the run went on to its end. `interruptible()` puts
the handler back whatever was inherited, and makes SIGTERM mean the same.

Servers run in their own sessions (launch.py), so a group-wide SIGINT does not reach them:
they are stopped by the tear-down, never by the signal, and a rep is never taken as finished
because its servers went away.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (even when SIGINT
    was inherited as ignored); the previous handlers are restored on the way out. Does nothing
    outside the main thread (signals are only delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
    }
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def no_interrupts() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM off while tearing down, so a second Ctrl-C cannot leave a
    server or daemon behind. Yields the list of signals that came in meanwhile."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)
