"""The step profiler on a GPU: CUDA kernels (CUPTI) inside the `coserve.step` ranges, so the
analysis reads kernels, not CPU ops, and finds the launch calls. GPU only (`-m gpu`)."""

from __future__ import annotations

import json

import pytest
import torch

from coserve.engine.messages import Profile
from coserve.profile.trace import analyze, load_events
from coserve.server.step_profile import StepProfiler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


class _CudaEngine:
    last_step_decode = True

    def __init__(self):
        self.a = torch.randn(1024, 1024, device="cuda")

    def step(self):
        out = (self.a @ self.a).relu_()
        torch.cuda.synchronize()  # as the engine's step, which returns host data
        return [out.shape[0]]


def test_step_profiler_records_cuda_kernels(tmp_path):
    engine = _CudaEngine()
    prof = StepProfiler()
    prof.command(Profile("prepare"))
    prof.command(Profile("start", str(tmp_path), 4))
    while prof.capturing:
        prof.run_step(engine)
    prof.after_step(busy=False)
    assert prof.state == "saved", prof.error
    meta = json.loads((tmp_path / "steps.json").read_text())
    role = analyze("gen", load_events(tmp_path / "trace.json.gz"), meta["steps"])
    assert role.source == "cuda kernels"
    assert len(role.steps) == 4 and all(s.kernels >= 2 for s in role.steps)
    assert all(0 < s.busy_ms <= s.wall_ms for s in role.steps)
    assert any(c.kernel_class == "dense_gemm" and c.count >= 4 for c in role.classes)
    assert any("Launch" in a.name for a in role.launches)
