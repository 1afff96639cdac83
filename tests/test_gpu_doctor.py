"""`coserve doctor`: exits 0 and says "no GPU" plainly on a CPU machine; with a (fake) GPU the
table carries name, memory, driver, CUDA, compute mode, MIG, GPM and the MPS/profiler rows, and
says which parts have run on hardware and which are built but not run there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from coserve.gpu import doctor
from coserve.gpu.fakes import FakeNvml, fake_gpu


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "coserve", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_doctor_on_this_machine_exits_0():
    r = _cli()
    assert r.returncode == 0, r.stderr
    assert "coserve doctor" in r.stdout and "MPS control" in r.stdout and "torch" in r.stdout
    facts = doctor.gather(with_torch=False)
    if not facts["gpus"]:  # the CPU CI machine
        assert r.stdout.lstrip().startswith("no GPU")


def test_doctor_json(capsys):
    from types import SimpleNamespace

    assert doctor.run(SimpleNamespace(json=True)) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {"gpu", "gpus", "mps", "tools", "torch"} <= set(facts)


def test_no_gpu_rows():
    facts = doctor.gather(FakeNvml(fail_init="NVML Shared Library Not Found"), with_torch=False)
    rows = dict(doctor.rows(facts))
    assert rows["GPU"] == "no GPU: NVML could not be initialised (NVML Shared Library Not Found)"


def test_gpu_rows_from_fake_nvml():
    mig_on = fake_gpu(
        "NVIDIA H200",
        index=1,
        memory_mib=143771,
        mig=True,
        mig_devices=[{"uuid": "MIG-x", "profile": "4g.71gb", "gi_id": 1, "memory_mib": 70144}],
    )
    nv = FakeNvml([fake_gpu(compute_mode=3), mig_on])
    facts = doctor.gather(nv, with_torch=False)
    rows = dict(doctor.rows(facts))
    assert rows["GPUs"] == "2 GPU(s)"
    assert rows["driver / CUDA"] == "580.159.04 / CUDA 13.0"
    assert rows["GPU 0"].startswith("NVIDIA H100 80GB HBM3, 81,559 MiB, GPU-fake-0000")
    assert rows["GPU 0 compute mode"] == "EXCLUSIVE_PROCESS"
    assert rows["GPU 0 MIG"] == "disabled"
    assert (
        "study layout: 4g.40gb+3g.40gb" in rows["GPU 0 MIG profiles"]
        and "(from nvml)" in rows["GPU 0 MIG profiles"]
    )
    assert rows["GPU 1 MIG"] == "enabled; 4g.71gb MIG-x"
    assert "study layout: 4g.71gb+3g.71gb" in rows["GPU 1 MIG profiles"]
    assert rows["GPU 0 GPM"] == "yes"
    assert {
        "MPS control",
        "MPS server",
        "MPS daemons running",
        "ncu",
        "nsys",
        "dcgmi",
        "vLLM",
    } <= set(rows)
    assert nv.init_count == 0


def test_says_what_has_not_run_on_hardware():
    facts = doctor.gather(FakeNvml(fail_init="NVML Shared Library Not Found"), with_torch=False)
    rows = dict(doctor.rows(facts))
    for part in (
        "coserve bench against vLLM, SGLang or TEI servers",
        "launcher 'vllm' (binary or docker)",
        "MIG: instance creation (apply_mig), servers on MIG devices",
    ):
        assert rows[part] == "built, not run on hardware", part
    assert (
        rows["coserve run/bench/report with the built-in servers: timeslice, mps, graphs and eager"]
        == "ran: H200, 2026-11-25 (docs/study.md)"
    )
    assert {"part": "launcher 'vllm' (binary or docker)", "ran_on": None} in facts["hardware"]
    assert rows["serve colocated: a disjoint SM split (--gen-sms; GPU test and 2 reps)"] == (
        "ran: H200 (GPU 0 of 2), 2026-11-30 (docs/co-scheduling.md, third measurements)"
    )
    if facts["python"]["cuda-bindings"] is None:
        assert rows["cuda-bindings"] == "missing (serve colocated --gen-sms is refused)"
    else:
        assert rows["cuda-bindings"][0].isdigit()  # its version
    r = _cli()
    assert "built, not run on hardware" in r.stdout and "launcher 'vllm'" in r.stdout
