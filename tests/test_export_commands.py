"""`coserve export --format commands`: the study's conditions as bash scripts (checked with
`bash -n`), and one script run for real on the CPU."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from export_cases import CASES, EXP, IDS, ROOT, deployment

from coserve.export import commands, compose
from coserve.export.model import build_deployment
from coserve.spec import loads_spec


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
    # Servers bind loopback unless the user sets HOST (0.0.0.0 was written in).
    assert "\nHOST=${HOST:-127.0.0.1}\n" in text and "0.0.0.0" not in text.replace(
        "HOST=0.0.0.0", ""
    )
    assert text.count('--host "$HOST"') == len(dep.servers)
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
    (tmp_path / "serve.sh").write_text(commands.render(dep)["serve.sh"])  # binds 127.0.0.1
    calls = tmp_path / "calls.log"
    mps_dir_before = os.path.exists(commands.MPS_DIR)
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
    if not mps_dir_before:  # the daemon wrote no log: nothing of it is left
        assert not os.path.exists(commands.MPS_DIR)
