"""`coserve profile`: the trace analysis on a small synthetic trace with known kernels and
gaps (exact figures), the engine core's step profiler, the ncu wrapper's command line and its
CSV parser, and the whole command on the demo spec on CPU (table, traces, report section)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from coserve.engine.kernels import KERNEL_RANGE
from coserve.engine.messages import Profile
from coserve.profile.ncu import ncu_command, ncu_problem, parse_raw_csv
from coserve.profile.records import RepProfile
from coserve.profile.trace import Coverage, analyze, classify, gaps_us
from coserve.server.step_profile import STEP_RANGE, StepProfiler

ROOT = Path(__file__).resolve().parent.parent


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


# Two steps (0-100 us, 100-150 us) and six kernels; one kernel after the window.
SYNTHETIC = [
    _x("user_annotation", STEP_RANGE, 0, 100),
    _x("user_annotation", STEP_RANGE, 100, 50),
    _x("kernel", "_rms_norm_kernel", 10, 20),  # 10-30
    _x("kernel", "_moe_gemm_kernel", 35, 40),  # 35-75: gap 5
    _x("kernel", "_paged_decode_kernel", 70, 10),  # 70-80: overlaps, gap 0
    _x("kernel", "_block_fp8_gemm_kernel", 110, 20),  # 110-130: gap 30
    _x("kernel", "ncclDevKernel_AllReduce_Sum_bf16", 135, 5),  # 135-140: gap 5
    _x("kernel", "_rms_norm_kernel", 142, 4),  # 142-146: gap 2
    _x("kernel", "_silu_and_mul_kernel", 300, 7),  # after the window: left out
    _x("cpu_op", "aten::mm", 1, 5),  # a GPU trace: CPU ops are not the kernels
    _x("cuda_runtime", "cudaLaunchKernel", 2, 4),
    _x("cuda_runtime", "cudaGraphLaunch", 5, 8),
    _x("cuda_runtime", "cudaGraphLaunch", 105, 12),
    _x("cuda_runtime", "cudaMemcpyAsync", 106, 30),  # not a launch
    _x("cuda_runtime", "cudaGraphLaunch", 200, 99),  # after the window
]


def test_analysis_of_a_synthetic_trace_gives_the_known_figures():
    prof = analyze("gen", SYNTHETIC, [{"decode": True}, {"decode": False}])
    assert prof.source == "cuda kernels"
    # gaps [5, 0, 30, 5, 2]: sorted [0, 2, 5, 5, 30]; p99 = 5 + 0.96 * 25 (linear)
    g = prof.gaps
    assert (g.count, g.mean_us, g.p50_us, g.max_us) == (5, 8.4, 5.0, 30.0)
    assert g.p99_us == pytest.approx(29.0)
    assert g.total_ms == pytest.approx(0.042)
    # busy: step 1 covers 10-30 and 35-80 (65 us), step 2 110-130, 135-140, 142-146 (29 us)
    assert [(s.wall_ms, s.kernels, s.decode) for s in prof.steps] == [
        (0.1, 3, True),
        (0.05, 3, False),
    ]
    assert [s.busy_ms for s in prof.steps] == pytest.approx([0.065, 0.029])
    assert prof.step_wall_ms == pytest.approx(0.1)  # decode steps only
    assert prof.step_busy_ms == pytest.approx(0.065)
    norm = next(k for k in prof.kernels if k.name == "_rms_norm_kernel")
    assert (norm.count, norm.mean_us, norm.p50_us) == (2, 12.0, 12.0)
    assert norm.p99_us == pytest.approx(19.84)  # 4 + 0.99 * 16
    assert prof.kernels[0].name == "_moe_gemm_kernel"  # largest total first
    shares = {c.kernel_class: (c.count, round(c.total_ms * 1e3, 6)) for c in prof.classes}
    assert shares == {
        "attention": (1, 10.0),
        "moe_gemm": (1, 40.0),
        "dense_gemm": (1, 20.0),
        "norm": (2, 24.0),
        "collective": (1, 5.0),
        "other": (0, 0.0),
    }
    assert sum(c.share for c in prof.classes) == pytest.approx(1.0)
    assert [(s.start_us, s.kernel_class) for s in prof.timeline][:2] == [
        (10.0, "norm"),
        (35.0, "moe_gemm"),
    ]
    launches = [(a.name, a.count, a.mean_us, a.p50_us) for a in prof.launches]
    assert launches == [("cudaGraphLaunch", 2, 10.0, 10.0), ("cudaLaunchKernel", 1, 4.0, 4.0)]
    assert prof.launches[0].p99_us == pytest.approx(11.96)  # 8 + 0.99 * 4
    again = RepProfile.from_dict(RepProfile("c", roles={"gen": prof}).to_dict())
    assert again.roles["gen"] == prof


def test_gen_kernels_beside_embed_kernels():
    from coserve.profile.cross import interleave_of
    from coserve.profile.trace import Interval

    gen = [Interval("g", 0, 10), Interval("g", 20, 10), Interval("g", 35, 10)]
    embed = [
        Interval("e", 5, 10),
        Interval("e", 25, 3),
        Interval("e", 31, 2),
        Interval("e", 50, 10),
    ]
    x = interleave_of(gen, embed, 0, 50)
    assert (x.window_ms, x.embed_kernels) == (0.05, 3)
    # gen kernels 30 us, 5 + 3 of them beside an embed kernel; gaps 10-20 and 30-35 (15 us),
    # embed ran in 10-15 and 31-33 of them (7 us)
    assert x.gen_kernel_ms == pytest.approx(0.03)
    assert x.gen_kernel_overlapped_ms == pytest.approx(0.008)
    assert x.gen_gap_ms == pytest.approx(0.015)
    assert x.gen_gap_filled_ms == pytest.approx(0.007)


def test_on_cpu_the_top_level_ops_of_the_step_thread_stand_in_for_kernels():
    events = [
        _x("user_annotation", STEP_RANGE, 0, 100, tid=7),
        _x("cpu_op", "aten::linear", 10, 30, tid=7),
        _x("cpu_op", "aten::addmm", 12, 20, tid=7),  # inside linear: a child, not counted
        _x("cpu_op", "aten::add", 50, 10, tid=7),
        _x("cpu_op", "aten::mul", 20, 50, tid=8),  # another thread
        _x("cpu_op", "aten::sub", 120, 5, tid=7),  # after the step
    ]
    prof = analyze("embed", events)
    assert prof.source.startswith("cpu ops")
    assert [k.name for k in prof.kernels] == ["aten::linear", "aten::add"]
    assert prof.steps[0].busy_ms == pytest.approx(0.04)
    assert prof.gaps.count == 1 and prof.gaps.mean_us == 10.0


def test_on_cpu_a_reference_kernel_s_range_stands_in_for_its_ops():
    fused_moe, attention = KERNEL_RANGE + "fused_moe", KERNEL_RANGE + "paged_decode_attention"
    events = [
        _x("user_annotation", STEP_RANGE, 0, 100, tid=7),
        _x("cpu_op", "aten::linear", 5, 10, tid=7),
        _x("user_annotation", fused_moe, 20, 30, tid=7),
        _x("cpu_op", "aten::matmul", 20, 30, tid=7),  # starts and ends with the range: inside
        _x("cpu_op", "aten::index_add_", 40, 5, tid=7),
        _x("user_annotation", attention, 60, 20, tid=7),
        _x("cpu_op", "aten::einsum", 61, 8, tid=7),
        _x("user_annotation", fused_moe, 60, 20, tid=8),  # another thread
        _x("user_annotation", "some.other.range", 85, 10, tid=7),  # not a kernel's
        _x("cpu_op", "aten::add", 86, 4, tid=7),
    ]
    prof = analyze("gen", events)
    assert [(k.name, k.kernel_class) for k in prof.kernels] == [
        (fused_moe, "moe_gemm"),
        (attention, "attention"),
        ("aten::linear", "dense_gemm"),
        ("aten::add", "other"),
    ]
    assert prof.steps[0].kernels == 4 and prof.steps[0].busy_ms == pytest.approx(0.064)
    assert classify("aten::einsum") == classify("aten::index_add_") == "other"  # bare: no class


def test_a_trace_without_steps_is_refused():
    with pytest.raises(ValueError, match="no coserve.step"):
        analyze("gen", [_x("kernel", "k", 0, 1)])


def test_interval_helpers_and_classes():
    from coserve.profile.trace import Interval

    ivs = [Interval("a", 0, 10), Interval("b", 5, 10), Interval("c", 30, 10)]
    covered = Coverage(ivs)
    assert covered.ms(0, 100) == pytest.approx(0.025)
    assert covered.ms(8, 35) == pytest.approx(0.012)  # 8-15 and 30-35
    assert covered.ms(12, 14) == pytest.approx(0.002)  # inside one merged interval
    assert covered.ms(15, 30) == 0.0 and covered.ms(-5, 0) == 0.0
    assert Coverage([]).ms(0, 100) == 0.0
    assert gaps_us(ivs) == [0.0, 15.0]
    assert classify("void flash_fwd_splitkv_kernel<...>") == "attention"
    assert classify("fused_moe_kernel") == "moe_gemm"
    assert classify("_topk_softmax_kernel") == "moe_gemm"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "dense_gemm"
    assert classify("_qk_norm_rope_kernel") == "norm"
    assert classify("cross_device_reduce_1stage") == "collective"
    for nccl in (
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "ncclKernel_AllReduce_RING_LL_Sum_bfloat16(ncclWork*)",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL",
        "void c10d::symmetric_memory::one_shot_all_reduce_kernel<c10::BFloat16, 16, 2>",
    ):
        assert classify(nccl) == "collective", nccl
    assert classify("void at::native::reduce_kernel<512, 1, ReduceOp<float>>") == "other"
    assert classify("_silu_and_mul_kernel") == "other"


class _FakeEngine:
    """Steps that do a little torch work, as the engine's would."""

    last_step_decode = True

    def step(self):
        import torch

        torch.ones(64, 64) @ torch.ones(64, 64)
        return [1, 2]


def test_step_profiler_captures_n_steps_and_writes_once_idle(tmp_path):
    prof = StepProfiler()
    assert prof.stats() == {"profile_state": "idle", "profile_steps": 0, "profile_error": ""}
    prof.command(Profile("prepare"))
    assert prof.state == "idle"
    prof.command(Profile("start", str(tmp_path / "p"), 3))
    assert prof.capturing
    engine = _FakeEngine()
    for _ in range(5):
        prof.run_step(engine) if prof.capturing else engine.step()
        prof.after_step(busy=True)  # the load still runs: nothing written yet
    assert prof.state == "captured" and not (tmp_path / "p" / "trace.json.gz").exists()
    prof.after_step(busy=False)
    assert prof.state == "saved"
    meta = json.loads((tmp_path / "p" / "steps.json").read_text())
    assert [s["index"] for s in meta["steps"]] == [0, 1, 2]
    assert all(s["decode"] is True and s["outputs"] == 2 for s in meta["steps"])
    from coserve.profile.trace import load_events

    role = analyze("gen", load_events(tmp_path / "p" / "trace.json.gz"), meta["steps"])
    assert len(role.steps) == 3 and role.kernels  # the matmuls, as CPU ops
    prof.command(Profile("start", str(tmp_path / "q"), 3))  # one window per server
    assert prof.state == "saved" and not (tmp_path / "q").exists()


class _SlowEngine(_FakeEngine):
    def step(self):
        time.sleep(0.05)
        return super().step()


def test_a_window_lasts_its_minimum_seconds_beyond_its_steps(tmp_path):
    prof = StepProfiler()
    prof.command(Profile("start", str(tmp_path), 1, 0.2))
    engine = _SlowEngine()
    prof.run_step(engine)
    assert prof.capturing  # its one step is done, its 0.2 s are not
    steps = 1
    while prof.capturing and steps < 100:
        prof.run_step(engine)
        steps += 1
    prof.after_step(busy=False)
    meta = json.loads((tmp_path / "steps.json").read_text())
    # 0.2 s of 0.05 s steps: 4 on a quiet machine, fewer where a loaded one stretches a sleep
    assert 2 <= len(meta["steps"]) == steps < 100
    assert meta["wall_end"] - meta["wall_start"] >= 0.2 and meta["requested_min_s"] == 0.2


def test_stop_ends_a_window_early_and_writes_it(tmp_path):
    prof = StepProfiler()
    prof.command(Profile("start", str(tmp_path), 50))
    prof.run_step(_FakeEngine())
    prof.command(Profile("stop"))
    prof.after_step(busy=True)  # asked to stop: written even while busy
    assert prof.state == "saved"
    assert len(json.loads((tmp_path / "steps.json").read_text())["steps"]) == 1


def test_unprofiled_server_has_no_profile_endpoints():
    from coserve.server.app import OpenAIServer, ServeOptions

    engine = SimpleNamespace(tokenizer=None, max_model_len=64, stats={})
    paths = {
        r.resource.canonical
        for r in OpenAIServer(engine, ServeOptions("gen", ["m"])).make_app().router.routes()
    }
    assert "/start_profile" not in paths and "/v1/completions" in paths
    opts = ServeOptions("gen", ["m"], profile_dir="/tmp/x")
    paths = {r.resource.canonical for r in OpenAIServer(engine, opts).make_app().router.routes()}
    assert {"/start_profile", "/stop_profile", "/profile"} <= paths


# ---- ncu ----------------------------------------------------------------------------------


def test_ncu_command_line_leaves_clocks_alone():
    cmd = ncu_command(
        ["{python}", "-m", "coserve", "serve", "gen"],
        Path("/r/ncu/timeslice"),
        kernel_regex="rms_norm|moe_gemm",
        launch_skip=1000,
        launch_count=5,
    )
    assert cmd == [
        "ncu",
        "--target-processes",
        "all",
        "--kernel-name",
        "regex:rms_norm|moe_gemm",
        "--launch-skip",
        "1000",
        "--launch-count",
        "5",
        "--metrics",
        "lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,"
        "sm__warps_active.avg.pct_of_peak_sustained_active",
        "--cache-control",
        "none",
        "--clock-control",
        "none",
        "-f",
        "-o",
        "/r/ncu/timeslice",
        "{python}",
        "-m",
        "coserve",
        "serve",
        "gen",
    ]
    with pytest.raises(ValueError, match="--launch-count"):
        ncu_command([], Path("r"), kernel_regex=None, launch_skip=0, launch_count=0)
    # a section (several replay passes) only when asked; ncu's flush only when asked
    cmd = ncu_command(
        [], Path("r"), kernel_regex=None, launch_skip=0, launch_count=1,
        sections=("MemoryWorkloadAnalysis",), cache_control="all",
    )  # fmt: skip
    i = cmd.index("--section")
    assert cmd[i + 1] == "MemoryWorkloadAnalysis" and cmd[cmd.index("--cache-control") + 1] == "all"
    with pytest.raises(ValueError, match="--cache-control"):
        ncu_command(
            [], Path("r"), kernel_regex=None, launch_skip=0, launch_count=1, cache_control="x"
        )
    assert "MPS" in ncu_problem("mps") and ncu_problem("timeslice") is None
    assert "MPS" in ncu_problem("tp+mps")
    assert "runs the gen server at TP=1" in ncu_problem("tp+timeslice")


# Parser input written by hand in the shape of `ncu --csv --page raw` (header, units row, one
# row per kernel); the figures are made up for the parser, not measured.
NCU_CSV = """==PROF== Connected to process 4242
"ID","Process ID","Process Name","Kernel Name","lts__t_sector_hit_rate.pct",\
"dram__throughput.avg.pct_of_peak_sustained_elapsed","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","%","%","%"
"0","4242","python3","_rms_norm_kernel","61.25","1,234.5","48.00"
"1","4242","python3","_moe_gemm_kernel","12.5","80.75","n/a"
"""


def test_ncu_raw_csv_parser():
    ks = parse_raw_csv(NCU_CSV)
    assert [(k.id, k.name) for k in ks] == [(0, "_rms_norm_kernel"), (1, "_moe_gemm_kernel")]
    assert (ks[0].l2_hit_rate_pct, ks[0].dram_throughput_pct, ks[0].achieved_occupancy_pct) == (
        61.25,
        1234.5,
        48.0,
    )
    assert ks[1].achieved_occupancy_pct is None
    with pytest.raises(ValueError, match="header"):
        parse_raw_csv("==PROF== nothing profiled\n")


def test_ncu_raw_csv_parser_refuses_what_no_report_of_kernels_looks_like():
    header, units = NCU_CSV.splitlines()[1:3]
    with pytest.raises(ValueError, match="no kernel"):  # parsed as "no kernels" and exit 0
        parse_raw_csv(f"{header}\n{units}\n")
    with pytest.raises(ValueError, match="cut short"):  # was an IndexError traceback
        parse_raw_csv(f'{header}\n{units}\n"0","4242"\n')
    (k,) = parse_raw_csv(f'{header}\n"0","1","p","k","nan","inf","-inf"\n')
    # float("nan") went into the kernels' JSON as NaN, which is no JSON
    assert (k.l2_hit_rate_pct, k.dram_throughput_pct, k.achieved_occupancy_pct) == (None,) * 3


def _coserve(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-P", "-m", "coserve", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ncu_refuses_mps_and_prints_the_command(tmp_path, capsys, monkeypatch):
    from coserve.cli import main

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.toml"
    demo = (ROOT / "experiments" / "demo.toml").read_text()
    spec.write_text(demo + '\n[[conditions]]\nname = "under-mps"\nstrategy = "mps"\n')
    assert main(["profile", str(spec), "--condition", "under-mps", "--ncu"]) == 2
    assert "ncu cannot profile MPS clients" in capsys.readouterr().err
    assert main(["profile", str(spec), "--condition", "co-located", "--ncu", "--out", "o"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0].startswith("ncu --target-processes all") and "--clock-control none" in lines[0]
    # {python} is filled as the launcher fills it; the port is chosen at start, and said so
    assert f" {sys.executable} -P -m coserve serve gen" in lines[0] and "{python}" not in lines[0]
    assert "--model tiny-moe" in lines[0] and "--port '{port}'" in lines[0]
    assert "{port} is not known yet: the gen server gets a free port when it starts" in printed.err
    assert lines[1].endswith("co-located.ncu-rep --csv --page raw")
    assert "captures its CUDA graphs" not in printed.err  # a CPU gen server has none
    assert not (tmp_path / "o").exists()  # printed, not run


def test_ncu_refuses_a_gen_server_the_spec_makes_tensor_parallel(tmp_path, capsys):
    # outside a tp strategy, servers.gen's tensor_parallel_size is what `coserve run` starts:
    # the wrapper's TP=1 server would be another server than the condition's
    from coserve.cli import main

    spec = tmp_path / "s.toml"
    demo = (ROOT / "experiments" / "demo.toml").read_text()
    spec.write_text(
        demo.replace('model = "tiny-moe"', 'model = "tiny-moe"\ntensor_parallel_size = 2')
    )
    assert main(["profile", str(spec), "--condition", "gen-only", "--ncu"]) == 2
    assert "gen: tensor_parallel_size 2; the ncu wrapper runs" in capsys.readouterr().err
    # one set in extra_args: under ncu the server is a command, which `coserve run` does not
    # check, and a TP=2 server ran under the wrapper
    spec.write_text(
        demo.replace("[servers.gen]", '[servers.gen]\nextra_args = ["--tensor-parallel-size", "2"]')
    )
    assert main(["profile", str(spec), "--condition", "gen-only", "--ncu"]) == 2
    assert "servers.gen.extra_args: --tensor-parallel-size: set" in capsys.readouterr().err


@pytest.mark.parametrize(
    "condition, warned",
    [("gen-only", True), ("gen-only-eager", False), ("eager-by-flag", False)],
)
def test_ncu_warns_that_graph_capture_is_slow_under_it(condition, warned, capsys, tmp_path):
    from coserve.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text(
        (ROOT / "experiments" / "profile-single-gpu.toml").read_text()
        + '\n[[conditions]]\nname = "eager-by-flag"\nservers = ["gen"]\n'
        'gen = { extra_args = ["--enforce-eager"] }\n'
    )
    assert main(["profile", str(spec), "--condition", condition, "--ncu"]) == 0
    assert ("captures its CUDA graphs under ncu" in capsys.readouterr().err) == warned


@pytest.mark.parametrize(
    "condition, warned", [("gen-only-eager", False), ("timeslice-eager", True)]
)
def test_ncu_says_beforehand_that_a_server_beside_gen_made_it_fail(condition, warned, capsys):
    """Measured on an H200: ncu failed whenever another process held a context on the GPU."""
    from coserve.cli import main

    spec = str(ROOT / "experiments" / "profile-single-gpu.toml")
    assert main(["profile", spec, "--condition", condition, "--ncu"]) == 0
    assert ("ncu failed at the first profiled kernel" in capsys.readouterr().err) == warned


def test_ncu_run_allows_the_gen_server_minutes_of_silence():
    # under ncu an H200 gen server said nothing for 10 s (the default stall_s) and the run
    # failed before a kernel was profiled
    from coserve.profile.ncu import NCU_STALL_S, wrapped_spec
    from coserve.spec import load_spec, parse_spec

    spec = load_spec(ROOT / "experiments" / "profile-single-gpu.toml")
    cond = spec.condition("gen-only-eager")
    wrapped = wrapped_spec(spec, cond, ["ncu", "python3"])
    parse_spec(wrapped.to_dict())  # still a valid spec: stall_s is a [load] field
    assert wrapped.condition("gen-only-eager").load_for(wrapped).stall_s == NCU_STALL_S > 60
    assert wrapped.condition("gen-only").load_for(wrapped).stall_s == cond.load_for(spec).stall_s


def test_ncu_run_keeps_a_longer_stall_the_spec_allows():
    from coserve.profile.ncu import NCU_STALL_S, wrapped_spec
    from coserve.spec import load_spec

    spec = load_spec(ROOT / "experiments" / "profile-single-gpu.toml")
    longer = 3 * NCU_STALL_S
    for cond in (
        dataclasses.replace(spec.condition("gen-only-eager"), load={"stall_s": longer}),
        spec.condition("gen-only-eager"),
    ):
        spec2 = dataclasses.replace(
            spec,
            load=dataclasses.replace(spec.load, stall_s=longer),
            conditions=[cond if c.name == cond.name else c for c in spec.conditions],
        )
        wrapped = wrapped_spec(spec2, cond, ["ncu", "python3"])
        assert wrapped.condition(cond.name).load_for(wrapped).stall_s == longer


FAKE_NCU = """#!/usr/bin/env python3
# Stands in for ncu: runs the wrapped command after `-o REPORT`; `--import` prints the CSV.
import os, sys
args = sys.argv[1:]
if "--import" in args:
    sys.stdout.buffer.write(open(os.environ["FAKE_NCU_CSV"], "rb").read())
    sys.exit(0)
i = args.index("-o")
open(args[i + 1] + ".ncu-rep", "w").write("not a report")
sys.stderr.write(os.environ.get("FAKE_NCU_SAYS", ""))
sys.stderr.flush()
os.execvp(args[i + 2], args[i + 2 :])
"""
NCU_ARGS = ["--ncu", "--execute", "--kernel-name", "rms", "--warmup-s", "0", "--duration-s", "1"]


def _fake_ncu(tmp_path, monkeypatch, csv_text: str | bytes, says: str = "") -> list[str]:
    """A fake ncu on PATH whose import prints `csv_text` and whose run says `says`; the
    `coserve profile` args of the demo's gen-only condition under it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ncu").write_text(FAKE_NCU)
    (bin_dir / "ncu").chmod(0o755)
    csv_bytes = csv_text if isinstance(csv_text, bytes) else csv_text.encode()
    (tmp_path / "ncu.csv").write_bytes(csv_bytes)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_NCU_CSV", str(tmp_path / "ncu.csv"))
    monkeypatch.setenv("FAKE_NCU_SAYS", says)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    return ["profile", str(ROOT / "experiments" / "demo.toml"), "--condition", "gen-only"]


def test_ncu_execute_runs_the_condition_with_gen_under_ncu(tmp_path, monkeypatch, capsys):
    from coserve.cli import main
    from coserve.experiment.backend import resolve_device

    args = [*_fake_ncu(tmp_path, monkeypatch, NCU_CSV), *NCU_ARGS]
    assert main([*args, "--out", "o"]) == 0, capsys.readouterr()
    printed = capsys.readouterr()
    out = printed.out
    ran = next(ln for ln in printed.err.splitlines() if ln.startswith("ran: "))
    record = json.loads(
        (tmp_path / "o" / "run" / "reps" / "gen-only" / "rep-1" / "rep.json").read_text()
    )
    port = record["servers"]["gen"]["url"].rsplit(":", 1)[1]
    assert f" {sys.executable} -P -m coserve serve gen " in ran and f"--port {port} " in ran
    assert "{" not in ran
    assert "_rms_norm_kernel" in out and "L2 hit 61.25%" in out
    on_cpu = resolve_device("auto") == "cpu"  # the demo's gen: a GPU where there is one
    assert ("gen server runs on the CPU: ncu profiles CUDA kernels only" in printed.err) == on_cpu
    parsed = json.loads((tmp_path / "o" / "ncu" / "gen-only.json").read_text())
    assert [k["name"] for k in parsed] == ["_rms_norm_kernel", "_moe_gemm_kernel"]
    log = (tmp_path / "o" / "run" / "reps" / "gen-only" / "rep-1" / "gen.log").read_text()
    assert "ncu --target-processes all --kernel-name regex:rms" in log
    assert f"# cmd: {ran.removeprefix('ran: ')}\n" in log  # the printed command is the one run


def test_ncu_that_profiled_nothing_says_to_lower_the_launch_skip(tmp_path, monkeypatch, capsys):
    """The first H200 try: ncu skipped 3,000 matching launches, the run ended before them, and
    the only word was "no ncu raw CSV header"; ncu's own line is in the gen server's log."""
    from coserve.cli import main

    says = "==WARNING== No kernels were profiled.\n"
    args = [*_fake_ncu(tmp_path, monkeypatch, "", says=says), *NCU_ARGS, "--launch-skip", "3000"]
    assert main([*args, "--out", "o"]) == 1
    failed = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("failed:"))
    assert "ncu profiled no kernel" in failed and "the first 3000 launches" in failed
    assert "lower --launch-skip" in failed and "no ncu raw CSV header" not in failed


def test_ncu_that_failed_to_profile_is_quoted(tmp_path, monkeypatch, capsys):
    """The H200 try beside the embed server (2026-11-30): ncu's ==ERROR== lines were in the gen
    server's log and the command said only "no ncu raw CSV header ... ncu said: nothing"."""
    from coserve.cli import main

    says = (
        '==PROF== Profiling "_moe_gemm_kernel": 0%==PROF== Trying to shutdown target\n\n'
        '==ERROR== Failed to profile "_moe_gemm_kernel" in process 6938\n'
        "==ERROR== An error occurred while trying to profile.\n"
    )
    assert main([*_fake_ncu(tmp_path, monkeypatch, "", says=says), *NCU_ARGS, "--out", "o"]) == 1
    failed = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("failed:"))
    assert "ncu failed in the gen server" in failed and "gen.log" in failed
    assert '==ERROR== Failed to profile "_moe_gemm_kernel" in process 6938' in failed
    assert "An error occurred" in failed and "no ncu raw CSV header" not in failed


def test_ncu_import_output_not_utf8_is_a_failure_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Bytes from ncu --import that are not UTF-8 raised UnicodeDecodeError out of the command."""
    from coserve.cli import main

    assert main([*_fake_ncu(tmp_path, monkeypatch, b"\xff\xfe junk\n"), *NCU_ARGS]) == 1
    failed = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("failed:"))
    assert "no ncu raw CSV header" in failed


# ---- the whole command on CPU --------------------------------------------------------------


def test_coserve_profile_on_the_demo_spec(tmp_path):
    out = tmp_path / "run"
    r = _coserve(
        "profile",
        str(ROOT / "experiments" / "demo.toml"),
        "--condition",
        "co-located",
        "--steps",
        "3",
        "--min-seconds",
        "0.5",
        # a longer window than the demo's: on a loaded 2-core machine the profiled embed
        # server answered none of its requests within 3 s (seen at load 6-8)
        "--duration-s",
        "6",
        "--out",
        str(out),
        cwd=tmp_path,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # said once (by the progress display), not also by the sampler's own log line
    assert (r.stdout + r.stderr).count("telemetry recorded nothing") <= 1
    table = r.stdout[r.stdout.index("coserve profile:") :]
    rows = [ln for ln in table.splitlines() if "co-located" in ln]
    assert [ln.split("│")[2].strip() for ln in rows] == ["gen", "embed"]
    rep = out / "reps" / "co-located" / "rep-1"
    for role in ("gen", "embed"):
        assert (rep / "profile" / role / "trace.json.gz").stat().st_size > 0
        meta = json.loads((rep / "profile" / role / "steps.json").read_text())
        assert meta["requested_steps"] == 3 and meta["requested_min_s"] == 0.5
        if role == "gen":  # steps of milliseconds: 0.5 s holds far more than 3 of them
            assert len(meta["steps"]) > 3 and meta["wall_end"] - meta["wall_start"] >= 0.5
            gen_steps = len(meta["steps"])
        else:  # an embed step on a busy CPU can take most of the window, and the load's end
            assert len(meta["steps"]) >= 1  # stops a window that has not reached its end
    summary = RepProfile.from_dict(json.loads((rep / "profile" / "summary.json").read_text()))
    assert len(summary.roles["gen"].steps) == gen_steps and summary.roles["gen"].kernels
    # tiny-moe's torch references are its CPU "kernels", classed as their GPU twins: the MoE
    # reference's matmuls and index_add_ as moe_gemm, the attention one's einsums as attention
    gen_kernels = {k.name: k.kernel_class for k in summary.roles["gen"].kernels}
    assert gen_kernels[KERNEL_RANGE + "fused_moe"] == "moe_gemm"
    assert gen_kernels[KERNEL_RANGE + "topk_softmax"] == "moe_gemm"
    assert gen_kernels[KERNEL_RANGE + "paged_decode_attention"] == "attention"
    assert not {"aten::index_add_", "aten::einsum", "aten::matmul"} & set(gen_kernels)
    gen_classes = {c.kernel_class: c.share for c in summary.roles["gen"].classes}
    assert gen_classes["moe_gemm"] > gen_classes["other"]
    report = (out / "report.md").read_text()
    assert "## Profile" in report and "### Profile: co-located (rep 1)" in report
    assert "plots/profile_timeline.png" in report and (out / "plots/profile_timeline.png").exists()
    assert "Profile" in (out / "report.html").read_text()
    assert "No \"Gen's kernels beside embed's\" table: it compares CUDA kernels" in report
    gen_log = (rep / "gen.log").read_text()
    assert "--profile-steps 3 --profile-min-seconds 0.5" in gen_log
    assert f"profile of {gen_steps} steps written" in gen_log


def test_interleave_from_two_traces_on_one_clock():
    from coserve.profile.cross import interleave

    embed = [_x("user_annotation", STEP_RANGE, 50, 150), _x("kernel", "embed_gemm", 80, 30)]
    x = interleave(SYNTHETIC, embed)  # both captured over 50-150 us
    # gen kernels starting there: 70-80, 110-130, 135-140, 142-146; embed ran 80-110, all of
    # it in the gap between gen's 80 and 110 and none beside a gen kernel
    assert (x.window_ms, x.embed_kernels) == (0.1, 1)
    assert x.gen_kernel_ms == pytest.approx(0.039)
    assert x.gen_kernel_overlapped_ms == 0.0
    assert x.gen_gap_ms == pytest.approx(0.037)
    assert x.gen_gap_filled_ms == pytest.approx(0.03)
    assert interleave(SYNTHETIC, [_x("user_annotation", STEP_RANGE, 500, 10)]) is None


def test_clocks_from_telemetry_to_the_report_section(tmp_path):
    from coserve.profile.analyze import analyze_rep
    from coserve.report.profile_plots import make
    from coserve.report.profile_section import profile_blocks

    rep = tmp_path / "reps" / "mps" / "rep-1"
    rep.mkdir(parents=True)
    t0 = 1_796_000_000.0  # the load's start, Unix seconds

    def tick(t: float, sm: float, power: float, capped: int) -> dict:
        return {  # a telemetry.jsonl row as the sampler writes it (values chosen for the test)
            "t": t0 + t,
            "t_rel_s": t + 30.0,
            "device": "0",
            "sm_clock_mhz": sm,
            "mem_clock_mhz": 3201,
            "power_w": power,
            "power_capped": capped,
            "thermal": 0,
            "sync_boost": 0,
        }

    # Start-up before the load and the trace writing after it run at idle clocks and power:
    # only the load's ticks (warm-up 1 s + window 1 s) count.
    rows = [tick(-5, 1980, 90.0, 0), tick(0, 1980, 600.0, 0), tick(1, 1600, 700.0, 1)]
    rows.append(tick(9, 1980, 80.0, 0))
    (rep / "telemetry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    started = dt.datetime.fromtimestamp(t0, dt.UTC).isoformat()
    (rep / "bench.json").write_text(
        json.dumps({"started_at": started, "warmup_s": 1.0, "duration_s": 1.0})
    )
    summary = analyze_rep(rep, [])
    assert summary.condition == "mps"
    assert [(c.t_rel_s, c.sm_clock_mhz, c.power_capped) for c in summary.clocks] == [
        (0.0, 1980, False),
        (1.0, 1600, True),
    ]
    (rep / "bench.json").unlink()  # without the load's times: every tick, from the first
    assert [c.t_rel_s for c in analyze_rep(rep, []).clocks] == [0.0, 5.0, 6.0, 14.0]
    (rep / "profile").mkdir()
    (rep / "profile" / "summary.json").write_text(json.dumps(summary.to_dict()))
    plots = make(tmp_path, ["mps"], tmp_path / "plots")
    assert list(plots) == ["profile_clocks"]  # no gen timeline without a trace
    blocks = profile_blocks(tmp_path, ["mps"], plots)
    table = next(b for b in blocks if b.kind == "table" and b.headers[0] == "Condition")
    assert table.rows == [["mps (rep 1)", "2", "1,790", "3,201", "650", "50.0%", "0.0%", "0.0%"]]
    assert any(b.kind == "img" and b.path == plots["profile_clocks"] for b in blocks)
    assert profile_blocks(tmp_path / "nothing", [], {}) == []


def test_profile_endpoints_answer_4xx_bodies_and_need_the_api_key():
    """A second start is 409 with an OpenAI error body (was a plain-text 500), and with
    --api-key the endpoints, which start the profiler and write to disk, need the key."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from coserve.server.app import OpenAIServer, ServeOptions

    sent = []
    engine = SimpleNamespace(
        tokenizer=None, max_model_len=64, stats={}, alive=True, control=sent.append
    )
    opts = ServeOptions("gen", ["m"], profile_dir="/tmp/x", api_key="k")

    async def main():
        async with TestClient(TestServer(OpenAIServer(engine, opts).make_app())) as c:
            for path in ("/start_profile", "/stop_profile"):
                r = await c.post(path)
                assert r.status == 401 and "API key" in (await r.json())["error"]["message"]
            assert (await c.get("/profile")).status == 401
            assert sent == []  # nothing reached the engine
            key = {"Authorization": "Bearer k"}
            assert (await c.post("/start_profile", headers=key)).status == 200
            again = await c.post("/start_profile", headers=key)
            body = await again.json()
            assert again.status == 409 and body["error"]["code"] == 409
            assert (await c.get("/health")).status == 200  # not behind the key, as vLLM

    asyncio.run(main())
    assert [m.action for m in sent] == ["start"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--duration-s", "0"),
        ("--duration-s", "inf"),
        ("--duration-s", "nan"),
        ("--warmup-s", "-1"),
        ("--warmup-s", "1e300"),
    ],
)
def test_windows_out_of_range_are_refused_by_flag(tmp_path, capsys, flag, value):
    """A window the spec's load checks refuse (or a timer cannot hold) is a usage error, not
    a traceback and a half-made run folder."""
    from coserve.cli import main

    spec = str(ROOT / "experiments" / "demo.toml")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["profile", spec, "--condition", "co-located", f"{flag}={value}", "--out", str(out)])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not out.exists()
