"""Start and stop model servers: ours (`coserve serve`), vLLM (`vllm serve`), or URLs.

    spec = ServerSpec(role="gen", launcher="builtin", model="tiny-dense", random_weights=True)
    with start_server(spec, env=strategy.env_for("gen"), log_path=run/"gen.log", ready_timeout_s=300) as srv:
        srv.url   # http://127.0.0.1:PORT, answering /health

Each server is its own process group (`start_new_session=True`), logs go to `log_path`
(command and added environment first), readiness is `GET /health` == 200 within
`ready_timeout_s`, a server that exits first raises ServerFailed with the tail of its log,
and `stop()` sends SIGTERM to the whole group, then SIGKILL, and waits until no process of
the group is left. Start servers one after the other (vllm#9198: two engines starting at
once on one GPU mis-size their KV caches) — `start_servers()` does that.

Launchers:
- builtin: `python -P -m coserve serve gen|embed --model ... --port ...` (flags from the spec;
  `-P`: the working folder is not put on sys.path, so a `coserve/` folder there cannot shadow
  the installed package; PYTHONPATH is still honoured)
- vllm: `vllm serve MODEL --port ... --gpu-memory-utilization ... --max-model-len ...
  --max-num-seqs ... [--enforce-eager] [--tensor-parallel-size N] [--convert embed]
  [--load-format dummy for random weights]` + extra_args; with `docker_image` set, the same
  arguments to `docker run --rm --gpus ... --ipc=host IMAGE` (stopped with `docker rm -f`)
- external: `url` only; readiness is checked, nothing is started or stopped
- command: `extra_args` is the whole command line, `{host}`, `{port}` and `{python}` (the
  Python running coserve) filled in (for other servers, `coserve serve colocated`, and tests)
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from coserve.gpu.mps import _group_alive, pdeathsig_preexec
from coserve.gpu.strategies import BASE_ENV

LAUNCHERS = ("builtin", "vllm", "external", "command")
ROLES = ("gen", "embed")
# Our presets -> the Hugging Face checkpoints the study served with vLLM.
VLLM_MODELS = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B-FP8",
    "qwen3-embedding-8b": "Qwen/Qwen3-Embedding-8B",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
_live: dict[int, RunningServer] = {}
_live_lock = threading.Lock()


class ServerFailed(RuntimeError):
    """A server that could not be started or died; the message carries the tail of its log."""


@dataclass
class ServerSpec:
    role: str
    launcher: str = "builtin"
    model: str | None = None
    url: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    device: str | None = None
    random_weights: bool = False
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)
    docker_image: str | None = None  # vllm launcher only: run `vllm serve` in this image
    vllm_bin: str = "vllm"
    # builtin embed only: the SLO guard reads this gen server (started first) and holds its
    # step p99 within gen_tpot_slo_ms, or gen_tpot_slo_pct over gen alone
    slo_guard_gen_url: str | None = None
    gen_tpot_slo_ms: float | None = None
    gen_tpot_slo_pct: float | None = None

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"server role {self.role!r}: expected one of {', '.join(ROLES)}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if self.launcher == "external":
            if not self.url:
                raise ValueError(f"{self.role}: launcher external needs url")
        elif self.launcher == "command":
            if not self.extra_args:
                raise ValueError(f"{self.role}: launcher command needs the command line in extra_args")
        elif not self.model:
            raise ValueError(f"{self.role}: launcher {self.launcher} needs model")
        if int(self.tensor_parallel_size) < 1:
            raise ValueError(f"{self.role}: tensor_parallel_size must be >= 1")
        if self.docker_image and self.launcher != "vllm":
            raise ValueError(f"{self.role}: docker_image is for launcher vllm only")
        if self.slo_guard_gen_url and (self.role, self.launcher) != ("embed", "builtin"):
            raise ValueError(f"{self.role}: the SLO guard is in the builtin embed server only")
        if self.slo_guard_gen_url and (self.gen_tpot_slo_ms is None) == (self.gen_tpot_slo_pct is None):
            raise ValueError(f"{self.role}: the SLO guard needs exactly one of gen_tpot_slo_ms and gen_tpot_slo_pct")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return s.getsockname()[1]


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def builtin_supports(flag: str) -> bool:
    """Does `coserve serve` take this flag (e.g. --tensor-parallel-size)?"""
    import argparse

    try:
        from coserve.server import command
    except Exception:
        return False
    p = argparse.ArgumentParser()
    try:
        command.add_arguments(p)
    except Exception:
        return False
    strings = {s for a in p._actions for s in a.option_strings}
    for a in p._actions:  # subcommands gen|embed
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                strings |= {s for b in sp._actions for s in b.option_strings}
    return flag in strings


def build_command(spec: ServerSpec, port: int, env: dict[str, str] | None = None) -> list[str]:
    """The argv that starts this server (not for launcher external)."""
    spec.validate()
    s = spec
    if s.launcher == "builtin":
        cmd = [sys.executable, "-P", "-m", "coserve", "serve", s.role, "--model", str(s.model), "--host", s.host, "--port", str(port)]
        if s.random_weights:
            cmd.append("--random-weights")
        if s.device:
            cmd += ["--device", s.device]
        if s.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}"]
        if s.max_model_len is not None:
            cmd += ["--max-model-len", str(s.max_model_len)]
        if s.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(s.max_num_seqs)]
        if s.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
        if s.slo_guard_gen_url:
            cmd += ["--slo-guard-gen-url", s.slo_guard_gen_url]
            cmd += (["--gen-tpot-slo-ms", f"{s.gen_tpot_slo_ms:g}"] if s.gen_tpot_slo_ms is not None
                    else ["--gen-tpot-slo-pct", f"{s.gen_tpot_slo_pct:g}"])
        # The built-in embed engine has no CUDA graphs, so its server refuses the flag; a
        # condition's enforce_eager still reaches gen (and both servers under vLLM).
        if s.enforce_eager and s.role == "gen":
            cmd.append("--enforce-eager")
        if s.tensor_parallel_size > 1:
            if not builtin_supports("--tensor-parallel-size"):
                raise ServerFailed(f"{s.role}: the built-in server has no --tensor-parallel-size; "
                                   f"use launcher vllm for TP={s.tensor_parallel_size}")
            cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        return cmd + list(s.extra_args)
    if s.launcher == "vllm":
        model = VLLM_MODELS.get(str(s.model), str(s.model))
        args = [model, "--host", s.host, "--port", str(port)]
        if s.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}"]
        if s.max_model_len is not None:
            args += ["--max-model-len", str(s.max_model_len)]
        if s.max_num_seqs is not None:
            args += ["--max-num-seqs", str(s.max_num_seqs)]
        if s.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
        if s.enforce_eager:
            args.append("--enforce-eager")
        if s.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        if s.role == "embed" and "--convert" not in s.extra_args:
            args += ["--convert", "embed"]
        if s.random_weights and "--load-format" not in s.extra_args:
            args += ["--load-format", "dummy"]
        args += list(s.extra_args)
        if s.docker_image:
            return docker_command(s, port, args, env or {})
        return [s.vllm_bin, "serve"] + args
    if s.launcher == "command":
        return [a.replace("{host}", s.host).replace("{port}", str(port)).replace("{python}", sys.executable)
                for a in s.extra_args]
    raise ValueError(f"launcher {s.launcher} starts no process")


def docker_name(spec: ServerSpec, port: int) -> str:
    return f"coserve-{spec.role}-{port}"


def docker_command(spec: ServerSpec, port: int, vllm_args: list[str], env: dict[str, str]) -> list[str]:
    """`docker run` for the vllm/vllm-openai image (entrypoint `vllm serve`), as the study ran it."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    cmd = ["docker", "run", "--rm", "--name", docker_name(spec, port), "--ipc=host", "--network=host",
           "--gpus", f'"device={devices}"' if devices else "all"]
    for k, v in env.items():
        if k == "CUDA_VISIBLE_DEVICES":
            continue
        cmd += ["-e", f"{k}={v}"]
        if k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            cmd += ["-v", f"{v}:{v}"]
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    cmd += ["-v", f"{hf_home}:/root/.cache/huggingface", str(spec.docker_image)]
    # --gpus renumbers the devices it passes from 0, so the container sees them as 0..n-1.
    return cmd + vllm_args


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _tail(path: Path, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) if lines else "(empty log)"


def _health(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signame(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


class RunningServer:
    """A started (or external) server. `stop()` leaves no process of its group behind."""

    def __init__(self, spec: ServerSpec, url: str, proc: subprocess.Popen | None, log_path: Path | None,
                 command: list[str] | None, port: int | None):
        self.spec = spec
        self.url = url
        self.proc = proc
        self.log_path = log_path
        self.command = command
        self.port = port
        self.pgid = proc.pid if proc is not None else None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        if self.proc is None:
            return _health(self.url)
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise ServerFailed if the process has died (e.g. during a load run)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(self._died_msg("died"))

    def _died_msg(self, what: str) -> str:
        rc = self.proc.returncode if self.proc is not None else None
        return (f"{self.spec.role} server ({self.spec.launcher}, pid {self.pid}) {what} ({_signame(rc) if rc is not None else '?'}); "
                f"last lines of {self.log_path}:\n{_tail(self.log_path) if self.log_path else '(no log)'}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM to the group, wait, SIGKILL what is left; returns the server's exit code."""
        if self.proc is None:
            return None
        try:
            if self.spec.launcher == "vllm" and self.spec.docker_image:
                subprocess.run(["docker", "rm", "-f", docker_name(self.spec, self.port)], capture_output=True, timeout=60)
            if self.proc.poll() is None:
                _killpg(self.pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:  # ignored SIGTERM: no second chance
                _killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            elif _group_alive(self.pgid):
                # The server exited but children of its group (engine workers, TP ranks) remain.
                _killpg(self.pgid, signal.SIGTERM)
                deadline = time.monotonic() + min(5.0, timeout_s)
                while _group_alive(self.pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            if _group_alive(self.pgid):
                _killpg(self.pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _group_alive(self.pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.returncode = self.proc.returncode
            return self.returncode
        finally:
            with _live_lock:
                _live.pop(id(self), None)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def __repr__(self) -> str:
        return f"RunningServer({self.spec.role}, {self.url}, pid={self.pid})"


def _killpg(pgid: int | None, sig: int) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_server(spec: ServerSpec, env: dict[str, str] | None, log_path: Path, ready_timeout_s: float = 600.0) -> RunningServer:
    """Start one server and wait until /health answers 200; raises ServerFailed with its log tail."""
    spec.validate()
    env = dict(env or {})
    if spec.launcher == "external":
        url = spec.url.rstrip("/")
        deadline = time.monotonic() + ready_timeout_s
        while not _health(url):
            if time.monotonic() > deadline:
                raise ServerFailed(f"{spec.role} server at {url} (external) did not answer /health within {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        return RunningServer(spec, url, None, None, None, None)

    # The built-in server picks its own free port and names it in its ready line: a port
    # chosen here and handed over could be taken by another process in between, and that
    # process's /health would then pass for ours.
    announces_port = spec.launcher == "builtin" and not spec.port
    port = 0 if announces_port else (spec.port or free_port(spec.host))
    full_env = dict(os.environ)
    full_env.update(env)
    full_env.update(BASE_ENV)  # NCCL_NVLS_ENABLE=0 etc. for every process coserve starts
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # Two servers computing on the same CPU cores: OpenMP's default spin-wait lets one
    # process's idle threads burn the cores the other needs (the demo's co-located gen fell to
    # ~1 tok/s on 2 cores, ~600 with passive waits). GPU servers barely use OpenMP.
    full_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = build_command(spec, port, {**env, **BASE_ENV})
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        header = (f"# coserve launch {time.strftime('%Y-%m-%dT%H:%M:%S')} role={spec.role} launcher={spec.launcher}\n"
                  f"# cmd: {_one_line(shlex.join(cmd))}\n"
                  f"# env: {' '.join(f'{k}={v}' for k, v in sorted({**env, **BASE_ENV}.items()))}\n")
        logf.write(header.encode())
        logf.flush()
        log_start = logf.tell()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=full_env, start_new_session=True, preexec_fn=pdeathsig_preexec())
        except OSError as e:
            raise ServerFailed(f"{spec.role} server ({spec.launcher}) could not start: {e} (command: {shlex.join(cmd)})") from e
    url = f"http://{_connect_host(spec.host)}:{port}"
    server = RunningServer(spec, url, proc, log_path, cmd, port)
    with _live_lock:
        _live[id(server)] = server
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise ServerFailed(server._died_msg(f"exited before /health answered, after {time.monotonic() - t0:.1f} s"))
            if announces_port and server.port == 0:
                announced = _announced_url(log_path, log_start)
                if announced:
                    server.url, server.port = announced, int(announced.rsplit(":", 1)[1])
            elif _health(server.url, timeout_s=2.0):
                return server
            if time.monotonic() - t0 > ready_timeout_s:
                raise ServerFailed(f"{spec.role} server ({spec.launcher}, pid {proc.pid}) not ready: /health did not answer "
                                   f"200 within {ready_timeout_s:.0f} s; last lines of {log_path}:\n{_tail(log_path)}")
            time.sleep(0.2)
    except BaseException:
        server.stop(timeout_s=5)
        raise


_READY_LINE = re.compile(rb"coserve serve \w+: ready at (http://\S+)")


def _announced_url(log_path: Path, offset: int) -> str | None:
    """The URL a built-in server printed in its ready line, once it has."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        m = _READY_LINE.search(f.read())
    return m.group(1).decode() if m else None


def start_servers(specs: list[ServerSpec], envs: dict[str, dict[str, str]], log_dir: Path,
                  ready_timeout_s: float = 600.0) -> list[RunningServer]:
    """Start servers one after the other (each ready before the next starts); on a failure stop
    those already up and re-raise."""
    started: list[RunningServer] = []
    try:
        for spec in specs:
            started.append(start_server(spec, envs.get(spec.role, {}), Path(log_dir) / f"{spec.role}.log", ready_timeout_s))
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    return started


def stop_all() -> None:
    """Stop every server this process started and has not stopped (atexit backstop)."""
    with _live_lock:
        servers = list(_live.values())
    for s in servers:
        try:
            s.stop(timeout_s=10)
        except Exception:
            pass


atexit.register(stop_all)
