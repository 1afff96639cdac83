"""Start and stop model servers: ours (`coserve serve`), vLLM (`vllm serve`), or URLs.

    spec = ServerSpec(role="gen", launcher="builtin", model="tiny-dense", random_weights=True)
    with start_server(
        spec, env=strategy.env_for("gen"), log_path=run/"gen.log", ready_timeout_s=300
    ) as srv:
        srv.url   # http://127.0.0.1:PORT, answering /health

Each server is its own process group (`start_new_session=True`), logs go to `log_path`
(command and added environment first), readiness is `GET /health` == 200 within
`ready_timeout_s`, a server that exits first raises ServerFailed with the tail of its log,
and `stop()` sends SIGTERM to the whole group, then SIGKILL, and waits until no process of
the group is left. Start servers one after the other (vllm#9198: two engines starting at
once on one GPU mis-size their KV caches) — `start_servers()` does that.

What is launched, and with which command line: launch_command.py.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from coserve.launch_command import (  # noqa: F401 - importable from here too
    LAUNCHERS,
    VLLM_MODELS,
    ServerFailed,
    ServerSpec,
    build_command,
    builtin_supports,
    docker_command,
    docker_name,
)
from coserve.procs import (
    BASE_ENV,
    free_port,
    group_alive,
    group_kwargs,
    live,
    signal_group,
    tail,
    track,
    untrack,
    wait_group_gone,
)


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


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

    def __init__(
        self,
        spec: ServerSpec,
        url: str,
        proc: subprocess.Popen | None,
        log_path: Path | None,
        command: list[str] | None,
        port: int | None,
    ):
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
        return (
            f"{self.spec.role} server ({self.spec.launcher}, pid {self.pid}) {what} "
            f"({_signame(rc) if rc is not None else '?'}); "
            f"last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM to the group, wait, SIGKILL what is left; returns the server's exit code."""
        if self.proc is None:
            return None
        try:
            if self.spec.launcher == "vllm" and self.spec.docker_image:
                subprocess.run(
                    ["docker", "rm", "-f", docker_name(self.spec, self.port)],
                    capture_output=True,
                    timeout=60,
                )
            if self.proc.poll() is None:
                signal_group(self.pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:  # ignored SIGTERM: no second chance
                signal_group(self.pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            elif group_alive(self.pgid):
                # The server exited but children of its group (engine workers, TP ranks) remain.
                signal_group(self.pgid, signal.SIGTERM)
                wait_group_gone(self.pgid, min(5.0, timeout_s))
            if group_alive(self.pgid):
                signal_group(self.pgid, signal.SIGKILL)
            wait_group_gone(self.pgid, 5.0)
            self.returncode = self.proc.returncode
            return self.returncode
        finally:
            untrack(self)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def __repr__(self) -> str:
        return f"RunningServer({self.spec.role}, {self.url}, pid={self.pid})"


def start_server(
    spec: ServerSpec, env: dict[str, str] | None, log_path: Path, ready_timeout_s: float = 600.0
) -> RunningServer:
    """Start one server and wait until /health answers 200; raises ServerFailed with its log
    tail."""
    spec.validate()
    env = dict(env or {})
    if spec.launcher == "external":
        url = spec.url.rstrip("/")
        deadline = time.monotonic() + ready_timeout_s
        while not _health(url):
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{spec.role} server at {url} (external) did not answer /health within "
                    f"{ready_timeout_s:.0f} s"
                )
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
    if spec.launcher == "builtin" or any("{python}" in a for a in spec.extra_args):
        # `-P` keeps the working folder off sys.path; the server must still import the very
        # package this process runs (a source tree used without installing, as on a lent GPU
        # machine, is found only through this). A command line that starts `{python}` is
        # taken to run coserve too (`serve colocated` in experiments/co-scheduling.toml).
        root = str(Path(__file__).resolve().parent.parent)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
    # Two servers computing on the same CPU cores: OpenMP's default spin-wait lets one
    # process's idle threads burn the cores the other needs (the demo's co-located gen fell to
    # ~1 tok/s on 2 cores, ~600 with passive waits). GPU servers barely use OpenMP.
    full_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = build_command(spec, port, {**env, **BASE_ENV})
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        header = (
            f"# coserve launch {time.strftime('%Y-%m-%dT%H:%M:%S')} role={spec.role} "
            f"launcher={spec.launcher}\n"
            f"# cmd: {_one_line(shlex.join(cmd))}\n"
            f"# env: {' '.join(f'{k}={v}' for k, v in sorted({**env, **BASE_ENV}.items()))}\n"
        )
        logf.write(header.encode())
        logf.flush()
        log_start = logf.tell()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=full_env,
                **group_kwargs(),
            )
        except OSError as e:
            raise ServerFailed(
                f"{spec.role} server ({spec.launcher}) could not start: {e} (command: "
                f"{shlex.join(cmd)})"
            ) from e
    url = f"http://{_connect_host(spec.host)}:{port}"
    server = RunningServer(spec, url, proc, log_path, cmd, port)
    track(server)
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise ServerFailed(
                    server._died_msg(
                        f"exited before /health answered, after {time.monotonic() - t0:.1f} s"
                    )
                )
            if announces_port and server.port == 0:
                announced = _announced_url(log_path, log_start)
                if announced:
                    server.url, server.port = announced, int(announced.rsplit(":", 1)[1])
            elif _health(server.url, timeout_s=2.0):
                return server
            if time.monotonic() - t0 > ready_timeout_s:
                raise ServerFailed(
                    f"{spec.role} server ({spec.launcher}, pid {proc.pid}) not ready: /health did "
                    "not answer "
                    f"200 within {ready_timeout_s:.0f} s; last lines of "
                    f"{log_path}:\n{tail(log_path)}"
                )
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


def start_servers(
    specs: list[ServerSpec],
    envs: dict[str, dict[str, str]],
    log_dir: Path,
    ready_timeout_s: float = 600.0,
) -> list[RunningServer]:
    """Start servers one after the other (each ready before the next starts); on a failure stop
    those already up and re-raise."""
    started: list[RunningServer] = []
    try:
        for spec in specs:
            started.append(
                start_server(
                    spec,
                    envs.get(spec.role, {}),
                    Path(log_dir) / f"{spec.role}.log",
                    ready_timeout_s,
                )
            )
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    return started


def live_servers() -> list[RunningServer]:
    """The servers this process started and has not stopped, oldest first (procs.stop_all
    stops them at exit)."""
    return live(RunningServer)
