"""`coserve export --format k8s`: every object of the study's conditions round-trips through
the official kubernetes client's models (a field the API lacks fails), the device plugin's
sharing and MIG configs, and what the device plugin cannot express refused."""

from __future__ import annotations

import pytest
import yaml
from export_cases import CASES, IDS, K8S_CASES, deployment

from coserve.export import k8s
from coserve.export.model import ExportError


def k8s_validate(doc: dict):
    """Load `doc` through the kubernetes client's model of its kind; a field the model does
    not have (the client drops it silently) or a required field missing raises."""
    from kubernetes import client

    kinds = {
        ("apps/v1", "Deployment"): "V1Deployment",
        ("v1", "Service"): "V1Service",
        ("v1", "ConfigMap"): "V1ConfigMap",
    }
    api = client.ApiClient()
    obj = api._ApiClient__deserialize(doc, kinds[(doc["apiVersion"], doc["kind"])])
    back = api.sanitize_for_serialization(obj)
    if back != doc:
        raise ValueError(f"fields the model does not know: {_diff(doc, back)}")
    return obj


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}" for k in a if k not in b]
        return out + [d for k in a if k in b for d in _diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=False))
            for d in _diff(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def k8s_docs(dep) -> dict[str, list[dict]]:
    files = k8s.render(dep)
    return {n: list(yaml.safe_load_all(t)) for n, t in files.items() if n.endswith(".yaml")}


@pytest.mark.parametrize("case", K8S_CASES, ids=[IDS[CASES.index(c)] for c in K8S_CASES])
def test_k8s_objects_load_through_the_kubernetes_models(case):
    dep = deployment(*case)
    docs = k8s_docs(dep)
    for doc in (d for ds in docs.values() for d in ds):
        k8s_validate(doc)
    objs = docs["coserve.yaml"]
    deployments = {
        o["metadata"]["labels"]["coserve/role"]: o for o in objs if o["kind"] == "Deployment"
    }
    services = [o for o in objs if o["kind"] == "Service"]
    assert sorted(deployments) == sorted(s.role for s in dep.servers)
    assert len(services) == len(deployments)
    for s in dep.servers:
        pod = deployments[s.role]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"
        assert ("resources" in c) == s.uses_gpu
        assert pod.get("hostIPC", False) == (dep.sharing == "mps")
    if "embed" in deployments and "gen" in deployments:
        init = deployments["embed"]["spec"]["template"]["spec"]["initContainers"][0]
        assert "coserve-" in init["command"][-1] and "/health" in init["command"][-1]
    readme = k8s.render(dep)["README.md"]
    assert "What must already be on the cluster" in readme


def _plugin_config(dep) -> dict:
    (cm,) = k8s_docs(dep)["device-plugin-config.yaml"]
    (text,) = cm["data"].values()
    return yaml.safe_load(text)


def test_k8s_device_plugin_sharing_configs():
    ts = _plugin_config(deployment("seed-single-gpu", "timeslice", "vllm"))
    assert ts["sharing"]["timeSlicing"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 2}]
    mps = _plugin_config(deployment("seed-single-gpu", "mps", "vllm"))
    assert mps["sharing"]["mps"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 2}]
    # Separate GPUs need no sharing config: each server asks for a whole GPU.
    ex = deployment("seed-tp2", "exclusive-tp1", "vllm")
    assert "device-plugin-config.yaml" not in k8s_docs(ex)


def test_k8s_mig_asks_for_instances_by_profile():
    dep = deployment("seed-mig", "mig-colocated", "vllm", "H200")
    docs = k8s_docs(dep)
    assert _plugin_config(dep)["flags"]["migStrategy"] == "mixed"
    limits = {
        o["metadata"]["labels"]["coserve/role"]: o["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"]
        for o in docs["coserve.yaml"]
        if o["kind"] == "Deployment"
    }
    assert limits == {
        "gen": {"nvidia.com/mig-4g.71gb": "1"},
        "embed": {"nvidia.com/mig-3g.71gb": "1"},
    }
    (cm,) = docs["mig-config.yaml"]
    layout = yaml.safe_load(cm["data"]["config.yaml"])["mig-configs"]["coserve-4g.71gb-3g.71gb"]
    assert layout[0]["mig-devices"] == {"4g.71gb": 1, "3g.71gb": 1}
    # A condition that runs gen alone still lays out both instances, as the run did.
    alone = k8s_docs(deployment("seed-mig", "mig-gen-only", "vllm", "H200"))
    (cm,) = alone["mig-config.yaml"]
    assert "3g.71gb: 1" in cm["data"]["config.yaml"]
    (gen_only, _service) = alone["coserve.yaml"]
    limits = gen_only["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/mig-4g.71gb": "1"}


def test_the_k8s_validator_catches_a_misspelled_field():
    (gen, *_) = k8s_docs(deployment("seed-single-gpu", "timeslice", "vllm"))["coserve.yaml"]
    k8s_validate(gen)
    container = gen["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(ValueError, match="readynessProbe"):
        k8s_validate(gen)
    del container["name"]
    with pytest.raises(ValueError, match="name"):
        k8s_validate(gen)


def test_k8s_refuses_tp_over_shared_gpus():
    for cond in ("tp2-timeslice", "tp2-mps"):
        with pytest.raises(ExportError, match="TP over shared GPUs"):
            k8s.render(deployment("seed-tp2", cond, "vllm"))


# the kubelet expands $(VAR) in a command and env values, and $$ to $: an argument naming a
# variable the container has reached the server as that variable's value
def test_k8s_escapes_dollars_so_arguments_reach_the_server_as_written():
    from pathlib import Path

    from coserve.export.model import build_deployment
    from coserve.spec import loads_spec

    text = (Path(__file__).parent.parent / "experiments" / "demo.toml").read_text()
    extra = 'extra_args = ["--x=$(NCCL_NVLS_ENABLE)", "a$$b"]'
    spec = loads_spec(text.replace('model = "tiny-moe"', f'model = "tiny-moe"\n{extra}', 1))
    dep = build_deployment(spec, "co-located")
    docs = k8s_docs(dep)["coserve.yaml"]
    (doc,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gen")
    ]
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["--x=$$(NCCL_NVLS_ENABLE)", "a$$$$b"]
    assert dep.server("gen").argv()[-2:] == ["--x=$(NCCL_NVLS_ENABLE)", "a$$b"]
