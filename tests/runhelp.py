"""Helpers for tests that run a real `coserve run` (tiny-dense on CPU, loopback) as a user
would: its own session, output read line by line, its servers found by their working folder."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_spec(conditions: str = "", *, duration_s: float = 0.5, name: str = "tiny") -> str:
    """A one-server spec: tiny-dense on the CPU, a short window, no telemetry. `conditions`:
    the [[conditions]] tables (default: one, gen-only)."""
    return f"""
name = "{name}"
repetitions = 1
[servers.gen]
model = "tiny-dense"
device = "cpu"
max_model_len = 128
max_num_seqs = 4
ready_timeout_s = 60
[load]
gen_concurrency = 2
input_len = 8
output_len = 8
warmup_s = 0
duration_s = {duration_s}
[telemetry]
enabled = false
{conditions or "[[conditions]]" + chr(10) + 'name = "gen-only"' + chr(10) + 'servers = ["gen"]'}
"""


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


class CoserveRun:
    """`python -P -m coserve run ARGS` in a new session, SIGINT inherited as ignored (as a
    non-interactive shell starts `cmd &`), output collected line by line."""

    def __init__(self, args: list[str], cwd: Path):
        self.cwd = Path(cwd)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "coserve", "run", *args],
            cwd=cwd,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in ln for ln in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None and self._q.empty():
                raise AssertionError(f"{text!r} never printed; output:\n{self.output}")
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def processes_in(cwd: Path) -> list[str]:
    """'PID cmdline' of every process whose working folder is `cwd` (the runner and the
    servers it started; nothing else on the machine)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if Path(os.readlink(p / "cwd")) == Path(cwd).resolve():
                cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append(f"{p.name} {cmdline}")
        except OSError:
            continue
    return out
