"""A Deployment as a plain bash script for one machine: the MPS daemon started first (and
stopped with `echo quit | nvidia-cuda-mps-control` on exit), then each server in the
background, each waited for on /health before the next starts; the script lives while the
servers do and stops them all when one exits or it is interrupted.

    files = render(dep)      # {"serve.sh": text}
"""

from __future__ import annotations

import shlex

from coserve.export.model import PORTS, Deployment, ExportedServer, header, mig_variable

MPS_DIR = "/tmp/coserve-mps"
# Stands for the script's $HOST in a command line until the line is quoted for the shell.
_HOST_MARK = "\0HOST\0"

_HOST_SETTING = """\
# HOST: the address every server binds. 127.0.0.1 (the default) serves this machine only;
# HOST=0.0.0.0 bash serve.sh exposes the servers on every interface, to anyone who can reach
# the machine (they have no authentication: put them behind a firewall or a proxy first).
# The script itself reaches them on 127.0.0.1, which either value answers.
HOST=${HOST:-127.0.0.1}
"""

_PRELUDE = """\
set -euo pipefail

# wait_ready URL NAME SECONDS: until URL/health answers 200, or fail after SECONDS.
wait_ready() {
  local deadline=$((SECONDS + $3))
  local probe='import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)'
  until python3 -c "$probe" "$1/health" 2>/dev/null; do
    if ((SECONDS > deadline)); then echo "$2 did not answer $1/health within $3 s" >&2; exit 1; fi
    sleep 2
  done
}

pids=()
cleanup() {
  trap - EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait || true
"""


def _device_env(dep: Deployment, s: ExportedServer) -> list[str]:
    """CUDA_VISIBLE_DEVICES (and order) as shell words, MIG UUIDs from their variables."""
    if not s.uses_gpu:
        return []
    if s.mig_profile and not s.gpus:
        return [f'CUDA_VISIBLE_DEVICES="${mig_variable(s.role)}"']
    if s.visible_devices is not None:  # an MPS client: its GPUs as the daemon numbers them
        return [f"CUDA_VISIBLE_DEVICES={shlex.quote(s.visible_devices)}"]
    return ["CUDA_DEVICE_ORDER=PCI_BUS_ID", f"CUDA_VISIBLE_DEVICES={shlex.quote(','.join(s.gpus))}"]


def _word(arg: str) -> str:
    """One shell word of a command line: quoted, with the host mark as "$HOST"."""
    return '"$HOST"'.join(shlex.quote(part) if part else "" for part in arg.split(_HOST_MARK))


def _server_lines(dep: Deployment, s: ExportedServer) -> list[str]:
    env = _device_env(dep, s) + [f"{k}={shlex.quote(v)}" for k, v in s.env.items()]
    url = f"http://127.0.0.1:{s.port}"
    gen_url = f"http://127.0.0.1:{PORTS['gen']}"
    argv = " ".join(_word(a) for a in s.argv(gen_url=gen_url, host=_HOST_MARK))
    return [
        f"# {s.role}: {s.engine} engine on {url}",
        f"env {' '.join(env)} \\\n  {argv} &" if env else f"{argv} &",
        "pids+=($!)",
        f"wait_ready {url} {s.role} {s.ready_timeout_s:.0f}",
        "",
    ]


def script(dep: Deployment) -> str:
    """The bash script's text."""
    mps = dep.sharing == "mps"
    lines = ["#!/usr/bin/env bash", header(dep, "run with: bash serve.sh").rstrip(), _PRELUDE]
    lines.insert(2, _HOST_SETTING)
    if mps:
        lines[-1] += "  echo quit | nvidia-cuda-mps-control || true\n"
        # empty folders only: a daemon's log stays where it was written
        lines[-1] += (
            f'  rmdir "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" {MPS_DIR} '
            "2>/dev/null || true\n"
        )
    lines[-1] += "}\ntrap cleanup EXIT\ntrap 'exit 130' INT TERM\n"
    for s in dep.servers:
        if s.mig_profile and not s.gpus:
            var = mig_variable(s.role)
            lines.append(
                f': "${{{var}:?set {var} to the UUID of the {s.mig_profile} MIG instance '
                f'(nvidia-smi -L)}}"'
            )
    if dep.mig is not None and dep.mig.profiles and not dep.mig.uuids:
        create = ",".join(dep.mig.profiles.values())
        lines.append(
            f"# MIG instances (with MIG mode on): nvidia-smi mig -i {dep.mig.gpu} -cgi {create} -C"
        )
    if mps:
        lines += [
            "# The MPS control daemon for the servers' GPUs; cleanup stops it.",
            f"export CUDA_MPS_PIPE_DIRECTORY={MPS_DIR}/pipe CUDA_MPS_LOG_DIRECTORY={MPS_DIR}/log",
            'mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"',
            "CUDA_DEVICE_ORDER=PCI_BUS_ID "
            f"CUDA_VISIBLE_DEVICES={shlex.quote(','.join(dep.mps_devices))} "
            "nvidia-cuda-mps-control -d",
            "",
        ]
    lines.append("")
    for s in dep.servers:
        lines += _server_lines(dep, s)
    urls = ", ".join(f"{s.role} http://127.0.0.1:{s.port}" for s in dep.servers)
    lines += [
        f'echo "ready: {urls}"',
        "# Serve until one server exits (or the script is interrupted); cleanup stops the rest.",
        'wait -n "${pids[@]}"',
    ]
    return "\n".join(lines) + "\n"


def render(dep: Deployment) -> dict[str, str]:
    """{file name: text}: serve.sh."""
    return {"serve.sh": script(dep)}
