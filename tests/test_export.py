"""`coserve export` to Docker Compose: the study's conditions written as compose files, each
checked against a closed schema of the keys export writes (and by `docker-compose config`
where it is installed); and the command itself, with the conditions it refuses.
Kubernetes: test_export_k8s.py; shell scripts: test_export_commands.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from export_cases import CASES, EXP, IDS, deployment

from coserve.cli import main
from coserve.export import compose
from coserve.export.model import build_deployment
from coserve.spec import load_spec, loads_spec

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
        port = dep.server(role).port
        assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]  # the host's loopback only
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


def _dollar_spec():
    text = (EXP / "demo.toml").read_text()
    text = text.replace(
        'model = "tiny-moe"', 'model = "tiny-moe"\nextra_args = ["--x=$HOME", "$(id)"]', 1
    )
    return loads_spec(text)


def test_compose_escapes_dollars_so_arguments_reach_the_server_as_written():
    dep = build_deployment(_dollar_spec(), "co-located")
    text = compose.render(dep)["docker-compose.yml"]
    command = yaml.safe_load(text)["services"]["gen"]["command"]
    assert command[-2:] == ["--x=$$HOME", "$$(id)"]
    assert dep.server("gen").argv()[-2:] == ["--x=$HOME", "$(id)"]  # what the server gets


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed")
def test_docker_compose_renders_the_escaped_dollars_literally(tmp_path):
    path = tmp_path / "docker-compose.yml"
    path.write_text(
        compose.render(build_deployment(_dollar_spec(), "co-located"))["docker-compose.yml"]
    )
    env = {**os.environ, "HOME": "/home-that-must-not-appear"}
    res = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    command = json.loads(res.stdout)["services"]["gen"]["command"]
    # Compose hands the container `$HOME` (its config output may write it re-escaped as $$).
    assert [a.replace("$$", "$") for a in command[-2:]] == ["--x=$HOME", "$(id)"]
    assert "/home-that-must-not-appear" not in res.stdout


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


def test_export_refuses_to_overwrite_its_files_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", str(EXP / "demo.toml"), "--condition", "co-located", "--format", "compose"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    (out / "docker-compose.yml").write_text("edited by hand\n")
    (out / "Dockerfile").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out / 'docker-compose.yml'} already exists; add --force to overwrite" in err
    assert (out / "docker-compose.yml").read_text() == "edited by hand\n"
    assert not (out / "Dockerfile").exists()  # refused before anything is written
    assert main([*argv, "--force"]) == 0
    assert "services:" in (out / "docker-compose.yml").read_text() and (out / "Dockerfile").exists()


def test_export_to_an_out_that_is_a_file_is_refused_naming_it(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    argv = ["export", str(EXP / "demo.toml"), "--condition", "co-located", "--format", "compose"]
    assert main([*argv, "--out", str(afile), "--force"]) == 2
    assert f"--out {afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine\n"


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


def test_a_preset_without_weights_and_random_weights_off_is_refused_for_builtin(tmp_path, capsys):
    text = (
        (EXP / "seed-single-gpu.toml")
        .read_text()
        .replace("random_weights = true", "random_weights = false")
    )
    (tmp_path / "real.toml").write_text(text)
    argv = ["export", str(tmp_path / "real.toml"), "--condition", "mps", "--format", "commands"]
    assert main([*argv, "--engine", "builtin", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "preset 'qwen3-30b-a3b' ships no weights for the built-in engine" in err, err
    assert "--engine vllm serves its checkpoint Qwen/Qwen3-30B-A3B-FP8" in err
    assert not (tmp_path / "b").exists()
    assert main([*argv, "--engine", "vllm", "--out", str(tmp_path / "v")]) == 0
    assert "--load-format dummy" not in (tmp_path / "v" / "serve.sh").read_text()


def test_the_random_weights_note_claims_only_what_holds():
    (tiny,) = [n for n in deployment("demo", "co-located").notes if "random weights" in n]
    assert "preset 'tiny-moe' ships no weights" in tiny and "drop random_weights" not in tiny
    assert "as the condition was measured" in tiny  # the spec's own launcher, builtin
    big = deployment("seed-single-gpu", "mps", "builtin").notes[0]
    assert "ships no weights" in big and "Qwen/Qwen3-30B-A3B-FP8" in big
    assert "drop random_weights in the spec and export with --engine vllm" in big
    for note in deployment("seed-single-gpu", "mps", "vllm").notes:
        assert "--load-format dummy" in note and "as the condition was measured" not in note
        assert "measured on the spec's builtin launcher, not on vllm" in note
        assert "drop random_weights in the spec to serve the trained checkpoint" in note
