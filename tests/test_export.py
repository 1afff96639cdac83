"""`coserve export`: the study's conditions written as Docker Compose, Kubernetes objects and
shell scripts, each checked by a reader that refuses a misspelled field (the kubernetes
client's models, a schema of the compose keys, `docker-compose config` where installed,
`bash -n`), and the conditions that have no deployment refused with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from coserve.cli import main
from coserve.export import commands, compose, k8s
from coserve.export.model import ExportError, build_deployment
from coserve.spec import load_spec, loads_spec

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"

# (spec file, condition, engine, mig GPU): every way of sharing the specs have.
CASES = [
    ("seed-single-gpu", "timeslice", "vllm", None),
    ("seed-single-gpu", "mps", "vllm", None),
    ("seed-single-gpu", "mps", "builtin", None),
    ("demo", "co-located", None, None),
    ("demo", "gen-only", None, None),
    ("seed-tp2", "exclusive-tp1", "vllm", None),
    ("seed-tp2", "tp2-timeslice", "vllm", None),
    ("seed-tp2", "tp2-mps", "vllm", None),
    ("seed-mig", "mig-colocated", "vllm", "H200"),
    ("seed-mig", "mig-gen-only", "builtin", "H200"),
    ("co-scheduling", "mps-sm50", "vllm", None),
    ("co-scheduling", "mps-low-priority", "builtin", None),
    ("co-scheduling", "timeslice-guard5", "builtin", None),
    ("demo-equal-work", "timeslice.embed-r2", None, None),
]
IDS = [f"{s}:{c}:{e or 'spec'}" for s, c, e, _ in CASES]
K8S_CASES = [c for c in CASES if c[1] not in ("tp2-timeslice", "tp2-mps")]


def deployment(spec: str, cond: str, engine: str | None = None, mig_gpu: str | None = None):
    return build_deployment(load_spec(EXP / f"{spec}.toml"), cond, engine=engine, mig_gpu=mig_gpu)


# -- compose ------------------------------------------------------------------------------
_STR_LIST = {"type": "array", "items": {"type": "string"}}


def _closed(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "required": list(required),
    }


_DEVICE = _closed(
    {"driver": {"type": "string"}, "device_ids": _STR_LIST, "capabilities": _STR_LIST},
    ("capabilities",),
)
_SERVICE = _closed(
    {
        "image": {"type": "string"},
        "entrypoint": _STR_LIST,
        "command": _STR_LIST,
        "ipc": {"enum": ["host"]},
        "ports": _STR_LIST,
        "environment": {"type": "object", "additionalProperties": {"type": "string"}},
        "volumes": _STR_LIST,
        "healthcheck": _closed(
            {
                "test": _STR_LIST,
                "interval": {"type": "string"},
                "timeout": {"type": "string"},
                "retries": {"type": "integer"},
                "start_period": {"type": "string"},
            },
            ("test",),
        ),
        "deploy": _closed(
            {
                "resources": _closed(
                    {"reservations": _closed({"devices": {"type": "array", "items": _DEVICE}})}
                )
            }
        ),
        "depends_on": {
            "type": "object",
            "additionalProperties": _closed(
                {"condition": {"enum": ["service_healthy", "service_started"]}}, ("condition",)
            ),
        },
    },
    ("image",),
)
# The Compose specification's keys that export writes, closed: another key is an error.
COMPOSE_SCHEMA = _closed(
    {
        "services": {"type": "object", "additionalProperties": _SERVICE},
        "volumes": {"type": "object", "additionalProperties": _closed({})},
    },
    ("services",),
)


def compose_data(dep) -> dict:
    files = compose.render(dep)
    return yaml.safe_load(files["docker-compose.yml"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compose_matches_the_schema_and_the_rules(case):
    dep = deployment(*case)
    data = compose_data(dep)
    jsonschema.validate(data, COMPOSE_SCHEMA)
    services = data["services"]
    roles = [s.role for s in dep.servers]
    for role in roles:
        svc = services[role]
        assert svc["ipc"] == "host"
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        server = dep.server(role)
        if server.uses_gpu:
            assert svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        else:  # a spec's cpu server (demo-equal-work) asks for no GPU
            assert "deploy" not in svc and server.launch.device == "cpu"
    if len(roles) == 2:
        assert services["embed"]["depends_on"]["gen"] == {"condition": "service_healthy"}
    if dep.sharing == "mps":
        daemon = services[compose.MPS_SERVICE]
        assert daemon["entrypoint"] == ["nvidia-cuda-mps-control", "-f"]
        for role in roles:
            env = services[role]["environment"]
            assert (
                env["CUDA_MPS_PIPE_DIRECTORY"] == daemon["environment"]["CUDA_MPS_PIPE_DIRECTORY"]
            )
            assert "CUDA_MPS_LOG_DIRECTORY" in env
            assert services[role]["depends_on"][compose.MPS_SERVICE]["condition"] == (
                "service_healthy"
            )
            assert any(v.startswith("mps-pipe:") for v in services[role]["volumes"])
    else:
        assert compose.MPS_SERVICE not in services


def test_compose_maps_the_spec_to_vllm_flags():
    data = compose_data(deployment("seed-tp2", "tp2-mps", "vllm"))
    gen, embed = data["services"]["gen"], data["services"]["embed"]
    assert gen["image"].startswith("vllm/vllm-openai:")
    assert gen["command"][0] == "Qwen/Qwen3-30B-A3B-FP8"
    flags = dict(zip(gen["command"][1::2], gen["command"][2::2], strict=False))
    assert flags["--gpu-memory-utilization"] == "0.5"
    assert flags["--max-model-len"] == "4096"
    assert flags["--max-num-seqs"] == "512"
    assert flags["--tensor-parallel-size"] == "2"
    assert embed["command"][0] == "Qwen/Qwen3-Embedding-8B"
    assert "--convert" in embed["command"]
    # Both TP=2 servers are clients of one daemon on both GPUs.
    assert data["services"]["mps-daemon"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ] == ["0", "1"]
    assert gen["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_compose_sets_the_conditions_mps_limits_per_server():
    sm = compose_data(deployment("co-scheduling", "mps-sm50", "vllm"))["services"]
    assert sm["embed"]["environment"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in sm["gen"]["environment"]
    low = compose_data(deployment("co-scheduling", "mps-low-priority", "vllm"))["services"]
    assert low["embed"]["environment"]["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert "CUDA_MPS_CLIENT_PRIORITY" not in low["gen"]["environment"]


def test_compose_separate_gpus_and_builtin_guard():
    ex = compose_data(deployment("seed-tp2", "exclusive-tp1", "vllm"))["services"]
    ids = {r: ex[r]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for r in ex}
    assert ids == {"gen": ["0"], "embed": ["1"]}
    guard = compose_data(deployment("co-scheduling", "timeslice-guard5", "builtin"))["services"]
    cmd = guard["embed"]["command"]
    assert cmd[:6] == ["python3", "-P", "-m", "coserve", "serve", "embed"]
    assert cmd[cmd.index("--slo-guard-gen-url") + 1] == "http://gen:8000"
    assert cmd[cmd.index("--gen-tpot-slo-pct") + 1] == "5"


def test_compose_schema_catches_a_misspelled_key():
    data = compose_data(deployment("seed-single-gpu", "timeslice", "vllm"))
    data["services"]["gen"]["deplyo"] = data["services"]["gen"].pop("deploy")
    with pytest.raises(jsonschema.ValidationError, match="deplyo"):
        jsonschema.validate(data, COMPOSE_SCHEMA)


DOCKER_COMPOSE = os.environ.get("COSERVE_DOCKER_COMPOSE") or shutil.which("docker-compose")


def _compose_config(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COSERVE_GEN_MIG": "MIG-gen", "COSERVE_EMBED_MIG": "MIG-embed"}
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed")
def test_docker_compose_config_accepts_the_files(tmp_path):
    chosen = [c for c in CASES if c[1] in ("mps", "mig-colocated", "timeslice-guard5")]
    for spec, cond, engine, mig_gpu in chosen:
        path = tmp_path / f"{cond}.yml"
        path.write_text(
            compose.render(deployment(spec, cond, engine, mig_gpu))["docker-compose.yml"]
        )
        res = _compose_config(path)
        assert res.returncode == 0, f"{cond}: {res.stderr}"
    bad = yaml.safe_load(path.read_text())
    bad["services"]["gen"]["healthchek"] = bad["services"]["gen"].pop("healthcheck")
    path.write_text(yaml.safe_dump(bad))
    res = _compose_config(path)
    assert res.returncode != 0 and "healthchek" in res.stderr


# -- kubernetes ---------------------------------------------------------------------------
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


# -- commands -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_commands_script_is_valid_bash(case, tmp_path):
    dep = deployment(*case)
    text = commands.render(dep)["serve.sh"]
    path = tmp_path / "serve.sh"
    path.write_text(text)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for s in dep.servers:
        assert f"--port {s.port}" in text
    if dep.sharing == "mps":
        assert "nvidia-cuda-mps-control -d" in text
        assert "echo quit | nvidia-cuda-mps-control" in text
    else:
        assert "nvidia-cuda-mps-control" not in text


def test_commands_put_separate_gpus_and_mig_instances_apart():
    ex = commands.render(deployment("seed-tp2", "exclusive-tp1", "vllm"))["serve.sh"]
    assert "CUDA_VISIBLE_DEVICES=0 " in ex and "CUDA_VISIBLE_DEVICES=1 " in ex
    mg = commands.render(deployment("seed-mig", "mig-colocated", "builtin", "H200"))["serve.sh"]
    assert 'CUDA_VISIBLE_DEVICES="$COSERVE_GEN_MIG"' in mg
    assert "nvidia-smi mig -i 0 -cgi 4g.71gb,3g.71gb -C" in mg


def test_a_description_over_several_lines_stays_in_comments(tmp_path):
    text = (EXP / "demo.toml").read_text()
    text = text.replace('description = "both servers', 'description = "line one\\nline two: both')
    dep = build_deployment(loads_spec(text), "co-located")
    assert "line two" in dep.description
    assert yaml.safe_load(compose.render(dep)["docker-compose.yml"])["services"]
    (tmp_path / "serve.sh").write_text(commands.render(dep)["serve.sh"])
    assert subprocess.run(["bash", "-n", str(tmp_path / "serve.sh")]).returncode == 0
    assert "# line two: both" in commands.render(dep)["serve.sh"]


# -- the command, and what it refuses -------------------------------------------------------
def test_export_writes_files_from_a_spec_and_a_run_folder(tmp_path, capsys):
    out = tmp_path / "k8s"
    argv = ["export", str(EXP / "seed-single-gpu.toml"), "--condition", "mps", "--format", "k8s"]
    assert main([*argv, "--engine", "vllm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "coserve.yaml",
        "device-plugin-config.yaml",
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = load_spec(EXP / "demo.toml")
    (run_dir / "spec.json").write_text(json.dumps(spec.to_dict()))
    sh = tmp_path / "sh"
    argv = ["export", str(run_dir), "--condition", "co-located", "--format", "commands"]
    assert main([*argv, "--out", str(sh)]) == 0
    assert os.access(sh / "serve.sh", os.X_OK)
    assert "coserve serve embed --model all-minilm-l6-v2" in (sh / "serve.sh").read_text()


@pytest.mark.parametrize(
    "spec,cond,engine,reason",
    [
        ("co-scheduling", "colocated-streams", "vllm", "vLLM serves one model per process"),
        ("co-scheduling", "colocated-embed-sm36", None, "one-process co-serving"),
        ("co-scheduling", "mps-guard5", "vllm", "SLO guard"),
        ("demo", "co-located", "vllm", "'tiny-moe' has no Hugging Face checkpoint"),
        ("seed-mig", "mig-colocated", "vllm", "--mig-gpu"),
        ("demo", "nope", None, "conditions: gen-only, embed-only, co-located"),
    ],
)
def test_export_refuses_what_has_no_deployment(spec, cond, engine, reason, tmp_path, capsys):
    argv = ["export", str(EXP / f"{spec}.toml"), "--condition", cond, "--format", "compose"]
    argv += ["--out", str(tmp_path / "out")] + (["--engine", engine] if engine else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not all(map(_port_free, (8000, 8001))), reason="port 8000 or 8001 is taken")
def test_the_script_serves_and_stops_everything_it_started(tmp_path):
    """serve.sh of an MPS condition on the CPU: the daemon (a stand-in that logs its calls) is
    started, gen then embed answer, and on SIGTERM the servers and the daemon are stopped."""
    text = (EXP / "demo-equal-work.toml").read_text()
    text += '[[conditions]]\nname = "mps-sm50"\nstrategy = "mps"\n'
    text += "options = { active_thread_percentage = { embed = 50 } }\n"
    dep = build_deployment(loads_spec(text), "mps-sm50")
    # Servers on loopback only in tests; the script itself listens on every interface.
    script = commands.render(dep)["serve.sh"].replace("--host 0.0.0.0", "--host 127.0.0.1")
    (tmp_path / "serve.sh").write_text(script)
    calls = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/usr/bin/env bash\ninput=""\n[ "$*" = "-d" ] || input=$(cat)\n'
        f'echo "[$*] [$input] $CUDA_MPS_PIPE_DIRECTORY" >> {calls}\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "serve.sh")],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        import time
        import urllib.request

        deadline = time.monotonic() + 240
        while b"ready: gen" not in (tmp_path / "serve.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "serve.sh did not get both servers ready"
            time.sleep(0.5)
        body = json.dumps({"model": "all-minilm-l6-v2", "input": "hi"}).encode()
        req = urllib.request.Request(
            "http://127.0.0.1:8001/v1/embeddings", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.load(r)["data"][0]["embedding"]) == 384
        proc.terminate()
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()
    assert _port_free(8000) and _port_free(8001)
    lines = calls.read_text().splitlines()
    assert lines == [f"[-d] [] {commands.MPS_DIR}/pipe", f"[] [quit] {commands.MPS_DIR}/pipe"]
