"""Sharing strategies: the environment each server gets, option validation, machine checks
(compute mode through a fake NVML), tp combined with timeslice and mps."""

from __future__ import annotations

from pathlib import Path

import pytest

from coserve.gpu.fake_mps import install_fake_mps_control
from coserve.gpu.fakes import FakeNvml, fake_gpu
from coserve.gpu.strategies import BASE_ENV, StrategyError, make_strategy


def test_every_env_disables_nvlink_multicast(tmp_path):
    for name, gpus, opts in [
        ("exclusive", ["0", "1"], {}),
        ("timeslice", ["0"], {}),
        ("timeslice", [], {}),
        ("tp", ["0", "1"], {"tp": 2}),
        ("mps", ["0"], {}),
    ]:
        s = make_strategy(name, gpus, opts, tmp_path)
        for role in ("gen", "embed"):
            env = s.env_for(role)
            assert env["NCCL_NVLS_ENABLE"] == "0", (name, role)
            assert all(env[k] == v for k, v in BASE_ENV.items())


def test_exclusive_one_gpu_per_model(tmp_path):
    s = make_strategy("exclusive", ["0", "1"], {}, tmp_path)
    assert s.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "0"
    assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "1"
    assert s.env_for("gen")["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert s.telemetry_devices() == ["0", "1"]
    assert s.tensor_parallel_size("gen") == s.tensor_parallel_size("embed") == 1
    d = s.describe()
    assert d["strategy"] == "exclusive" and d["roles"]["embed"]["devices"] == ["1"]


def test_exclusive_refuses_shared_or_missing_gpus(tmp_path):
    with pytest.raises(StrategyError, match="needs 2 GPUs"):
        make_strategy("exclusive", ["0"], {}, tmp_path)
    with pytest.raises(StrategyError, match="no shared GPU"):
        make_strategy("exclusive", ["0", "1"], {"gen_gpus": ["0"], "embed_gpus": ["0"]}, tmp_path)


def test_timeslice_same_gpus_and_private_empty_mps_pipe(tmp_path):
    nv = FakeNvml([fake_gpu()])
    with make_strategy("timeslice", ["0"], {}, tmp_path, nvml=nv) as s:
        for role in ("gen", "embed"):
            env = s.env_for(role)
            assert env["CUDA_VISIBLE_DEVICES"] == "0"
            # points away from any default MPS daemon, at an empty dir of ours
            assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "no-mps")
            assert not any((tmp_path / "no-mps").iterdir())
        assert any("compute mode DEFAULT" in n for n in s.describe()["notes"])


def test_timeslice_on_cpu_sets_no_devices(tmp_path):
    with make_strategy("timeslice", [], {}, tmp_path) as s:
        env = s.env_for("gen")
        assert "CUDA_VISIBLE_DEVICES" not in env and env["NCCL_NVLS_ENABLE"] == "0"
        assert s.telemetry_devices() == []


def test_timeslice_refuses_exclusive_process_gpu(tmp_path):
    nv = FakeNvml([fake_gpu(compute_mode=3)])
    s = make_strategy("timeslice", ["0"], {}, tmp_path, nvml=nv)
    with pytest.raises(
        StrategyError, match="EXCLUSIVE_PROCESS compute mode: two servers cannot share"
    ):
        with s:
            pass


def test_mps_refuses_exclusive_process_unless_allowed(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    install_fake_mps_control(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    nv = FakeNvml([fake_gpu(compute_mode=3)])
    s = make_strategy("mps", ["0"], {}, tmp_path / "a", nvml=nv)
    with pytest.raises(
        StrategyError, match="EXCLUSIVE_PROCESS compute mode.*allow_exclusive_process"
    ):
        with s:
            pass
    assert s.daemon is None  # refused before anything started
    with make_strategy(
        "mps", ["0"], {"allow_exclusive_process": True}, tmp_path / "b", nvml=nv
    ) as s2:
        assert s2.daemon.running
        # the daemon sees the GPU by UUID, clients by the MPS server's own numbering
        assert s2.daemon.cuda_visible_devices == "GPU-fake-0000"
        assert s2.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "0"
    assert s2.daemon.proc is None


def test_prohibited_gpu_refused(tmp_path):
    nv = FakeNvml([fake_gpu(compute_mode=2)])
    with pytest.raises(StrategyError, match="PROHIBITED"):
        with make_strategy(
            "exclusive",
            ["0", "1"],
            {},
            tmp_path,
            nvml=FakeNvml([fake_gpu(compute_mode=2), fake_gpu(index=1)]),
        ):
            pass
    with pytest.raises(StrategyError, match="not found by NVML"):
        with make_strategy("timeslice", ["3"], {}, tmp_path, nvml=nv):
            pass


def test_mps_env_per_server_options(tmp_path):
    s = make_strategy(
        "mps",
        ["0"],
        {
            "active_thread_percentage": {"embed": 40},
            "pinned_mem_limit": {"gen": "40G", "embed": "12G"},
            "client_priority": {"gen": "normal", "embed": "below_normal"},
        },
        tmp_path,
    )
    gen, embed = s.env_for("gen"), s.env_for("embed")
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in gen
    assert embed["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert gen["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=40G"
    assert embed["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=12G"
    assert gen["CUDA_MPS_CLIENT_PRIORITY"] == "0" and embed["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    # one value for both servers
    s2 = make_strategy("mps", ["0"], {"active_thread_percentage": 50}, tmp_path)
    assert (
        s2.env_for("gen")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        == s2.env_for("embed")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        == "50"
    )


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"active_thread_percentage": 0}, "active_thread_percentage"),
        ({"active_thread_percentage": {"gen": 150}}, "active_thread_percentage"),
        (  # a string was taken as its number
            {"active_thread_percentage": "50"},
            r"option active_thread_percentage \(gen\): expected a number in \(0, 100\], got '50'",
        ),
        ({"active_thread_percentage": {"decoder": 50}}, "unknown role"),
        ({"pinned_mem_limit": "lots"}, "pinned_mem_limit"),
        ({"client_priority": "high"}, "client_priority"),
        ({"thread_pct": 50}, "unknown option.*allowed: .*active_thread_percentage"),
    ],
)
def test_mps_bad_options_named(tmp_path, opts, match):
    with pytest.raises(StrategyError, match=match):
        make_strategy("mps", ["0"], opts, tmp_path)


def test_unknown_strategy_and_options(tmp_path):
    with pytest.raises(
        StrategyError, match="unknown strategy 'mig2'.*exclusive, timeslice, mps, mig, tp"
    ):
        make_strategy("mig2", ["0"], {}, tmp_path)
    with pytest.raises(StrategyError, match="strategy timeslice: unknown option"):
        make_strategy("timeslice", ["0"], {"profiles": "4g.40gb+3g.40gb"}, tmp_path)
    with pytest.raises(StrategyError, match="needs at least one GPU"):
        make_strategy("mps", [], {}, tmp_path)
    with pytest.raises(StrategyError, match="unknown server role"):
        make_strategy("timeslice", ["0"], {}, tmp_path).env_for("rerank")


def test_tp_timeslice_both_models_over_two_gpus(tmp_path):
    s = make_strategy("tp", ["0", "1"], {"tp": 2}, tmp_path)
    assert s.tensor_parallel_size("gen") == s.tensor_parallel_size("embed") == 2
    assert s.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "0,1"
    d = s.describe()
    assert d["strategy"] == "tp" and d["sharing"] == "timeslice"
    assert d["roles"]["gen"]["tensor_parallel_size"] == 2


def test_tp_degree_per_server_and_gpu_lists(tmp_path):
    s = make_strategy(
        "tp", ["0", "1", "2"], {"gen_tp": 2, "embed_tp": 1, "embed_gpus": ["2"]}, tmp_path
    )
    assert s.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "2"
    assert (s.tensor_parallel_size("gen"), s.tensor_parallel_size("embed")) == (2, 1)
    assert s.telemetry_devices() == ["0", "1", "2"]
    with pytest.raises(StrategyError, match="TP=4 but the condition has 2"):
        make_strategy("tp", ["0", "1"], {"tp": 4}, tmp_path)
    with pytest.raises(StrategyError, match="TP=2 but 1 GPU"):
        make_strategy("tp", ["0", "1"], {"tp": 2, "gen_gpus": ["1"]}, tmp_path)
    with pytest.raises(StrategyError, match=r"option tp: expected an integer >= 1.*1\.5"):
        make_strategy("tp", ["0", "1"], {"tp": 1.5}, tmp_path)
    with pytest.raises(StrategyError, match='need sharing = "mps"'):
        make_strategy("tp", ["0", "1"], {"tp": 2, "active_thread_percentage": 50}, tmp_path)


def test_tp_with_mps_uses_the_daemons_numbering(tmp_path):
    s = make_strategy(
        "tp+mps",
        ["4", "5"],
        {
            "gen_tp": 2,
            "embed_tp": 1,
            "embed_gpus": ["5"],
            "active_thread_percentage": {"embed": 30},
        },
        tmp_path,
    )
    assert s.describe()["sharing"] == "mps"
    # the MPS server re-numbers its GPUs 4,5 as 0,1
    assert s.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "1"
    assert s.env_for("embed")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    with pytest.raises(StrategyError, match="contradicts"):
        make_strategy("tp+mps", ["0"], {"sharing": "timeslice"}, tmp_path)


def test_mig_strategy_validates_options(tmp_path):
    with pytest.raises(StrategyError, match="option profiles"):
        make_strategy("mig", ["0"], {"profiles": "4g.71gb+3g"}, tmp_path)
    with pytest.raises(StrategyError, match="3 profiles for 2 servers"):
        make_strategy("mig", ["0"], {"profiles": "3g.40gb+2g.20gb+2g.20gb"}, tmp_path)
    with pytest.raises(StrategyError, match="one parent GPU"):
        make_strategy("mig", ["0", "1"], {}, tmp_path)


def test_mig_strategy_pins_servers_to_mig_uuids(tmp_path):
    gpu = fake_gpu(
        mig=True,
        mig_devices=[
            {"uuid": "MIG-aaa", "profile": "3g.40gb", "gi_id": 2, "memory_mib": 40192},
            {"uuid": "MIG-bbb", "profile": "4g.40gb", "gi_id": 1, "memory_mib": 40192},
        ],
    )
    with make_strategy(
        "mig", ["0"], {"profiles": "4g.40gb+3g.40gb"}, tmp_path, nvml=FakeNvml([gpu])
    ) as s:
        assert s.env_for("gen")["CUDA_VISIBLE_DEVICES"] == "MIG-bbb"
        assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "MIG-aaa"
        assert s.telemetry_devices() == ["MIG-bbb", "MIG-aaa"]
        assert s.describe()["mig"]["plan"]["profiles"] == ["4g.40gb", "3g.40gb"]
    # MIG device UUIDs given directly
    with make_strategy("mig", ["MIG-x", "MIG-y"], {}, tmp_path) as s:
        assert s.env_for("embed")["CUDA_VISIBLE_DEVICES"] == "MIG-y"


def test_strategy_error_names_its_option_and_role(tmp_path):
    with pytest.raises(StrategyError) as e:
        make_strategy("mps", ["0"], {"active_thread_percentage": {"embed": 150}}, tmp_path)
    assert (e.value.option, e.value.role) == ("active_thread_percentage", "embed")
    assert str(e.value) == f"option active_thread_percentage (embed): {e.value.detail}"
    with pytest.raises(StrategyError) as e:
        make_strategy("timeslice", ["0"], {"bogus": 1}, tmp_path)
    assert e.value.option is None and e.value.about_options


def test_nvml_session_shuts_nvml_down_also_on_errors():
    from coserve.gpu.nvml import NvmlUnavailable, nvml_session

    class Lib:
        calls: list[str] = []

        def nvmlInit(self):
            self.calls.append("init")

        def nvmlShutdown(self):
            self.calls.append("shutdown")

    lib = Lib()
    with pytest.raises(RuntimeError), nvml_session(lib):
        raise RuntimeError("inside")
    assert lib.calls == ["init", "shutdown"]

    class Broken(Lib):
        def nvmlInit(self):
            raise OSError("no driver")

    with pytest.raises(NvmlUnavailable, match="no driver"), nvml_session(Broken()):
        pytest.fail("the body must not run")
