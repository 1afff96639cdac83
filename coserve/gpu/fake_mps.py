"""A stand-in for the MPS control daemon, for tests and for trying coserve's MPS code paths
on a machine without a GPU. Nothing in coserve uses it unless handed one.

`install_fake_mps_control(bin_dir)` writes an executable `nvidia-cuda-mps-control` that
behaves like the real one for what coserve uses (`-f`, `start_server -uid`,
`get_server_list`, `get_client_list`, `quit`), with a fake `nvidia-cuda-mps-server` child.
`FAKE_MPS_IGNORE_QUIT=1` makes it ignore quit and SIGTERM; `FAKE_MPS_FAIL_START=1` makes it
exit at start with a message.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path


def install_fake_mps_control(bin_dir: Path) -> Path:
    """Write an executable `nvidia-cuda-mps-control` into bin_dir; returns its path."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    path = bin_dir / "nvidia-cuda-mps-control"
    path.write_text(
        f"#!/bin/bash\nexport PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f"exec -a nvidia-cuda-mps-control {sys.executable} -m coserve.gpu.fake_mps "
        'mps-control "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _pipe_dir() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))


def _daemon() -> int:
    pipe = _pipe_dir()
    logd = Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps"))
    logd.mkdir(parents=True, exist_ok=True)
    log = open(logd / "control.log", "a", buffering=1)
    if os.environ.get("FAKE_MPS_FAIL_START"):
        print("fake MPS: failed to start (FAKE_MPS_FAIL_START)", flush=True)
        log.write("start failed\n")
        return 1
    ignore_quit = bool(os.environ.get("FAKE_MPS_IGNORE_QUIT"))
    servers: list[subprocess.Popen] = []

    def on_term(signo, frame):  # like the real daemon (seen on an H100): its server goes with it
        for s in servers:
            s.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_quit else on_term)
    pipe.mkdir(parents=True, exist_ok=True)
    sock_path = pipe / "control"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(8)
    (pipe / "nvidia-cuda-mps-control.pid").write_text(str(os.getpid()))
    log.write(
        f"[{time.time():.3f}] control daemon started pid {os.getpid()} CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')}\n"
    )
    while True:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            cmd = data.decode().strip()
            log.write(f"[{time.time():.3f}] command {cmd!r}\n")
            reply = ""
            if cmd == "get_server_list":
                reply = "\n".join(str(s.pid) for s in servers if s.poll() is None)
            elif cmd.startswith("start_server"):
                if not any(s.poll() is None for s in servers):
                    servers.append(
                        subprocess.Popen(
                            ["bash", "-c", "exec -a nvidia-cuda-mps-server sleep 1000000"]
                        )
                    )
                    log.write(f"server started pid {servers[-1].pid}\n")
            elif cmd.startswith("get_client_list"):
                reply = ""
            elif cmd == "quit":
                if ignore_quit:
                    conn.sendall(b"")
                    continue
                for s in servers:
                    s.terminate()
                for s in servers:
                    s.wait(5)
                conn.sendall(b"")
                conn.close()
                srv.close()
                sock_path.unlink(missing_ok=True)
                log.write("quit\n")
                return 0
            else:
                reply = f"Unknown command: {cmd}"
            conn.sendall((reply + "\n").encode() if reply else b"")


def _client(lines: list[str]) -> int:
    sock_path = _pipe_dir() / "control"
    for cmd in lines:
        cmd = cmd.strip()
        if not cmd:
            continue
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(str(sock_path))
        except OSError:
            print("Cannot find MPS control daemon process", file=sys.stderr)
            return 1
        with c:
            c.sendall((cmd + "\n").encode())
            out = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                out += chunk
        sys.stdout.write(out.decode())
    return 0


def mps_control_main(argv: list[str]) -> int:
    if argv and argv[0] in ("-f", "-d"):
        return _daemon()
    return _client(sys.stdin.read().splitlines())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "mps-control":
        raise SystemExit(mps_control_main(sys.argv[2:]))
    raise SystemExit("usage: python -m coserve.gpu.fake_mps mps-control [-f]")
