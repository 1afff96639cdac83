"""The intra-op threads an engine process computes with on the CPU (engine/cpu_threads.py):
one for generation (the demo's gen alone did 600 tok/s with two threads on 2 cores and 2,513
with one, so co-located gen came out 3x faster than alone), torch's own for embeddings, the
flag's number when given, nothing touched on a GPU."""

from __future__ import annotations

import pytest
import torch

from coserve.cli import main
from coserve.engine.cpu_threads import GEN_CPU_THREADS, apply_cpu_threads, engine_cpu_threads
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


def test_serve_refuses_no_threads(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "gen", "--model", "tiny-moe", "--cpu-threads", "0"])
    assert e.value.code == 2
    assert "--cpu-threads" in capsys.readouterr().err
