"""A Deployment as Kubernetes objects: a Deployment and a Service per model server (probes on
/health, `nvidia.com/gpu` or `nvidia.com/mig-<profile>` resources, env), the NVIDIA device
plugin's config for the sharing (`sharing.timeSlicing` or `sharing.mps` with one replica per
server on a GPU; `migStrategy: mixed` for MIG), for MIG the MIG manager's (mig-parted) layout
and the node label that selects it, and a README saying what must already be on the cluster.

    files = render(dep)   # {"coserve.yaml": ..., "device-plugin-config.yaml": ..., ...}

The device plugin hands out whole GPUs or replicas of one: a server that needs two GPUs that
another server also uses (TP over shared GPUs) cannot be asked for, and is refused.
"""

from __future__ import annotations

import math
from typing import Any

from coserve.export.model import (
    BUILTIN_IMAGE,
    DOCKERFILE,
    PORTS,
    Deployment,
    ExportedServer,
    ExportError,
    header,
    k8s_name,
    to_yaml,
)

PLUGIN_CONFIGMAP = "coserve-device-plugin-config"
MIG_CONFIGMAP = "coserve-mig-config"
PROBE_PERIOD_S = 10


def _resource(dep: Deployment, s: ExportedServer) -> dict[str, str]:
    if not s.uses_gpu:
        return {}
    if s.mig_profile:
        return {f"nvidia.com/mig-{s.mig_profile}": "1"}
    return {"nvidia.com/gpu": str(s.gpu_count)}


def _check(dep: Deployment) -> None:
    if dep.mig is not None and dep.mig.uuids:
        raise ExportError(
            f"condition {dep.condition!r} names its MIG instances by UUID "
            f"({', '.join(dep.mig.uuids.values())}); the device plugin hands out MIG instances "
            "by profile: give options.profiles for a Kubernetes export"
        )
    shared = dep.shared_gpus()
    for s in dep.servers:
        if s.gpu_count > 1 and any(g in shared for g in s.gpus):
            raise ExportError(
                f"condition {dep.condition!r} cannot be exported to Kubernetes: {s.role} needs "
                f"{s.gpu_count} GPUs ({', '.join(s.gpus)}) that another server shares; the "
                f"device plugin's {dep.sharing} replicas are handed out one at a time (MPS "
                "refuses a request for more than one, time-slicing may hand two replicas of "
                "the same GPU), so TP over shared GPUs has no Kubernetes form"
            )


def _probe(port: str, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": port},
        "periodSeconds": PROBE_PERIOD_S,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _labels(name: str, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "coserve",
        "coserve/role": role,
    }


def _wait_for(url: str, image: str) -> dict[str, Any]:
    """An init container that holds a server back until `url`/health answers."""
    loop = (
        "import time, urllib.request\n"
        "while True:\n"
        "    try:\n"
        f"        urllib.request.urlopen('{url}/health', timeout=5)\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(5)\n"
    )
    return {"name": "wait-for-gen", "image": image, "command": ["python3", "-c", loop]}


def _deployment(dep: Deployment, s: ExportedServer, base: str) -> dict[str, Any]:
    name = k8s_name(base, s.role)
    gen_url = f"http://{k8s_name(base, 'gen')}:{PORTS['gen']}"
    container: dict[str, Any] = {"name": s.role, "image": s.image}
    argv = [literal(a) for a in s.container_args(gen_url)]
    container["args" if s.engine == "vllm" else "command"] = argv
    container["ports"] = [{"name": "http", "containerPort": s.port}]
    env = dict(s.env)
    container["env"] = [{"name": k, "value": literal(v)} for k, v in env.items()]
    resources = _resource(dep, s)
    if resources:
        container["resources"] = {"limits": resources}
    container["startupProbe"] = _probe("http", math.ceil(s.ready_timeout_s / PROBE_PERIOD_S))
    container["readinessProbe"] = _probe("http", 3)
    container["livenessProbe"] = _probe("http", 3)
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    pod: dict[str, Any] = {}
    if dep.sharing == "mps":
        pod["hostIPC"] = True  # the device plugin's MPS daemon talks to clients through IPC
    if dep.mig is not None:
        pod["nodeSelector"] = {"nvidia.com/mig.config": dep.mig.config_name}
    if s.role != "gen" and dep.server("gen") is not None:
        pod["initContainers"] = [_wait_for(gen_url, s.image)]
    pod["containers"] = [container]
    # NCCL and vLLM's workers exchange data through /dev/shm, which is 64 MiB in a pod.
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    labels = _labels(name, s.role)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            # A rolling update would start a second engine beside the first on a shared GPU.
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def literal(text: str) -> str:
    """`text` as the kubelet hands it on: '$' doubled, since it expands `$(VAR)` in a command,
    its arguments and env values and reduces `$$` to `$` (an argument `$(NCCL_NVLS_ENABLE)`
    reached the server as `0`)."""
    return text.replace("$", "$$")


def _service(s: ExportedServer, base: str) -> dict[str, Any]:
    name = k8s_name(base, s.role)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": _labels(name, s.role)},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": s.port, "targetPort": "http"}],
        },
    }


def plugin_config(dep: Deployment) -> dict[str, Any] | None:
    """The device plugin's config file (as data) for this sharing, or None (whole GPUs)."""
    if dep.sharing == "mig":
        return {"version": "v1", "flags": {"migStrategy": "mixed"}}
    if dep.sharing == "none":
        return None
    key = "timeSlicing" if dep.sharing == "timeslice" else "mps"
    resources = [{"name": "nvidia.com/gpu", "replicas": replicas(dep)}]
    return {
        "version": "v1",
        "flags": {"migStrategy": "none"},
        "sharing": {key: {"resources": resources}},
    }


def replicas(dep: Deployment) -> int:
    """Replicas per GPU: as many as servers share one."""
    return max(dep.shared_gpus().values(), default=len(dep.servers))


def _configmap(name: str, key: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {key: to_yaml(content)},
    }


def mig_config(dep: Deployment) -> dict[str, Any]:
    """The MIG manager's (mig-parted) config with this condition's layout."""
    layout = dep.mig
    if layout is None:
        raise ExportError(f"condition {dep.condition!r} is not a MIG condition")
    gpu = layout.gpu
    profiles: dict[str, int] = {}
    for p in layout.profiles.values():
        profiles[p] = profiles.get(p, 0) + 1
    return {
        "version": "v1",
        "mig-configs": {
            layout.config_name: [
                {
                    "devices": [int(gpu)] if gpu.isdigit() else "all",
                    "mig-enabled": True,
                    "mig-devices": profiles,
                }
            ]
        },
    }


def objects(dep: Deployment) -> dict[str, list[dict[str, Any]]]:
    """{file name: its objects}: the servers' Deployments and Services, and the ConfigMaps the
    sharing needs. Raises ExportError for a condition the device plugin cannot express."""
    _check(dep)
    base = k8s_name("coserve", dep.condition)
    servers = []
    for s in dep.servers:
        servers += [_deployment(dep, s, base), _service(s, base)]
    out = {"coserve.yaml": servers}
    plugin = plugin_config(dep)
    if plugin is not None:
        key = k8s_name("coserve", dep.condition)
        out["device-plugin-config.yaml"] = [_configmap(PLUGIN_CONFIGMAP, key, plugin)]
    if dep.mig is not None:
        out["mig-config.yaml"] = [_configmap(MIG_CONFIGMAP, "config.yaml", mig_config(dep))]
    return out


def _readme(dep: Deployment, files: list[str]) -> str:
    key = k8s_name("coserve", dep.condition)
    lines = [
        f"# coserve export: condition `{dep.condition}` of spec `{dep.spec_name}` on Kubernetes",
        "",
        f"Strategy {dep.strategy}, GPU sharing: {dep.sharing}. Files: {', '.join(files)}.",
        "",
        "## What must already be on the cluster",
        "",
        "- GPU nodes with the NVIDIA driver and the NVIDIA Container Toolkit, and the NVIDIA "
        "device plugin (standalone or through the GPU Operator) advertising `nvidia.com/gpu`.",
    ]
    if "builtin" in dep.engines:
        lines.append(
            f"- The image `{BUILTIN_IMAGE}` (built with the `Dockerfile` here) pushed to a "
            "registry the nodes pull from; change `image:` to its full name."
        )
    if "vllm" in dep.engines:
        lines.append(
            "- Access to the models on Hugging Face from the pods (set `HF_TOKEN` for gated "
            "ones); each pod downloads its model at start."
        )
    if plugin_config(dep) is not None:
        lines.append(
            f"- The device plugin configured with `device-plugin-config.yaml`: apply it in the "
            f"plugin's namespace, point the plugin at ConfigMap `{PLUGIN_CONFIGMAP}` (GPU "
            f"Operator: `devicePlugin.config.name`; standalone Helm chart: `config.name`) and "
            f"label the GPU nodes `nvidia.com/device-plugin.config={key}`."
        )
    if dep.sharing in ("timeslice", "mps"):
        lines += [
            f"- Each GPU then shows as {replicas(dep)} `nvidia.com/gpu` replicas; the scheduler "
            "places each server on a replica, which "
            "on a node with several GPUs need not be a replica of the same GPU.",
        ]
    if dep.sharing == "mps":
        lines.append(
            "- MPS through the device plugin gives every replica an equal share of the GPU's "
            "SMs and memory (1/replicas each); the measured condition ran one coserve MPS "
            "daemon with only the limits its options set. Re-measure before relying on it."
        )
    if dep.mig is not None:
        lines.append(
            f"- The MIG manager (GPU Operator) with `mig-config.yaml` as its config, the GPU "
            f"nodes labelled `nvidia.com/mig.config={dep.mig.config_name}`, and the device "
            "plugin with `migStrategy: mixed` (`device-plugin-config.yaml`), so that it "
            "advertises `nvidia.com/mig-<profile>` resources."
        )
    lines += [
        "",
        "## Apply",
        "",
        "```",
        *[f"kubectl apply -f {f}" for f in files if f != "coserve.yaml"],
        "kubectl apply -f coserve.yaml",
        "```",
        "",
        "Embed waits (init container) for gen's /health before it starts: two engines sizing "
        "their memory at once on one GPU mis-size it. The servers listen on 0.0.0.0 without an "
        "API key: add `--api-key` to their arguments before exposing the Services.",
    ]
    if dep.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in dep.notes]]
    return "\n".join(lines) + "\n"


def render(dep: Deployment) -> dict[str, str]:
    """{file name: text}: the objects (multi-document YAML) and README.md."""
    files = {
        name: header(dep, "see README.md") + to_yaml(*objs) for name, objs in objects(dep).items()
    }
    files["README.md"] = _readme(dep, list(files))
    if "builtin" in dep.engines:
        files["Dockerfile"] = DOCKERFILE
    return files
