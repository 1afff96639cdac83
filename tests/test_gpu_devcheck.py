"""coserve.gpu.devcheck's bookkeeping on CPU: a check whose precondition the machine lacks (MIG
off, a driver without client priority) is recorded as "not run", never as a pass, and the summary
counts pass, fail and not run apart. The on-GPU run itself is tests/test_gpu_device.py."""

from __future__ import annotations

import pytest

from coserve.gpu import devcheck
from coserve.gpu.fakes import FakeNvml, fake_gpu


@pytest.fixture(autouse=True)
def fresh_results(monkeypatch):
    monkeypatch.setattr(devcheck, "results", [])


def statuses() -> list[tuple[str, str]]:
    return [(r.name, r.status) for r in devcheck.results]


def test_mig_off_is_not_run_and_the_error_is_checked():
    devcheck.mig_step(FakeNvml([fake_gpu("NVIDIA H200", memory_mib=143771, mig=False)]))
    assert statuses() == [
        ("MIG instances for gen + embed found on GPU 0", "not run"),
        ("MIG error names the plan", "pass"),
    ]
    assert devcheck.results[0].detail.startswith("MIG mode is off on GPU 0 (NVIDIA H200)")


def test_mig_on_with_the_instances_passes():
    devs = [
        {"uuid": "MIG-1", "profile": "3g.71gb", "gi_id": 2, "memory_mib": 70144},
        {"uuid": "MIG-2", "profile": "4g.71gb", "gi_id": 1, "memory_mib": 70144},
    ]
    devcheck.mig_step(
        FakeNvml([fake_gpu("NVIDIA H200", memory_mib=143771, mig=True, mig_devices=devs)])
    )
    assert statuses() == [("MIG instances for gen + embed found on GPU 0", "pass")]


def test_mig_on_with_an_instance_missing_is_not_run():
    devs = [{"uuid": "MIG-2", "profile": "4g.40gb", "gi_id": 1, "memory_mib": 40192}]
    devcheck.mig_step(FakeNvml([fake_gpu(mig=True, mig_devices=devs)]))
    assert statuses()[0] == ("MIG instances for gen + embed found on GPU 0", "not run")


@pytest.mark.parametrize(
    ("supported", "status"), [(True, "pass"), (False, "not run"), (None, "not run")]
)
def test_client_priority_passes_only_where_libcuda_knows_it(supported, status):
    devcheck.priority_step(supported)
    assert statuses() == [("client priority known to libcuda", status)]


def test_summary_counts_the_three_states_apart(capsys):
    devcheck.check("a", True)
    devcheck.check("b", False, "broke")
    devcheck.not_run("c", "MIG is off")
    devcheck.not_run("d", "no priority")
    assert devcheck.summary_line(devcheck.results) == "1 passed, 1 failed, 2 not run (of 4 checks)"
    assert capsys.readouterr().out.splitlines() == [
        "[PASS] a",
        "[FAIL] b: broke",
        "[NOT RUN] c: MIG is off",
        "[NOT RUN] d: no priority",
    ]
