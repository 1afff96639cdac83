"""Shared by the server tests (no tests here): `coserve serve` subprocesses that are always
killed (own process group), plain HTTP helpers, and fake engines for what a real engine does
not do on demand (fail mid-step, step slowly)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

from coserve.engine.tokenizer import ByteTokenizer
from coserve.engine.types import EmbedOutput, RequestOutput

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# ---- server processes -------------------------------------------------------------------
class ServerProcess:
    """A server started in its own session; `url` once its ready line is printed."""

    def __init__(self, argv: list[str], ready_timeout_s: float = 120.0, env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix="coserve-serve-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.stdout: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = None
        deadline = time.monotonic() + ready_timeout_s
        while self.url is None:
            try:
                line = self.stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(
                    f"server not ready after {ready_timeout_s} s:\n{self.log_tail()}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"server exited with {self.proc.wait()} before ready:\n{self.log_tail()}"
                )
            if " ready at " in line:
                self.ready_line = line.strip()
                self.url = line.split(" ready at ", 1)[1].split()[0]

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.stdout.put(line)
        self.stdout.put(None)

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text().splitlines(True)[-n:])

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGTERM, then SIGKILL to the whole group; never leaves a process behind."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)
        self.proc.wait()
        os.unlink(self.log.name)


@contextmanager
def coserve_serve(*args: str, ready_timeout_s: float = 120.0, env: dict | None = None):
    """`coserve serve ARGS --port 0` on loopback; yields the ServerProcess."""
    server = ServerProcess(
        [sys.executable, "-m", "coserve", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
        ready_timeout_s,
        env,
    )
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def fake_serve(kind: str, **engine_kwargs):
    """The real HTTP server (coserve.server.app.serve) over a fake engine in its engine
    process, in a subprocess."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_server_util as u; "
        f"u.serve_fake({kind!r}, {engine_kwargs!r})"
    )
    server = ServerProcess([sys.executable, "-c", code], 60.0)
    try:
        yield server
    finally:
        server.kill()


def serve_fake(kind: str, engine_kwargs: dict) -> None:
    import asyncio
    import functools
    import logging

    from coserve.server.app import ServeOptions, serve
    from coserve.server.engine_client import start_engine

    logging.basicConfig(level="INFO")
    shutdown_timeout_s = engine_kwargs.pop("shutdown_timeout_s", 5.0)
    core_stop_s = engine_kwargs.pop("core_stop_s", None)
    factory = functools.partial(
        FakeGenEngine if kind == "gen" else FakeEmbedEngine, **engine_kwargs
    )
    engine = start_engine(factory)
    if core_stop_s is not None:
        # the server's 30 s wait for a stuck core, shortened: the kill path is the same
        stop = engine.stop
        engine.stop = lambda timeout_s=30.0: stop(timeout_s=min(timeout_s, core_stop_s))
    opts = ServeOptions(
        kind=kind, served_names=["fake"], port=0, shutdown_timeout_s=shutdown_timeout_s
    )
    sys.exit(asyncio.run(serve(engine, opts)))


# ---- plain HTTP -------------------------------------------------------------------------
def request(
    url: str, method: str = "GET", body=None, headers: dict | None = None, timeout: float = 60.0
):
    """(status, parsed JSON or text) without raising on error statuses."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    try:
        conn.request(
            method,
            u.path or "/",
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        raw = resp.read().decode()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def post(url: str, body, headers: dict | None = None):
    return request(url, "POST", body, headers)


def sse_events(url: str, body: dict, headers: dict | None = None) -> list:
    """POST a streaming request; the parsed `data:` events up to and including '[DONE]'."""
    status, text = post(url, body, headers)
    assert status == 200, text
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class StreamInThread:
    """A streaming completion read event by event in a thread of its own; `first` is set once
    the first event (or an error) has come."""

    def __init__(self, url: str, body: dict):
        self.events: list = []
        self.error: Exception | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict) -> None:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        try:
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps({**body, "stream": True}),
                {"Content-Type": "application/json"},
            )
            for line in conn.getresponse():
                if line.startswith(b"data: "):
                    data = line[len(b"data: ") :].strip().decode()
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first.set()
        except Exception as e:  # noqa: BLE001 - kept for the test to assert on
            self.error = e
        finally:
            conn.close()
            self.first.set()

    def join(self, timeout_s: float = 30.0) -> list:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.events

    def token_count(self) -> int:
        return sum(
            len(e["choices"][0]["token_ids"])
            for e in self.events
            if isinstance(e, dict) and e.get("choices")
        )

    def finish_reason(self):
        return self.events[-2]["choices"][0]["finish_reason"] if len(self.events) >= 2 else None


def metrics_page(url: str) -> str:
    status, text = request(url + "/metrics")
    assert status == 200
    return text


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    out = {}
    for line in metrics_page(url).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(url: str, name: str, absent_is_zero: bool = False, **labels) -> float:
    """Sum of samples of `name` whose labels include `labels`.

    Raises AssertionError if the page has no such sample: a metric the server stopped exporting
    must fail the test, not read as 0. `absent_is_zero=True` is for one labelled sample of a
    counter that Prometheus omits until its first increment (`requests_total{outcome="aborted"}`
    before any abort); the family itself must still be on the page."""
    page = metrics_page(url)
    assert f"# TYPE {name} " in page, f"/metrics has no metric {name}"
    want = [f'{k}="{v}"' for k, v in labels.items()]
    found = [
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line
        and not line.startswith("#")
        and line.split("{")[0].split(" ")[0] == name
        and all(w in line.rsplit(" ", 1)[0] for w in want)
    ]
    assert found or absent_is_zero, f"/metrics has no sample of {name} with labels {labels}"
    return sum(found)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def running(pid: int) -> bool:
    """Running or stopped: not gone and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def gone_within(pids, timeout_s: float) -> bool:
    """Whether every one of `pids` has ended (or is a zombie) within `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- fake engines -----------------------------------------------------------------------
class FakeGenEngine:
    """Token k of a completion is (last prompt token + k + 1) % 256; token 0 is EOS."""

    def __init__(
        self,
        max_model_len: int = 4096,
        step_s: float = 0.002,
        fail_after_steps: int | None = None,
        load_s: float = 0.0,
    ):
        time.sleep(load_s)  # a model that takes this long to load
        self.model_name = "fake-gen"
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.step_s = step_s
        self.fail_after_steps = fail_after_steps
        self.steps = 0
        self.reqs: dict = {}

    def add_request(self, request_id, prompt_token_ids, params):
        if any(t >= 256 for t in prompt_token_ids):
            raise ValueError("token id out of vocabulary (256)")
        self.reqs[request_id] = (prompt_token_ids, params, [])

    def shutdown(self):  # the engine interface: real engines stop their TP ranks here
        pass

    def abort(self, request_id):
        self.reqs.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.reqs)

    def step(self):
        self.steps += 1
        if self.fail_after_steps is not None and self.steps > self.fail_after_steps:
            raise RuntimeError("fake engine failure")
        time.sleep(self.step_s)
        outs = []
        for rid, (prompt, params, done) in list(self.reqs.items()):
            tok = (prompt[-1] + len(done) + 1) % 256
            done.append(tok)
            if tok == 0 and not params.ignore_eos:
                reason = "stop"
            else:
                reason = "length" if len(done) >= params.max_tokens else None
            if reason:
                del self.reqs[rid]
            outs.append(
                RequestOutput(rid, [tok], reason is not None, reason, len(prompt), len(done))
            )
        return outs

    def stats(self):
        return {
            "num_running": len(self.reqs),
            "num_waiting": 0,
            "kv_cache_usage": 0.0,
            "num_preemptions": 0,
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "kv_capacity_tokens": 4096,
        }


class FakeEmbedEngine:
    def __init__(self, dim: int = 4):
        self.model_name = "fake-embed"
        self.max_model_len = 64
        self.tokenizer = ByteTokenizer()
        self.dim = dim
        self.reqs: dict = {}

    def add_request(self, request_id, inputs):
        self.reqs[request_id] = inputs

    def shutdown(self):  # the engine interface: real engines stop their TP ranks here
        pass

    def abort(self, request_id):
        self.reqs.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.reqs)

    def step(self):
        outs = [
            EmbedOutput(
                rid,
                [[float(len(x))] + [0.0] * (self.dim - 1) for x in inputs],
                sum(map(len, inputs)),
            )
            for rid, inputs in self.reqs.items()
        ]
        self.reqs.clear()
        return outs

    def stats(self):
        return {"num_running": 0, "num_waiting": len(self.reqs), "prompt_tokens_total": 0}
