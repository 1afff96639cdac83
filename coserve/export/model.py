"""What one condition of a spec deploys as: `Deployment`, read from the spec by the same
pieces a run uses (the condition's server configs, the strategy's devices and environment,
`build_command`), so the three writers (compose, k8s, commands) describe one thing.

    dep = build_deployment(spec, "mps", engine="vllm")
    dep.servers[0].argv()        # ["vllm", "serve", "Qwen/Qwen3-30B-A3B-FP8", "--host", ...]
    dep.sharing                  # "none" | "timeslice" | "mps" | "mig"

A condition export cannot write raises ExportError naming what and why.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coserve import __version__
from coserve.engine.presets import PRESETS, get_preset
from coserve.gpu import mig
from coserve.gpu.strategies import Mps, StrategyError, Tp, make_strategy
from coserve.launch_command import VLLM_MODELS, ServerSpec, build_command
from coserve.spec import Condition, ServerConfig, Spec

ENGINES = ("vllm", "builtin")
# The image the study served both models with; a spec's `docker_image` takes its place.
VLLM_IMAGE = "vllm/vllm-openai:v0.15.1"
# Built from the coserve source tree with the Dockerfile `export --engine builtin` writes.
BUILTIN_IMAGE = f"coserve:{__version__}"
PORTS = {"gen": 8000, "embed": 8001}
# Where the MPS daemon and its clients meet inside containers (a shared volume each).
MPS_PIPE_DIR = "/tmp/nvidia-mps"
MPS_LOG_DIR = "/tmp/nvidia-log"
# Of a strategy's environment, what a deployment keeps: device selection is the container
# runtime's (or the writer's), and the no-MPS pipe directory belongs to a run folder.
_KEEP_ENV = (
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_CLIENT_PRIORITY",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
)


class ExportError(ValueError):
    """A condition export cannot write; the message names what and why."""


@dataclass(frozen=True)
class MigLayout:
    """The MIG instances of a MIG condition: `profiles[role]` on parent GPU `gpu` for both
    roles (the layout a run makes, also when the condition runs one server), or the instances
    given directly by UUID (`uuids[role]`)."""

    gpu: str
    profiles: dict[str, str]
    uuids: dict[str, str]

    @property
    def config_name(self) -> str:
        """The mig-parted config name (a valid node label value)."""
        return "coserve-" + "-".join(self.profiles[r] for r in self.profiles)


@dataclass(frozen=True)
class ExportedServer:
    """One model server of a deployment. `launch` listens on 0.0.0.0:`port`; `gpus` are the
    host GPUs (indices or UUIDs) its container is given (under MPS: all of the daemon's, and
    `visible_devices` picks its own among them, as the run's MPS clients do); `env` is what it
    adds to its environment besides device selection."""

    role: str
    engine: str
    image: str
    launch: ServerSpec
    env: dict[str, str]
    gpus: tuple[str, ...]
    visible_devices: str | None
    mig_profile: str | None
    ready_timeout_s: float

    @property
    def port(self) -> int:
        return PORTS[self.role]

    @property
    def uses_gpu(self) -> bool:
        return self.launch.device != "cpu"

    @property
    def gpu_count(self) -> int:
        """GPUs the server asks a scheduler for (one MIG instance counts as one)."""
        return 1 if self.mig_profile else len(self.gpus)

    def argv(self, gen_url: str = "", host: str | None = None) -> list[str]:
        """The server's full command line; `gen_url`: where the SLO guard reads gen; `host`:
        the address it binds in place of `launch.host`."""
        spec = self.launch
        if spec.slo_guard_gen_url is not None:
            spec = dataclasses.replace(spec, slo_guard_gen_url=gen_url)
        if host is not None:
            spec = dataclasses.replace(spec, host=host)
        cmd = build_command(spec, self.port)
        return ["python3", *cmd[1:]] if self.engine == "builtin" else cmd

    def container_args(self, gen_url: str = "") -> list[str]:
        """The command line after the image's entrypoint (vLLM's image runs `vllm serve`)."""
        cmd = self.argv(gen_url)
        return cmd[2:] if self.engine == "vllm" else cmd


@dataclass(frozen=True)
class Deployment:
    """A condition as servers on devices. `sharing`: how the servers share a GPU ("none" when
    no GPU carries two servers, "timeslice", "mps" or "mig"); `mps_devices`: the GPUs of the
    MPS daemon; `notes`: what the user must know (how the deployment differs from what ran)."""

    spec_name: str
    condition: str
    description: str
    strategy: str
    sharing: str
    servers: tuple[ExportedServer, ...]
    mps_devices: tuple[str, ...]
    mig: MigLayout | None
    notes: tuple[str, ...]

    @property
    def engines(self) -> set[str]:
        return {s.engine for s in self.servers}

    def shared_gpus(self) -> dict[str, int]:
        """{GPU: how many servers run on it}, for GPUs that carry more than one."""
        return {g: n for g, n in _count(self.servers).items() if n > 1}

    def server(self, role: str) -> ExportedServer | None:
        return next((s for s in self.servers if s.role == role), None)


def conditions_of(spec: Spec) -> list[str]:
    return [c.name for c in spec.all_conditions()]


def find_condition(spec: Spec, name: str) -> Condition:
    """The condition `name` (a sweep point too); ExportError lists the valid names."""
    try:
        return spec.condition(name)
    except KeyError:
        raise ExportError(
            f"no condition {name!r} in spec {spec.name!r}; conditions: "
            f"{', '.join(conditions_of(spec))}"
        ) from None


def _refusal(cfg: ServerConfig, role: str, engine: str) -> str | None:
    """Why `role` as configured cannot be deployed on `engine`, or None."""
    if cfg.launcher == "external":
        return f"{role} is an external server ({cfg.url}): there is nothing to start"
    if cfg.launcher == "command":
        if "colocated" in cfg.extra_args:
            why = (
                "vLLM serves one model per process"
                if engine == "vllm"
                else "export writes one server per model"
            )
            return (
                f"{role} runs the one-process co-serving mode (`coserve serve colocated`: both "
                f"models in one process, with stream priorities or green contexts); {why}"
            )
        return f"{role} runs launcher 'command' (a command line export cannot read)"
    if engine == "vllm":
        if cfg.slo_guard:
            return (
                "embed's SLO guard (slo_guard = true) throttles embed inside coserve's built-in "
                "embed server; vLLM has no such lever (use --engine builtin)"
            )
        if cfg.model in PRESETS and cfg.model not in VLLM_MODELS:
            return (
                f"{role}'s model preset {cfg.model!r} has no Hugging Face checkpoint for vLLM "
                f"(presets with one: {', '.join(VLLM_MODELS)}; use --engine builtin)"
            )
    preset = get_preset(cfg.model)  # resolves shipped weights (MiniLM)
    if engine == "builtin" and not cfg.random_weights and preset and preset.model_dir is None:
        alt = (
            f"; --engine vllm serves its checkpoint {VLLM_MODELS[cfg.model]}"
            if cfg.model in VLLM_MODELS
            else ""
        )
        return (
            f"{role}'s preset {cfg.model!r} ships no weights for the built-in engine, and the "
            f"spec turns random_weights off: the server could not start (keep random_weights "
            f"to serve random weights{alt})"
        )
    if cfg.extra_args and engine != cfg.launcher:
        return (
            f"{role}'s extra_args {cfg.extra_args} are flags of launcher {cfg.launcher!r}, "
            f"not of engine {engine!r}"
        )
    return None


def _mig_layout(strategy, gpus: list[str], mig_gpu: str | None) -> MigLayout:
    if len(gpus) == 2:
        return MigLayout(gpu="", profiles={}, uuids={"gen": gpus[0], "embed": gpus[1]})
    parent = gpus[0] if gpus else "0"
    if strategy.profiles:
        allowed = mig.KNOWN_PROFILES.get(mig_gpu or "", {})
        profiles = list(strategy.profiles)
    else:
        if mig_gpu is None:
            raise ExportError(
                "the condition's MIG profiles are 'auto' (the study's 4g+3g layout for the GPU "
                "found at run time); name the GPU with --mig-gpu "
                f"({', '.join(mig.KNOWN_PROFILES)}) or set options.profiles"
            )
        allowed = mig.KNOWN_PROFILES[mig_gpu]
        profiles = mig.default_layout(allowed) or []
    if allowed:
        plan = mig.MigPlan(
            gpu=parent, gpu_name=mig_gpu, profiles=profiles, roles=list(strategy.roles),
            source=f"builtin:{mig_gpu}", allowed=dict(allowed),
        )  # fmt: skip
        problems = mig.validate(plan)
        if problems:
            raise ExportError(f"MIG plan does not fit a {mig_gpu}: {'; '.join(problems)}")
    # The whole layout, also for a condition that runs one server: the run made both.
    return MigLayout(
        gpu=parent, profiles=dict(zip(strategy.roles, profiles, strict=True)), uuids={}
    )


def _launch(cfg: ServerConfig, role: str, engine: str, tp: int) -> ServerSpec:
    return cfg.server_spec(
        role,
        None if cfg.device == "auto" else cfg.device,
        launcher=engine,
        host="0.0.0.0",
        url=None,
        docker_image=None,
        tensor_parallel_size=tp,
        slo_guard_gen_url="" if cfg.slo_guard else None,
    )


def build_deployment(
    spec: Spec, condition: str, *, engine: str | None = None, mig_gpu: str | None = None
) -> Deployment:
    """The deployment of `condition`. `engine`: "vllm" or "builtin" for every server (default:
    each server's launcher); `mig_gpu`: the GPU family (mig.KNOWN_PROFILES) a MIG condition
    with profiles 'auto' is laid out for. Raises ExportError."""
    cond = find_condition(spec, condition)
    if engine is not None and engine not in ENGINES:
        raise ExportError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if mig_gpu is not None and mig_gpu not in mig.KNOWN_PROFILES:
        raise ExportError(f"--mig-gpu {mig_gpu!r}: expected one of {', '.join(mig.KNOWN_PROFILES)}")
    try:
        strategy = make_strategy(cond.strategy, list(cond.gpus), dict(cond.options), Path("/"))
    except StrategyError as e:
        raise ExportError(f"condition {cond.name!r}: {e}") from None
    roles = list(cond.servers)
    mps = strategy if isinstance(strategy, Mps) else None
    if isinstance(strategy, Tp) and strategy.sharing == "mps":
        mps = strategy.inner
    layout = _mig_layout(strategy, list(cond.gpus), mig_gpu) if strategy.name == "mig" else None
    servers, notes = [], []
    for role in roles:
        cfg = cond.server(spec, role)
        eng = engine or cfg.launcher
        why = _refusal(cfg, role, eng)
        if why is not None:
            raise ExportError(f"condition {cond.name!r} cannot be exported: {why}")
        tp = strategy.tensor_parallel_size(role) if strategy.name == "tp" else None
        launch = _launch(cfg, role, eng, tp or cfg.tensor_parallel_size)
        env = {k: v for k, v in strategy.env_for(role).items() if k in _KEEP_ENV}
        gpus: tuple[str, ...] = tuple(strategy.devices_for(role))
        visible = None
        if mps is not None:
            gpus = tuple(mps.telemetry_devices())
            visible = mps.env_for(role)["CUDA_VISIBLE_DEVICES"]
        profile = None
        if layout is not None:
            gpus = (layout.uuids[role],) if layout.uuids else ()
            profile = layout.profiles.get(role)
        if launch.device == "cpu":
            gpus, visible = (), None
        image = (cfg.docker_image or VLLM_IMAGE) if eng == "vllm" else BUILTIN_IMAGE
        servers.append(
            ExportedServer(
                role, eng, image, launch, env, gpus, visible, profile, cfg.ready_timeout_s
            )
        )
        if cfg.random_weights:
            notes.append(_random_weights_note(cfg, role, eng))
        if cfg.model not in PRESETS:
            notes.append(
                f"{role}'s model {cfg.model!r} is not a coserve preset: passed as given (a "
                "Hugging Face id, or a path that must exist where the server runs)"
            )
    exported = tuple(servers)
    sharing = "mps" if mps is not None else "mig" if layout is not None else "none"
    if sharing == "none" and any(n > 1 for n in _count(exported).values()):
        sharing = "timeslice"
    return Deployment(
        spec_name=spec.name,
        condition=cond.name,
        description=cond.description,
        strategy=strategy.name,
        sharing=sharing,
        servers=exported,
        mps_devices=tuple(mps.telemetry_devices()) if mps is not None else (),
        mig=layout,
        notes=tuple(notes),
    )


def _random_weights_note(cfg: ServerConfig, role: str, engine: str) -> str:
    """What a server exported with random weights must say: how it was measured only where
    the export runs the spec's own launcher, and how to get trained weights only where some
    exist."""
    flag = "--load-format dummy" if engine == "vllm" else "--random-weights"
    note = f"{role} serves random weights ({flag}), "
    if engine == cfg.launcher:
        note += "as the condition was measured"
    else:
        note += (
            "as the spec's random_weights asks (the condition was measured on the spec's "
            f"{cfg.launcher} launcher, not on {engine})"
        )
    preset = get_preset(cfg.model)
    if engine == "builtin" and preset is not None and preset.model_dir is None:
        note += f"; preset {cfg.model!r} ships no weights, so the built-in server has none to load"
        if cfg.model in VLLM_MODELS:
            note += (
                f" (drop random_weights in the spec and export with --engine vllm to serve its "
                f"checkpoint {VLLM_MODELS[cfg.model]})"
            )
        return note
    return note + "; drop random_weights in the spec to serve the trained checkpoint"


def _count(servers: tuple[ExportedServer, ...]) -> dict[str, int]:
    count: dict[str, int] = {}
    for s in servers:
        for g in s.gpus:
            count[g] = count.get(g, 0) + 1
    return count


def mig_variable(role: str) -> str:
    """The environment variable that names `role`'s MIG instance (UUID) where the spec gives
    profiles: the instance exists only once created, so its UUID is the user's to fill in."""
    return f"COSERVE_{role.upper()}_MIG"


_NAME_BAD = re.compile(r"[^a-z0-9-]+")


def k8s_name(*parts: str) -> str:
    """A DNS-1035 label (Service and Deployment names): lower case, '-', at most 63."""
    name = _NAME_BAD.sub("-", "-".join(parts).lower()).strip("-")
    return name[:63].rstrip("-")


def header(dep: Deployment, how: str) -> str:
    """Comment lines (`# ...`) naming the condition and the notes."""
    lines = [
        f"coserve export: condition {dep.condition!r} of spec {dep.spec_name!r} "
        f"(strategy {dep.strategy}, sharing {dep.sharing}); {how}",
    ]
    if dep.description:
        lines.append(dep.description)
    lines += [f"note: {n}" for n in dep.notes]
    return "".join(f"# {part}\n" for line in lines for part in line.splitlines())


DOCKERFILE = f"""\
# coserve's built-in server. Build it from the coserve source tree:
#   docker build -t {BUILTIN_IMAGE} -f THIS_FILE PATH/TO/coserve
# python:3.12 (not -slim): Triton compiles its kernels' launchers with the C compiler.
FROM python:3.12
COPY . /opt/coserve
RUN pip install --no-cache-dir /opt/coserve
ENV PYTHONUNBUFFERED=1
"""


class _Dumper(yaml.SafeDumper):
    """Writes a mapping used twice (the labels of a Deployment and its pods) out twice: an
    anchor and alias would be correct YAML, but a reader of the file should not chase them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Text of several lines (a ConfigMap's file, a script) as a `|` block, as written by hand."""
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(*documents: Any) -> str:
    """The documents as YAML, keys in the order given, separated by '---'."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=1000)
