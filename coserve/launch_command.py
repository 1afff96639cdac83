"""What a server is launched as: `ServerSpec` and the command line that starts it.

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

import os
import sys
from dataclasses import dataclass, field

from coserve.roles import ROLES

LAUNCHERS = ("builtin", "vllm", "external", "command")
# Our presets -> the Hugging Face checkpoints the study served with vLLM.
VLLM_MODELS = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B-FP8",
    "qwen3-embedding-8b": "Qwen/Qwen3-Embedding-8B",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}


class ServerFailed(RuntimeError):
    """A server that could not be started or died; the message carries the tail of its log."""


@dataclass
class ServerSpec:
    """One server to launch. An engine setting left None is not passed to the server, whose own
    default then holds (the built-in server's are `coserve.engine.types.EngineArgs`'); a run
    fills them from the spec's `ServerConfig`."""

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
    # step time within gen_tpot_slo_ms, or gen_tpot_slo_pct over gen alone
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
                raise ValueError(
                    f"{self.role}: launcher command needs the command line in extra_args"
                )
        elif not self.model:
            raise ValueError(f"{self.role}: launcher {self.launcher} needs model")
        if int(self.tensor_parallel_size) < 1:
            raise ValueError(f"{self.role}: tensor_parallel_size must be >= 1")
        if self.docker_image and self.launcher != "vllm":
            raise ValueError(f"{self.role}: docker_image is for launcher vllm only")
        if self.slo_guard_gen_url and (self.role, self.launcher) != ("embed", "builtin"):
            raise ValueError(f"{self.role}: the SLO guard is in the builtin embed server only")
        if self.slo_guard_gen_url and (self.gen_tpot_slo_ms is None) == (
            self.gen_tpot_slo_pct is None
        ):
            raise ValueError(
                f"{self.role}: the SLO guard needs exactly one of gen_tpot_slo_ms and "
                "gen_tpot_slo_pct"
            )


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


def _number(v: float) -> str:
    """`v` as a flag value that reads back exactly ("5", "23.5", "3599999"; `:g` rounded to 6
    digits, and a spec's 3,599,999 ms budget reached the server as 3.6e+06)."""
    text = repr(float(v))
    return text.removesuffix(".0")


def _engine_flags(s: ServerSpec) -> list[str]:
    """The engine settings both `coserve serve` and `vllm serve` take under the same flag
    names; a setting left None is not passed (the server's own default holds)."""
    flags: list[str] = []
    if s.gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", _number(s.gpu_memory_utilization)]
    if s.max_model_len is not None:
        flags += ["--max-model-len", str(s.max_model_len)]
    if s.max_num_seqs is not None:
        flags += ["--max-num-seqs", str(s.max_num_seqs)]
    if s.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
    return flags


def build_command(spec: ServerSpec, port: int, env: dict[str, str] | None = None) -> list[str]:
    """The argv that starts this server (not for launcher external)."""
    spec.validate()
    s = spec
    if s.launcher == "builtin":
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "coserve",
            "serve",
            s.role,
            "--model",
            str(s.model),
            "--host",
            s.host,
            "--port",
            str(port),
        ]
        if s.random_weights:
            cmd.append("--random-weights")
        if s.device:
            cmd += ["--device", s.device]
        cmd += _engine_flags(s)
        if s.slo_guard_gen_url:
            cmd += ["--slo-guard-gen-url", s.slo_guard_gen_url]
            cmd += (
                ["--gen-tpot-slo-ms", _number(s.gen_tpot_slo_ms)]
                if s.gen_tpot_slo_ms is not None
                else ["--gen-tpot-slo-pct", _number(s.gen_tpot_slo_pct)]
            )
        # The built-in embed engine has no CUDA graphs, so its server refuses the flag; a
        # condition's enforce_eager still reaches gen (and both servers under vLLM).
        if s.enforce_eager and s.role == "gen":
            cmd.append("--enforce-eager")
        if s.tensor_parallel_size > 1:
            if not builtin_supports("--tensor-parallel-size"):
                raise ServerFailed(
                    f"{s.role}: the built-in server has no --tensor-parallel-size; "
                    f"use launcher vllm for TP={s.tensor_parallel_size}"
                )
            cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        return cmd + list(s.extra_args)
    if s.launcher == "vllm":
        model = VLLM_MODELS.get(str(s.model), str(s.model))
        args = [model, "--host", s.host, "--port", str(port)]
        args += _engine_flags(s)
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
        return [
            a.replace("{host}", s.host)
            .replace("{port}", str(port))
            .replace("{python}", sys.executable)
            for a in s.extra_args
        ]
    raise ValueError(f"launcher {s.launcher} starts no process")


def docker_name(spec: ServerSpec, port: int) -> str:
    return f"coserve-{spec.role}-{port}"


def docker_command(
    spec: ServerSpec, port: int, vllm_args: list[str], env: dict[str, str]
) -> list[str]:
    """`docker run` for the vllm/vllm-openai image (entrypoint `vllm serve`), as the study ran
    it."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    cmd = [
        "docker",
        "run",
        "--rm",
        "--name",
        docker_name(spec, port),
        "--ipc=host",
        "--network=host",
        "--gpus",
        f'"device={devices}"' if devices else "all",
    ]
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
