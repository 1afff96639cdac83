"""A controllable OpenAI-compatible server for testing load generators.

It streams completions at a known rate (first token `ttft_ms` after the request arrives,
then one chunk every `itl_ms`), answers embeddings (float or base64) after a known latency,
and can fail on purpose (a non-2xx answer on every Nth request, or a connection dropped
mid-stream). It does no model work at all, so what a client measures against it is the
client's own error.

Run it in its own process so that its event loop does not share a core with the client:

    python3 -m coserve.bench.stream_server --port 8000 --ttft-ms 50 --itl-ms 10

or from Python (tests, benchmarks): ``with spawn(ttft_ms=50, itl_ms=10) as srv: srv.url``.

It also answers `/v1/chat/completions` the same way (a role chunk, then one `delta.content`
chunk per token). Modules: stream_config.py (what it answers), stream_core.py (the answers),
stream_http.py (the protocol).

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies, chunked SSE answers) on
a bare asyncio protocol: an aiohttp server tops out at a few tens of thousands of SSE
writes per second on one core, well below what the load generator has to be shown to take.
Chunks leave up to 1 ms late (asyncio's timer granularity), or within some 20 us of their
time with `--precise` (see `_PreciseEpollSelector`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, fields

from coserve.bench.stream_config import StreamServerConfig
from coserve.bench.stream_core import StreamServer
from coserve.bench.stream_http import new_event_loop

__all__ = ["StreamServerConfig", "StreamServer", "spawn", "SpawnedServer", "main"]


# --------------------------------------------------------------------------- running it


def _listen_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if n > 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]  # the others join the port the first one got
        s.listen(4096)
        s.setblocking(False)
        socks.append(s)
    return socks


def _serve_socket(cfg: StreamServerConfig, sock: socket.socket, on_ready=None) -> None:
    loop = new_event_loop(cfg.precise)
    asyncio.set_event_loop(loop)
    server = StreamServer(cfg, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    async def run():
        await server.start(sock)
        gc.collect()  # then keep the collector from pausing chunk timers (see loadgen)
        gc.freeze()
        gc.set_threshold(100_000, 50, 1000)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        await server.close()
        if cfg.stats_dir:
            path = os.path.join(cfg.stats_dir, f"stream-server-{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump(server.stats(), f)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def serve(cfg: StreamServerConfig, ready_file=None) -> None:
    """Run the server in this process (and `cfg.workers - 1` forked ones sharing its port
    through SO_REUSEPORT) until SIGINT/SIGTERM."""
    socks = _listen_sockets(cfg.host, cfg.port, max(1, cfg.workers))
    port = socks[0].getsockname()[1]

    def ready():
        print(f"coserve stream server listening on http://{cfg.host}:{port}", flush=True)
        if ready_file:
            with open(ready_file, "w") as f:
                f.write(str(port))

    if len(socks) == 1:
        _serve_socket(cfg, socks[0], ready)
        return
    pids = []
    for i, sock in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            for j, other in enumerate(socks):
                if j != i:
                    other.close()
            try:
                _serve_socket(cfg, sock)
            finally:
                os._exit(0)
        pids.append(pid)
    for sock in socks:
        sock.close()
    stopping = []

    def forward(sig, _frame):
        stopping.append(sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready()  # the sockets listen already: connections queue until a worker accepts
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m coserve.bench.stream_server", description=__doc__.split("\n\n")[0]
    )
    d = StreamServerConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0: any free port (printed)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--ttft-ms", type=float, default=d.ttft_ms)
    p.add_argument("--itl-ms", type=float, default=d.itl_ms)
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per completion, whatever max_tokens says"
    )
    p.add_argument("--tokens-per-chunk", type=int, default=d.tokens_per_chunk)
    p.add_argument("--token-ids", action="store_true", help="send token_ids in each chunk")
    p.add_argument(
        "--no-usage", dest="usage", action="store_false", help="never send the final usage chunk"
    )
    p.add_argument("--embed-latency-ms", type=float, default=d.embed_latency_ms)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=d.fail_status)
    p.add_argument("--fail-message", default=d.fail_message)
    p.add_argument("--drop-every", type=int, default=0)
    p.add_argument("--drop-after", type=int, default=d.drop_after)
    p.add_argument(
        "--drop-as-error",
        action="store_true",
        help="end the dropped streams with an error event, not a cut connection",
    )
    p.add_argument(
        "--slow-every",
        type=int,
        default=0,
        help="every Nth request (per endpoint) is answered --slow-ms later",
    )
    p.add_argument("--slow-ms", type=float, default=d.slow_ms)
    p.add_argument(
        "--embed-answer-encoding",
        choices=("float", "base64"),
        default=None,
        help="answer embeddings in this encoding whatever was asked",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--precise",
        action="store_true",
        help="spin rather than sleep when a chunk is due within 1 ms (exact timing, one busy core)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port, for rates one core cannot write",
    )
    p.add_argument(
        "--stats-dir",
        default=None,
        help="on exit, each process writes its counts and chunk lateness here",
    )
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    ready_file = args.pop("ready_file")
    serve(StreamServerConfig(**args), ready_file)
    return 0


class SpawnedServer:
    """A stream server in a child process. Use as a context manager; `url` is its base URL."""

    def __init__(self, proc: subprocess.Popen, url: str, cfg: StreamServerConfig):
        self.proc = proc
        self.url = url
        self.cfg = cfg
        self.port = int(url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def spawn(timeout: float = 20.0, **options) -> SpawnedServer:
    """Start `python3 -m coserve.bench.stream_server` with StreamServerConfig `options`
    (port 0 by default: a free port) and wait until it listens."""
    cfg = StreamServerConfig(**options)
    argv = [sys.executable, "-m", "coserve.bench.stream_server"]
    defaults = StreamServerConfig()
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v == getattr(defaults, f.name) and f.name != "port":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("token_ids", "precise", "drop_as_error"):
            argv += [flag] if v else []
        elif f.name == "usage":
            argv += [] if v else ["--no-usage"]
        elif v is not None:
            argv += [flag, str(v)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on " in line:
            url = line.strip().rsplit(" ", 1)[1]
            return SpawnedServer(proc, url, cfg)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(
        f"stream server did not start (exit {proc.returncode}, last line {line!r}; "
        f"config {asdict(cfg)})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
