"""The intra-op threads an engine process computes with on the CPU (engine/cpu_threads.py):
one for generation in a process of its own (the demo's gen alone did 600 tok/s with two
threads on 2 cores and 2,513 with one, so co-located gen came out 3x faster than alone), a
share of the cores per TP rank, torch's own for embeddings and for colocated's one process,
the flag's number (at most the cores) when given, nothing touched on a GPU."""

from __future__ import annotations

import pytest
import torch

from coserve.cli import main
from coserve.engine.cpu_threads import (
    GEN_CPU_THREADS,
    apply_cpu_threads,
    cpu_threads_problem,
    engine_cpu_threads,
    usable_cores,
)
from coserve.engine.types import EngineArgs


@pytest.mark.parametrize(
    "device, given, kind, want",
    [
        ("cpu", None, "gen", GEN_CPU_THREADS),
        ("cpu", None, "embed", None),
        ("cpu", 3, "gen", 3),
        ("cpu", 3, "embed", 3),
        ("cuda", 3, "gen", None),
        ("cuda:1", None, "gen", None),
    ],
)
def test_threads_per_kind_and_device(device, given, kind, want):
    assert engine_cpu_threads(EngineArgs("tiny-moe", device=device, cpu_threads=given), kind) == (
        want
    )


def test_tp_ranks_share_the_cores_unless_told():
    tp2 = EngineArgs("tiny-moe", device="cpu", tensor_parallel_size=2)
    share = max(1, usable_cores() // 2)
    assert engine_cpu_threads(tp2, "gen") == engine_cpu_threads(tp2, None) == share
    told = EngineArgs("tiny-moe", device="cpu", tensor_parallel_size=2, cpu_threads=1)
    assert engine_cpu_threads(told, None) == 1


def test_engines_sharing_a_process_leave_torch_its_choice():
    args = EngineArgs("tiny-moe", device="cpu")
    assert engine_cpu_threads(args, "gen", own_process=False) is None
    assert engine_cpu_threads(args, "embed", own_process=False) is None


def test_more_threads_than_cores_is_named():
    cores = usable_cores()
    assert cpu_threads_problem(None) is None and cpu_threads_problem(cores) is None
    why = cpu_threads_problem(cores + 1)
    assert why.startswith(f"--cpu-threads: {cores + 1} is more than the {cores} CPU cores")


def test_apply_sets_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(EngineArgs("tiny-moe", device="cpu"), "gen") == GEN_CPU_THREADS
        assert torch.get_num_threads() == GEN_CPU_THREADS
        # embeddings without a choice leave the process as it is
        assert apply_cpu_threads(EngineArgs("tiny-embed", device="cpu"), "embed") == (
            GEN_CPU_THREADS
        )
    finally:
        torch.set_num_threads(before)


def test_serve_refuses_no_threads_and_more_than_the_cores(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "gen", "--model", "tiny-moe", "--cpu-threads", "0"])
    assert e.value.code == 2
    assert "--cpu-threads" in capsys.readouterr().err
    many = str(usable_cores() + 1)
    argv = ["serve", "embed", "--model", "tiny-embed", "--device", "cpu", "--cpu-threads", many]
    assert main(argv) == 2
    assert f"coserve serve embed: --cpu-threads: {many} is more than" in capsys.readouterr().err
