"""What a spec needs of the machine is checked before the first rep and by --dry-run: a CUDA
device, GPU indices that exist, memory for the weights; `coserve serve` refuses a model whose
weights cannot fit before allocating them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from runhelp import env

from coserve import memcheck
from coserve.cli import main
from coserve.experiment.fingerprint import gpu_state
from coserve.experiment.preflight import problems
from coserve.spec import loads_spec

GiB = 1 << 30
ONE_GPU = {
    "gpus": [{"index": 0, "uuid": "GPU-aaa", "memory_mib": 81559, "mig_devices": ["MIG-bbb"]}],
    "note": None,
}
NO_GPU = {"gpus": [], "note": "no GPU: NVML could not be initialised (test)"}
HAS_GPU = bool(gpu_state()["gpus"])


def spec(gen: str = 'model = "tiny-dense"', cond: str = "") -> str:
    return f"""
name = "p"
[servers.gen]
{gen}
[[conditions]]
name = "c"
servers = ["gen"]
{cond}
"""


def check(text: str, gpus: dict, ram_gib: float = 64, monkeypatch=None) -> list[str]:
    s = loads_spec(text)
    monkeypatch.setattr("coserve.experiment.preflight.ram_available", lambda: int(ram_gib * GiB))
    return problems(s, s.conditions, gpus)


def test_cuda_and_gpu_strategies_without_a_gpu(monkeypatch):
    (p,) = check(spec('model = "tiny-dense"\ndevice = "cuda"'), NO_GPU, monkeypatch=monkeypatch)
    assert p.startswith(
        "c: servers.gen.device is 'cuda' but this machine has no CUDA GPU (no GPU: NVML"
    )
    (p,) = check(spec(cond='strategy = "mps"'), NO_GPU, monkeypatch=monkeypatch)
    assert p.startswith("c: strategy 'mps' needs NVIDIA GPUs")
    assert (
        check(spec('model = "tiny-dense"\ndevice = "auto"'), NO_GPU, monkeypatch=monkeypatch) == []
    )


def test_gpus_that_do_not_exist(monkeypatch):
    (p,) = check(spec(cond="gpus = [99]"), ONE_GPU, monkeypatch=monkeypatch)
    assert p == "c: gpus '99' is not a GPU of this machine (GPUs: 0, or their UUIDs)"
    (p,) = check(spec(cond="gpus = [1]"), NO_GPU, monkeypatch=monkeypatch)
    assert "name GPUs this machine does not have" in p
    for ok in ("[0]", '["GPU-aaa"]', '["MIG-bbb"]'):
        assert check(spec(cond=f"gpus = {ok}"), ONE_GPU, monkeypatch=monkeypatch) == []


def test_weights_that_do_not_fit(monkeypatch):
    big = 'model = "qwen3-30b-a3b"\ndevice = "cpu"'
    (p,) = check(spec(big), NO_GPU, ram_gib=16, monkeypatch=monkeypatch)
    assert p.startswith(
        "c: qwen3-30b-a3b needs at least 113.7 GiB for its weights, more than the 16.0 GiB of RAM"
    )  # float32 on a CPU: the engine dequantises the FP8 checkpoint at load
    assert check(spec(big), NO_GPU, ram_gib=128, monkeypatch=monkeypatch) == []
    (p,) = check(
        spec('model = "qwen3-30b-a3b"\ngpu_memory_utilization = 0.2'),
        ONE_GPU,
        monkeypatch=monkeypatch,
    )
    assert (
        "more than the 15.9 GiB of GPU memory it may use" in p
        and "gpu_memory_utilization 0.2 of GPU 0" in p
    )
    assert (
        check(
            spec('model = "qwen3-30b-a3b"\ngpu_memory_utilization = 0.5'),
            ONE_GPU,
            monkeypatch=monkeypatch,
        )
        == []
    )


def test_a_model_the_built_in_server_cannot_load(monkeypatch, tmp_path):
    (p,) = check(spec('model = "no-such-model"'), NO_GPU, monkeypatch=monkeypatch)
    assert p == (
        "c: servers.gen.model: 'no-such-model' is neither a preset nor a directory with "
        "config.json here (presets: qwen3-30b-a3b, tiny-dense, tiny-moe)"
    )
    (p,) = check(spec(cond='gen = { model = "tiny-embed" }'), NO_GPU, monkeypatch=monkeypatch)
    assert p == (
        "c: gen.model of the condition: preset 'tiny-embed' is an embedding model, not a "
        "generative one"
    )
    (tmp_path / "config.json").write_text("{}")
    assert check(spec(f'model = "{tmp_path}"'), NO_GPU, monkeypatch=monkeypatch) == []
    vllm = spec('model = "no-such-model"\nlauncher = "vllm"')  # vLLM's names are its own
    assert check(vllm, NO_GPU, monkeypatch=monkeypatch) == []


def test_a_bad_model_beside_the_slo_guard_is_the_one_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        spec('model = "no-such-model"').replace('servers = ["gen"]\n', "")
        + '[servers.embed]\nmodel = "tiny-embed"\n'
        + "[conditions.embed]\nslo_guard = true\ngen_tpot_slo_pct = 5\n"
    )
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "c: servers.gen.model: 'no-such-model' is neither a preset" in err
    assert "slo_guard" not in err and err.count("  - ") == 1
    assert not (tmp_path / "r").exists()


def test_extra_args_coserve_serve_would_refuse(monkeypatch):
    def one(gen: str = "", cond: str = "") -> list[str]:
        return check(spec('model = "tiny-dense"\n' + gen, cond), NO_GPU, monkeypatch=monkeypatch)

    (p,) = one('extra_args = ["--tp-all-reduce", "bogus"]')  # argparse's words vary a little
    assert p.startswith("c: servers.gen.extra_args: argument --tp-all-reduce: invalid choice:")
    assert "'bogus'" in p and "symm-mem" in p
    assert one(cond='gen = { extra_args = ["--no-such-flag"] }') == [
        "c: gen.extra_args of the condition: unrecognized arguments: --no-such-flag"
    ]
    assert one('extra_args = ["--tp-all-reduce"]') == [
        "c: servers.gen.extra_args: argument --tp-all-reduce: expected one argument"
    ]
    (p,) = one('extra_args = ["--embed-model", "tiny-embed"]')
    assert p.startswith("c: servers.gen.extra_args: --embed-model is for serve colocated")
    (p,) = one('extra_args = ["--tp-all-reduce", "symm-mem"]\ntensor_parallel_size = 2')
    assert p.startswith("c: servers.gen.extra_args: --tp-all-reduce symm-mem: CPU ranks sum")
    assert one('extra_args = ["--enforce-eager", "--max-num-seqs", "8"]') == []
    # it won over tensor_parallel_size: a TP=2 server ran while the rep said TP=1 (and the
    # strategy gave it one GPU); "--tensor-parallel" is argparse's abbreviation of it
    for flag in ('"--tensor-parallel-size", "2"', '"--tensor-parallel=1"'):
        (p,) = one(f"extra_args = [{flag}]")
        assert p.startswith("c: servers.gen.extra_args: --tensor-parallel-size: set servers.gen")
    two = {"gpus": [{"index": i, "uuid": f"GPU-{i}", "mig_devices": []} for i in (0, 1)]}
    tp = spec(
        'model = "tiny-dense"\nextra_args = ["--tp-all-reduce", "symm-mem"]',
        'strategy = "tp"\ngpus = ["0", "1"]\noptions = { tp = 2 }',
    )
    assert check(tp, two, monkeypatch=monkeypatch) == []  # the strategy gives TP=2
    vllm = 'launcher = "vllm"\nextra_args = ["--no-such-flag"]'  # vLLM's flags are its own
    assert one(vllm) == []


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without CUDA")
def test_run_and_dry_run_refuse_a_cuda_spec_here(tmp_path, capsys):
    path = tmp_path / "cuda.toml"
    path.write_text(spec('model = "tiny-dense"\ndevice = "cuda"'))
    for extra in (["--dry-run"], []):
        assert main(["run", str(path), "--out", str(tmp_path / "r"), *extra]) == 2
        assert (
            "servers.gen.device is 'cuda' but this machine has no CUDA GPU"
            in capsys.readouterr().err
        )
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_serve_refuses_weights_bigger_than_the_ram(monkeypatch):
    monkeypatch.setattr(memcheck, "ram_available", lambda: 8 * GiB)
    assert "more than the 8.0 GiB of RAM available" in memcheck.serve_problem(
        "qwen3-30b-a3b", "cpu", 0.9
    )
    assert memcheck.serve_problem("tiny-dense", "cpu", 0.9) is None
    assert memcheck.serve_problem("no-such-model", "cpu", 0.9) is None  # the engine names that


def test_the_cpu_check_counts_the_weights_in_the_cpu_engine_s_dtype(monkeypatch):
    """The CPU engine holds float32 weights (FP8 dequantised at load): qwen3-embedding-8b's
    28 GiB passed a 20 GiB machine's check, counted at 15 GiB of bf16, and would have filled
    its RAM (a new user's pass, 2026-12-01)."""
    monkeypatch.setattr(memcheck, "ram_available", lambda: 20 * GiB)
    said = memcheck.serve_problem("qwen3-embedding-8b", "cpu", 0.9)
    assert said and "more than the 20.0 GiB of RAM available" in said
    assert memcheck.serve_problem("qwen3-embedding-8b", "cpu", 0.9, dtype="bfloat16") is None
    fp32 = memcheck.weight_bytes("qwen3-30b-a3b", "cpu")
    assert fp32 > 100 * GiB > 40 * GiB > memcheck.weight_bytes("qwen3-30b-a3b", "cuda")


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without CUDA")
def test_serve_on_cuda_without_a_gpu_refuses_in_one_line(capsys):
    argv = ["serve", "gen", "--model", "tiny-dense", "--random-weights", "--port", "0"]
    for device in ("cuda", "cuda:1"):
        assert main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"coserve serve: --device {device}: this machine has no CUDA GPU" in err, err


@pytest.mark.skipif(
    (memcheck.ram_available() or 0) > memcheck.weight_bytes("qwen3-30b-a3b"),
    reason="this machine has the RAM for the weights",
)
def test_serve_of_a_30b_model_on_this_cpu_refuses_at_once():
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "coserve",
            "serve",
            "gen",
            "--model",
            "qwen3-30b-a3b",
            "--random-weights",
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "coserve serve: qwen3-30b-a3b needs at least 113.7 GiB for its weights" in proc.stderr
    assert time.monotonic() - t0 < 60  # nothing was allocated


def test_a_dry_run_needs_no_out_and_a_run_does(tmp_path, capsys, monkeypatch):
    """A dry run writes nothing, yet `coserve run experiments/demo.toml --dry-run` was refused
    with "the following arguments are required: --out"."""
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "experiments" / "demo.toml"
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(demo), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "demo: 3 reps to run over 3 conditions" in err and "co-located" in err
    assert list(tmp_path.iterdir()) == []  # nothing written here
    assert main(["run", str(demo)]) == 2
    assert "--out DIR is required (a dry run needs none)" in capsys.readouterr().err


def test_a_problem_of_many_conditions_counts_them(monkeypatch):
    """A new user's dry run of experiments/co-scheduling.toml on a machine without a GPU
    (2026-12-01): the refusal named 57 conditions in one line. Past six they are counted, the
    first five named."""
    conds = "".join(f'[[conditions]]\nname = "c{i}"\nservers = ["gen"]\n' for i in range(9))
    text = f'name = "p"\n[servers.gen]\nmodel = "tiny-dense"\ndevice = "cuda"\n{conds}'
    (p,) = check(text, NO_GPU, monkeypatch=monkeypatch)
    assert p.startswith("9 conditions (c0, c1, c2, c3, c4, ...): servers.gen.device is 'cuda'")
    six = "".join(f'[[conditions]]\nname = "c{i}"\nservers = ["gen"]\n' for i in range(6))
    text = f'name = "p"\n[servers.gen]\nmodel = "tiny-dense"\ndevice = "cuda"\n{six}'
    (p,) = check(text, NO_GPU, monkeypatch=monkeypatch)
    assert p.startswith("c0, c1, c2, c3, c4, c5: servers.gen.device")
