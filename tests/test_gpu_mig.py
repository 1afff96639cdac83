"""MIG plans: profile parsing, validation against the GPU's profiles (fake NVML and the built-in
tables), the study's layout on H200 and H100, MIG off, existing instances, --apply-mig."""

from __future__ import annotations

import io

import pytest

from coserve.gpu import mig
from coserve.gpu.fakes import FakeNvml, fake_gpu
from coserve.gpu.strategies import StrategyError, make_strategy

ROLES = ["gen", "embed"]


def test_parse_profiles():
    assert mig.parse_profiles("4g.71gb+3g.71gb") == ["4g.71gb", "3g.71gb"]
    assert mig.parse_profiles(["MIG 4g.40gb", "3G.40GB"]) == ["4g.40gb", "3g.40gb"]
    with pytest.raises(mig.MigError, match="bad MIG profile '4g'"):
        mig.parse_profiles("4g+3g.40gb")


@pytest.mark.parametrize(
    "name, mem, layout",
    [
        ("NVIDIA H200", 143771, ["4g.71gb", "3g.71gb"]),
        ("NVIDIA H100 80GB HBM3", 81559, ["4g.40gb", "3g.40gb"]),
        ("NVIDIA H100 NVL", 95830, ["4g.47gb", "3g.47gb"]),
        ("NVIDIA A100-SXM4-40GB", 40960, ["4g.20gb", "3g.20gb"]),
    ],
)
def test_study_layout_from_builtin_tables(name, mem, layout):
    plan = mig.make_plan("0", name, mem, "auto", ROLES)
    assert plan.profiles == layout and plan.source.startswith("builtin:")
    text = plan.render()
    assert "gen    -> " + layout[0] in text and "7/7 compute" in text and "8/8 memory" in text
    assert f"nvidia-smi mig -i 0 -cgi {layout[0]},{layout[1]} -C" in text


def test_validation_against_builtin_table():
    with pytest.raises(mig.MigError, match=r"does not offer 4g\.71gb.*offers 1g\.10gb.*4g\.40gb"):
        mig.make_plan("0", "NVIDIA H100 80GB HBM3", 81559, "4g.71gb+3g.71gb", ROLES)
    with pytest.raises(mig.MigError, match="needs 8 compute slices"):
        mig.make_plan("0", "NVIDIA H200", 143771, "4g.71gb+4g.71gb", ROLES)
    with pytest.raises(mig.MigError, match="needs 12 memory slices"):
        mig.make_plan("0", "NVIDIA H200", 143771, "3g.71gb+3g.71gb+3g.71gb", ROLES + ["other"])
    with pytest.raises(mig.MigError, match="no MIG profiles known"):
        mig.make_plan("0", "NVIDIA L4", 23034, "1g.5gb+1g.5gb", ROLES)
    with pytest.raises(mig.MigError, match="1 profiles for 2 servers"):
        mig.make_plan("0", "NVIDIA H200", 143771, "7g.141gb", ROLES)


def test_validation_against_nvml_profiles():
    # the driver's list wins over the built-in table: here a GPU that only offers the 7g profile
    supported = {
        "7g.80gb": {
            "slices": 7,
            "memory_mib": 80384,
            "instances": 1,
            "sms": 132,
            "profile_id": 4,
            "nvml_id": 4,
        }
    }
    with pytest.raises(
        mig.MigError, match=r"does not offer 4g\.40gb, 3g\.40gb; it offers 7g\.80gb \(from nvml\)"
    ):
        mig.make_plan("0", "NVIDIA H100 80GB HBM3", 81559, "4g.40gb+3g.40gb", ROLES, supported)


def test_mig_off_prints_plan_and_says_what_is_missing():
    nv = FakeNvml([fake_gpu("NVIDIA H200", memory_mib=143771, mig=False)])
    out = io.StringIO()
    with pytest.raises(mig.MigError) as ei:
        mig.resolve("0", "auto", ROLES, nvml=nv, out=out)
    msg = str(ei.value)
    assert "MIG mode is off on GPU 0 (NVIDIA H200)" in msg
    assert "Missing: MIG mode, then the instances 4g.71gb+3g.71gb" in msg
    assert "nvidia-smi -i 0 -mig 1" in msg and "--apply-mig" in msg
    assert "[profiles checked against nvml]" in msg
    assert (
        "MIG plan for GPU 0 (NVIDIA H200): 4g.71gb+3g.71gb" in out.getvalue()
    )  # printed, not only raised
    assert nv.init_count == 0  # NVML closed again


def test_mig_unsupported_gpu_and_no_gpu():
    nv = FakeNvml([fake_gpu("NVIDIA L4", memory_mib=23034, mig=None)])
    with pytest.raises(mig.MigError, match=r"GPU 0 \(NVIDIA L4\) does not support MIG"):
        mig.resolve("0", "auto", ROLES, nvml=nv, out=io.StringIO())
    with pytest.raises(
        mig.MigError,
        match=r"(?s)MIG needs an NVIDIA GPU.*no GPU.*plan \(unchecked.*4g\.71gb\+3g\.71gb",
    ):
        mig.resolve(
            "0", "4g.71gb+3g.71gb", ROLES, nvml=FakeNvml(fail_init="NVML Shared Library Not Found")
        )


def test_existing_instances_are_used_by_profile():
    devs = [
        {"uuid": "MIG-1", "profile": "3g.71gb", "gi_id": 2, "memory_mib": 70144},
        {"uuid": "MIG-2", "profile": "4g.71gb", "gi_id": 1, "memory_mib": 70144},
    ]
    nv = FakeNvml([fake_gpu("NVIDIA H200", memory_mib=143771, mig=True, mig_devices=devs)])
    plan, assigned, created = mig.resolve("0", "auto", ROLES, nvml=nv, out=io.StringIO())
    assert assigned == {"gen": "MIG-2", "embed": "MIG-1"} and created == []


def test_missing_instances_without_apply_are_not_created():
    devs = [{"uuid": "MIG-2", "profile": "4g.40gb", "gi_id": 1, "memory_mib": 40192}]
    nv = FakeNvml([fake_gpu(mig=True, mig_devices=devs)])
    ran = []
    with pytest.raises(
        mig.MigError,
        match=r"(?s)lacks MIG instances 3g\.40gb.*existing: 4g\.40gb MIG-2.*--apply-mig",
    ):
        mig.resolve(
            "0",
            "4g.40gb+3g.40gb",
            ROLES,
            nvml=nv,
            run_cmd=lambda *a, **k: ran.append(a),
            out=io.StringIO(),
        )
    assert ran == []


def test_apply_mig_creates_only_the_missing_instances():
    devs = [{"uuid": "MIG-2", "profile": "4g.40gb", "gi_id": 1, "memory_mib": 40192}]
    nv = FakeNvml([fake_gpu(mig=True, mig_devices=devs)])
    calls = []
    smi = nv.fake_nvidia_smi()

    def run_cmd(cmd, **kw):
        calls.append(cmd)
        return smi(cmd, **kw)

    out = io.StringIO()
    plan, assigned, created = mig.resolve(
        "0", "4g.40gb+3g.40gb", ROLES, apply=True, nvml=nv, run_cmd=run_cmd, out=out
    )
    assert calls == [["nvidia-smi", "mig", "-i", "0", "-cgi", "3g.40gb", "-C"]]
    assert (
        created == ["3g.40gb"]
        and assigned["gen"] == "MIG-2"
        and assigned["embed"].startswith("MIG-fake-0-")
    )
    printed = out.getvalue()
    assert printed.index("MIG plan for GPU 0") < printed.index("--apply-mig: creating 3g.40gb")


def test_apply_mig_failure_is_reported():
    nv = FakeNvml([fake_gpu(mig=True)])

    def run_cmd(cmd, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(returncode=6, stdout="", stderr="Insufficient Resources")

    with pytest.raises(mig.MigError, match=r"(?s)exited 6.*Insufficient Resources"):
        mig.resolve("0", "auto", ROLES, apply=True, nvml=nv, run_cmd=run_cmd, out=io.StringIO())


def test_mig_strategy_error_when_off(tmp_path):
    nv = FakeNvml([fake_gpu(mig=False)])
    with pytest.raises(StrategyError, match=r"(?s)MIG mode is off.*4g\.40gb\+3g\.40gb"):
        with make_strategy("mig", ["0"], {}, tmp_path, nvml=nv):
            pass
