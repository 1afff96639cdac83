"""Launchers: command lines (builtin, vLLM, docker), and process handling with real
`coserve serve` processes: readiness on /health, early death with the log tail, time-out,
tear-down that leaves no process of the group, servers started one after the other."""

from __future__ import annotations

import os
import re
import socket
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from coserve.gpu.strategies import make_strategy
from coserve.launch import ServerFailed, ServerSpec, build_command, start_server, start_servers
from coserve.procs import group_alive


def group_gone(pgid: int, timeout_s: float = 5.0) -> bool:
    """No process of the group runs (a zombie has ended: init may reap it seconds later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return False


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- command lines ---------------------------------------------------------------------


def test_builtin_command_from_spec():
    spec = ServerSpec(
        role="gen",
        model="qwen3-30b-a3b",
        random_weights=True,
        device="cuda",
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        max_num_seqs=512,
        enforce_eager=True,
        extra_args=["--seed", "1"],
    )
    cmd = build_command(spec, 8000)
    assert cmd[:6] == [sys.executable, "-P", "-m", "coserve", "serve", "gen"]
    args = " ".join(cmd[6:])
    assert args == (
        "--model qwen3-30b-a3b --host 127.0.0.1 --port 8000 --random-weights --device cuda "
        "--gpu-memory-utilization 0.5 --max-model-len 4096 --max-num-seqs 512 --enforce-eager "
        "--seed 1"
    )
    tp = build_command(ServerSpec(role="embed", model="tiny-embed", tensor_parallel_size=2), 1)
    assert tp[tp.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in build_command(
        ServerSpec(role="embed", model="tiny-embed"), 1
    )


def test_vllm_command_with_the_studys_flags():
    gen = ServerSpec(
        role="gen",
        launcher="vllm",
        model="qwen3-30b-a3b",
        port=8000,
        gpu_memory_utilization=0.50,
        max_model_len=4096,
        max_num_seqs=512,
    )
    assert build_command(gen, 8000) == [
        "vllm",
        "serve",
        "Qwen/Qwen3-30B-A3B-FP8",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--gpu-memory-utilization",
        "0.5",
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "512",
    ]
    embed = ServerSpec(
        role="embed",
        launcher="vllm",
        model="qwen3-embedding-8b",
        gpu_memory_utilization=0.30,
        max_model_len=512,
        enforce_eager=True,
        tensor_parallel_size=2,
        random_weights=True,
        extra_args=["--max-num-batched-tokens", "8192"],
    )
    cmd = build_command(embed, 8001)
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen3-Embedding-8B"]
    s = " ".join(cmd)
    assert (
        "--gpu-memory-utilization 0.3 --max-model-len 512 --enforce-eager --tensor-parallel-size 2"
        in s
    )
    assert "--convert embed" in s and "--load-format dummy" in s
    assert cmd[-2:] == ["--max-num-batched-tokens", "8192"]  # passed through, last
    # a model path or HF id is passed as is; an explicit --convert is not doubled
    own = build_command(
        ServerSpec(
            role="embed", launcher="vllm", model="/models/x", extra_args=["--convert", "embed"]
        ),
        1,
    )
    assert own[2] == "/models/x" and own.count("--convert") == 1


def test_vllm_docker_form():
    spec = ServerSpec(
        role="gen",
        launcher="vllm",
        model="qwen3-30b-a3b",
        docker_image="vllm/vllm-openai:v0.15.1",
        max_model_len=4096,
    )
    env = {
        "CUDA_VISIBLE_DEVICES": "MIG-abc",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mps/pipe",
        "NCCL_NVLS_ENABLE": "0",
    }
    cmd = build_command(spec, 8000, env)
    s = " ".join(cmd)
    assert (
        cmd[:3] == ["docker", "run", "--rm"]
        and "--name coserve-gen-8000" in s
        and "--ipc=host" in s
    )
    assert '--gpus "device=MIG-abc"' in s
    assert "-e CUDA_MPS_PIPE_DIRECTORY=/run/mps/pipe -v /run/mps/pipe:/run/mps/pipe" in s
    assert "-e NCCL_NVLS_ENABLE=0" in s
    i = cmd.index("vllm/vllm-openai:v0.15.1")
    assert cmd[i + 1 : i + 3] == ["Qwen/Qwen3-30B-A3B-FP8", "--host"]


def test_spec_validation():
    with pytest.raises(ValueError, match="needs url"):
        build_command(ServerSpec(role="gen", launcher="external"), 1)
    with pytest.raises(ValueError, match="needs model"):
        build_command(ServerSpec(role="gen"), 1)
    with pytest.raises(ValueError, match="role 'rerank'"):
        build_command(ServerSpec(role="rerank", model="x"), 1)
    with pytest.raises(ValueError, match="launcher 'sglang'"):
        build_command(ServerSpec(role="gen", launcher="sglang", model="x"), 1)


# -- processes ---------------------------------------------------------------------------

TINY = dict(
    model="tiny-dense", random_weights=True, device="cpu", max_model_len=256, max_num_seqs=8
)


def test_real_server_ready_logged_external_and_torn_down(tmp_path):
    strat = make_strategy("exclusive", ["0", "1"], {}, tmp_path)
    env = strat.env_for("gen")
    log = tmp_path / "logs" / "gen.log"
    srv = start_server(ServerSpec(role="gen", **TINY), env, log, ready_timeout_s=120)
    try:
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as r:
            assert r.status == 200
        assert srv.alive()
        srv.check()
        head = log.read_text().splitlines()[:3]
        assert head[0].startswith("# coserve launch") and "serve gen --model tiny-dense" in head[1]
        assert "NCCL_NVLS_ENABLE=0" in head[2] and "CUDA_VISIBLE_DEVICES=0" in head[2]
        with open(f"/proc/{srv.pid}/environ", "rb") as f:
            penv = f.read().split(b"\0")
        assert b"NCCL_NVLS_ENABLE=0" in penv and b"CUDA_VISIBLE_DEVICES=0" in penv
        assert os.getpgid(srv.pid) == srv.pid  # its own process group
        # the same server, as an external one: readiness checked, nothing started or stopped
        ext = start_server(
            ServerSpec(role="gen", launcher="external", url=srv.url + "/"),
            {},
            tmp_path / "x.log",
            10,
        )
        assert ext.url == srv.url and ext.pid is None and ext.alive()
        assert ext.stop() is None and srv.alive()
    finally:
        rc = srv.stop(timeout_s=20)
    assert rc == 0  # graceful SIGTERM
    assert group_gone(srv.pgid)
    with pytest.raises(ServerFailed, match="did not answer /health within 1 s"):
        start_server(
            ServerSpec(role="gen", launcher="external", url=srv.url), {}, tmp_path / "x.log", 1
        )
    with pytest.raises(ServerFailed, match="died"):
        srv.check()


def test_server_that_dies_early_fails_with_its_log_tail(tmp_path):
    spec = ServerSpec(
        role="embed",
        model="tiny-embed",
        random_weights=True,
        device="cpu",
        extra_args=["--no-such-flag"],
    )
    t0 = time.monotonic()
    with pytest.raises(ServerFailed) as ei:
        start_server(spec, {}, tmp_path / "embed.log", ready_timeout_s=120)
    msg = str(ei.value)
    assert (
        "embed server (builtin" in msg
        and "exited before /health answered" in msg
        and "exit code 2" in msg
    )
    assert "unrecognized arguments: --no-such-flag" in msg  # the tail of its log
    assert time.monotonic() - t0 < 60


HANGER = textwrap.dedent("""
    import signal, subprocess, sys, time
    if sys.argv[1] == "serve":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # a server that ignores SIGTERM
    child = subprocess.Popen(["sleep", "1000"])             # and has a worker of its own
    print("child", child.pid, flush=True)
    if sys.argv[1] == "serve":
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404); self.end_headers()
            def log_message(self, *a): pass
        HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
    time.sleep(1000)
""")


def _child_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("child "):
            return int(line.split()[1])
    raise AssertionError(log.read_text())


def test_teardown_kills_the_whole_group(tmp_path):
    spec = ServerSpec(
        role="gen", launcher="command", extra_args=[sys.executable, "-c", HANGER, "serve", "{port}"]
    )
    log = tmp_path / "gen.log"
    srv = start_server(spec, {}, log, ready_timeout_s=30)
    child = _child_pid(log)
    assert not pid_gone(child)
    t0 = time.monotonic()
    srv.stop(timeout_s=1)
    assert time.monotonic() - t0 < 15
    assert group_gone(srv.pgid) and pid_gone(srv.pid) and pid_gone(child)


def test_not_ready_in_time(tmp_path):
    spec = ServerSpec(
        role="embed",
        launcher="command",
        extra_args=[sys.executable, "-c", HANGER, "hang", "{port}"],
    )
    log = tmp_path / "embed.log"
    with pytest.raises(
        ServerFailed, match=r"(?s)not ready: /health did not answer 200 within 2 s.*child \d+"
    ) as ei:
        start_server(spec, {}, log, ready_timeout_s=2)
    assert "embed.log" in str(ei.value)
    assert pid_gone(_child_pid(log))


def test_servers_start_one_after_the_other(tmp_path):
    specs = [
        ServerSpec(role="gen", **TINY),
        ServerSpec(
            role="embed", model="tiny-embed", random_weights=True, device="cpu", max_model_len=128
        ),
    ]
    servers = start_servers(specs, {"gen": {}, "embed": {}}, tmp_path, ready_timeout_s=120)
    try:
        gen_log = (tmp_path / "gen.log").read_text()
        embed_log = (tmp_path / "embed.log").read_text()
        assert "ready at" in gen_log and "ready at" in embed_log
        # embed was launched only after gen answered: its launch header is later than gen's
        # ready line
        gen_ready = (tmp_path / "gen.log").stat().st_mtime
        assert servers[0].alive() and servers[1].alive()
        assert gen_ready <= (tmp_path / "embed.log").stat().st_mtime
    finally:
        for s in servers:
            s.stop()
    assert all(group_gone(s.pgid) for s in servers)


def test_failed_second_server_stops_the_first(tmp_path, monkeypatch):
    import coserve.launch as launch

    started = []

    def recording_start_server(*args, **kwargs):
        srv = real_start_server(*args, **kwargs)
        started.append(srv)
        return srv

    real_start_server = launch.start_server
    monkeypatch.setattr(launch, "start_server", recording_start_server)
    specs = [
        ServerSpec(role="gen", **TINY),
        ServerSpec(role="embed", model="tiny-embed", device="cpu", extra_args=["--bad"]),
    ]
    with pytest.raises(ServerFailed, match="embed server"):
        start_servers(specs, {}, tmp_path, ready_timeout_s=120)
    [gen] = started  # gen came up; embed failed before start_server returned
    ready = re.search(r"ready at http://127\.0\.0\.1:(\d+)", (tmp_path / "gen.log").read_text())
    assert ready and int(ready.group(1)) == gen.port != 0  # the port the server really listened on
    assert group_gone(gen.pgid)  # ... and is gone, with every process of its group
    with pytest.raises(ConnectionRefusedError):  # nothing listens on its port any more
        socket.create_connection(("127.0.0.1", gen.port), timeout=2).close()


KILLED_PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from coserve.launch import ServerSpec, start_server
    args = [sys.executable, "-c", sys.argv[1], "serve", "{port}"]
    spec = ServerSpec(role="gen", launcher="command", extra_args=args)
    s = start_server(spec, {}, Path(sys.argv[2]), 30)
    print(s.pid, flush=True)
    time.sleep(60)
""")


def test_server_goes_when_coserve_is_killed_outright(tmp_path):
    """No tear-down runs after SIGKILL; servers are started with PR_SET_PDEATHSIG (SIGTERM)."""
    import subprocess

    log = tmp_path / "gen.log"
    p = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT, HELLO, str(log)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    pid = int(p.stdout.readline())
    p.kill()
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_gone(pid)


HELLO = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
""")


def test_python_command_finds_the_package_that_started_it(tmp_path):
    """A `{python} -P ...` command line gets the running package's root on PYTHONPATH, as the
    built-in launcher does: on the GPU machine coserve runs from an uninstalled source tree
    and `-P` hides the working folder (a co-located run failed with 'No module named coserve')."""
    probe = "import os, sys; print('PYTHONPATH=' + os.environ.get('PYTHONPATH', ''), flush=True)\n"
    args = ["{python}", "-P", "-c", probe + HELLO, "serve", "{port}"]
    spec = ServerSpec(role="gen", launcher="command", extra_args=args)
    log = tmp_path / "gen.log"
    server = start_server(spec, {}, log, 30)
    try:
        root = str(Path(__file__).resolve().parents[1] / "coserve")
        paths = next(x for x in log.read_text().splitlines() if x.startswith("PYTHONPATH="))
        roots = [str(Path(p) / "coserve") for p in paths.split("=", 1)[1].split(os.pathsep) if p]
        assert root in roots
    finally:
        server.stop()
