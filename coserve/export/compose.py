"""A Deployment as a Docker Compose file: one service per model server, `ipc: host`, the GPU
reservation, a health check on /health, embed started once gen is healthy (two engines sizing
their memory at once mis-size it: vllm#9198), and for MPS the control daemon as a sidecar
service whose pipe and log directories the servers share through named volumes, as the study
ran it.

    files = render(dep)      # {"docker-compose.yml": text, "Dockerfile": text (builtin only)}
"""

from __future__ import annotations

from typing import Any

from coserve.export.model import (
    DOCKERFILE,
    MPS_LOG_DIR,
    MPS_PIPE_DIR,
    PORTS,
    Deployment,
    ExportedServer,
    header,
    mig_variable,
    to_yaml,
)

MPS_SERVICE = "mps-daemon"
HEALTH_INTERVAL_S = 10
# Ports are published on the host's loopback; the servers inside listen on 0.0.0.0, which
# the port mapping needs.
PUBLISH_HOST = "127.0.0.1"
_EXPOSE = (
    f"# The servers' ports are published on the host's {PUBLISH_HOST} only; to expose them on\n"
    f"# every interface, drop '{PUBLISH_HOST}:' from `ports` (they have no authentication).\n"
)


def literal(text: str) -> str:
    """`text` as Compose reads it back: '$' doubled, so Compose's interpolation leaves a
    command argument or an environment value as written."""
    return text.replace("$", "$$")


def _devices(server: ExportedServer) -> list[str]:
    if server.mig_profile and not server.gpus:
        var = mig_variable(server.role)
        return [
            f"${{{var}:?set {var} to the UUID of the {server.mig_profile} MIG instance "
            f"(nvidia-smi -L)}}"
        ]
    return list(server.gpus)


def _reservation(device_ids: list[str]) -> dict[str, Any]:
    return {
        "resources": {
            "reservations": {
                "devices": [{"driver": "nvidia", "device_ids": device_ids, "capabilities": ["gpu"]}]
            }
        }
    }


def _health(port: int, start_period_s: float) -> dict[str, Any]:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health')"
    return {
        "test": ["CMD", "python3", "-c", probe],
        "interval": f"{HEALTH_INTERVAL_S}s",
        "timeout": "5s",
        "retries": 3,
        "start_period": f"{start_period_s:g}s",
    }


def _server(dep: Deployment, s: ExportedServer, after: str | None) -> dict[str, Any]:
    env = dict(s.env)
    if dep.sharing == "mps":
        env.update(CUDA_MPS_PIPE_DIRECTORY=MPS_PIPE_DIR, CUDA_MPS_LOG_DIRECTORY=MPS_LOG_DIR)
        if s.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = s.visible_devices
    service: dict[str, Any] = {
        "image": literal(s.image),
        "command": [literal(a) for a in s.container_args(gen_url=f"http://gen:{PORTS['gen']}")],
        "ipc": "host",
        "ports": [f"{PUBLISH_HOST}:{s.port}:{s.port}"],
        "environment": {k: literal(v) for k, v in env.items()},
        "healthcheck": _health(s.port, s.ready_timeout_s),
    }
    volumes = []
    if s.engine == "vllm":
        volumes.append("hf-cache:/root/.cache/huggingface")
    if dep.sharing == "mps":
        volumes += [f"mps-pipe:{MPS_PIPE_DIR}", f"mps-log:{MPS_LOG_DIR}"]
    if volumes:
        service["volumes"] = volumes
    if s.uses_gpu:
        service["deploy"] = _reservation(_devices(s))
    depends = [MPS_SERVICE] if dep.sharing == "mps" else []
    depends += [after] if after else []
    if depends:
        service["depends_on"] = {d: {"condition": "service_healthy"} for d in depends}
    return service


def _mps_daemon(dep: Deployment) -> dict[str, Any]:
    return {
        "image": literal(dep.servers[0].image),
        "entrypoint": ["nvidia-cuda-mps-control", "-f"],
        "ipc": "host",
        "environment": {
            "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_DIR,
            "CUDA_MPS_LOG_DIRECTORY": MPS_LOG_DIR,
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        },
        "volumes": [f"mps-pipe:{MPS_PIPE_DIR}", f"mps-log:{MPS_LOG_DIR}"],
        "healthcheck": {
            "test": ["CMD-SHELL", "echo get_server_list | nvidia-cuda-mps-control"],
            "interval": "5s",
            "timeout": "5s",
            "retries": 6,
        },
        "deploy": _reservation(list(dep.mps_devices)),
    }


def compose(dep: Deployment) -> dict[str, Any]:
    """The compose file as data (services gen/embed, mps-daemon under MPS, named volumes)."""
    services: dict[str, Any] = {}
    if dep.sharing == "mps":
        services[MPS_SERVICE] = _mps_daemon(dep)
    before = None
    for s in dep.servers:
        services[s.role] = _server(dep, s, before)
        before = s.role
    volumes = [v.split(":")[0] for svc in services.values() for v in svc.get("volumes", [])]
    out: dict[str, Any] = {"services": services}
    if volumes:
        out["volumes"] = {v: {} for v in dict.fromkeys(volumes)}
    return out


def render(dep: Deployment) -> dict[str, str]:
    """{file name: text}: docker-compose.yml, and the Dockerfile of coserve's image when a
    server runs the built-in engine."""
    how = "run with: docker compose up (or docker-compose up)"
    text = header(dep, how) + _EXPOSE + to_yaml(compose(dep))
    files = {"docker-compose.yml": text}
    if "builtin" in dep.engines:
        files["Dockerfile"] = DOCKERFILE
    return files
