"""`coserve profile` on a tensor-parallel server: rank 0's collective time per step, from a
synthetic trace with NCCL's kernel names (exact figures) and from a real TP=2 server on CPU,
whose ranks sum through gloo."""

from __future__ import annotations

import json

import pytest
from test_profile import _coserve, _x

from coserve.profile.records import RepProfile
from coserve.profile.trace import analyze
from coserve.server.step_profile import STEP_RANGE

# Rank 0 of a TP=2 gen server: two decode steps (0-100, 100-200 us) whose all-reduces wait
# for the other rank, under both NCCL kernel namings, plus the greedy all-gather.
TP_RANK0 = [
    _x("user_annotation", STEP_RANGE, 0, 100),
    _x("user_annotation", STEP_RANGE, 100, 100),
    _x("kernel", "_moe_gemm_kernel", 0, 30),  # 0-30
    _x(
        "kernel", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096>)", 30, 40
    ),
    _x("kernel", "_rms_norm_kernel", 70, 10),  # 70-80
    _x("kernel", "ncclKernel_AllReduce_RING_LL_Sum_bfloat16(ncclWork)", 90, 20),  # 90-110
    _x("kernel", "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096>)", 105, 10),
    _x("kernel", "_paged_decode_kernel", 120, 30),  # 120-150
    _x(
        "kernel",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096>)",
        150,
        50,
    ),
]


def test_collective_time_per_step_of_a_tensor_parallel_rank():
    prof = analyze("gen", TP_RANK0, [{"decode": True}, {"decode": True}])
    # step 1: 30-70 and 90-100 (the second all-reduce clipped at the step's end): 50 us;
    # step 2: 100-115 (all-reduce and all-gather overlap) and 150-200: 65 us
    assert [s.collective_ms for s in prof.steps] == pytest.approx([0.05, 0.065])
    assert prof.step_collective_ms == pytest.approx(0.0575)
    assert [s.busy_ms for s in prof.steps] == pytest.approx([0.09, 0.095])  # idle 80-90, 115-120
    shares = {c.kernel_class: (c.count, round(c.total_ms * 1e3, 6)) for c in prof.classes}
    assert shares["collective"] == (4, 120.0)
    assert all(k.kernel_class == "collective" for k in prof.kernels if "nccl" in k.name)
    again = RepProfile.from_dict(RepProfile("tp2", roles={"gen": prof}).to_dict())
    assert again.roles["gen"].step_collective_ms == pytest.approx(0.0575)
    old = RepProfile("tp2", roles={"gen": prof}).to_dict()
    for step in old["roles"]["gen"]["steps"]:  # a summary written before collective_ms
        del step["collective_ms"]
    assert RepProfile.from_dict(old).roles["gen"].step_collective_ms == 0.0


TP2_SPEC = """
name = "tp2-cpu"
repetitions = 1
[servers.gen]
model = "tiny-dense"
device = "cpu"
max_model_len = 256
max_num_seqs = 8
tensor_parallel_size = 2
ready_timeout_s = 120
[load]
gen_concurrency = 4
input_len = 16
output_len = 32
warmup_s = 2
duration_s = 2
[[conditions]]
name = "tp2-gen"
servers = ["gen"]
"""


def test_coserve_profile_of_a_tensor_parallel_server_captures_rank_0s_collectives(tmp_path):
    """On CPU the ranks sum through gloo: rank 0's `c10d::allreduce_` ops are its
    collectives, as NCCL's kernels are on GPUs."""
    (tmp_path / "tp2.toml").write_text(TP2_SPEC)
    out = tmp_path / "run"
    r = _coserve(
        "profile",
        "tp2.toml",
        "--condition",
        "tp2-gen",
        "--steps",
        "3",
        "--min-seconds",
        "0",
        "--out",
        str(out),
        cwd=tmp_path,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Collective ms" in r.stdout
    rep = out / "reps" / "tp2-gen" / "rep-1"
    gen = RepProfile.from_dict(json.loads((rep / "profile" / "summary.json").read_text()))
    gen = gen.roles["gen"]
    assert len(gen.steps) == 3 and "tensor parallel: 2 ranks" in (rep / "gen.log").read_text()
    coll = [k.name for k in gen.kernels if k.kernel_class == "collective"]
    assert "c10d::allreduce_" in coll
    # over the window, not per decode step: on a CPU a step's forward runs where it is
    # launched, so with async scheduling a step that only finishes the one launched ahead
    # holds no collective, and a window of 3 steps can hold no pure decode step that did
    coll_ms = sum(s.collective_ms for s in gen.steps)
    assert 0 < coll_ms < sum(s.busy_ms for s in gen.steps), gen.steps
