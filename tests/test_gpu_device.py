"""On a GPU machine: the real MPS daemon, two real CUDA clients through it, get_server_list /
get_client_list, 5 s of NVML + GPM sampling, a pinned-memory limit, SIGTERM, no daemon left;
then two real `coserve serve` processes under MPS (coserve.gpu.devcheck --servers).

Marked gpu; skipped without CUDA or without nvidia-cuda-mps-control. Its output from a real
H100 is recorded in docs/gpu.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
@pytest.mark.skipif(
    shutil.which("nvidia-cuda-mps-control") is None, reason="needs nvidia-cuda-mps-control"
)
def test_devcheck_on_gpu(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "coserve.gpu.devcheck",
            "--out",
            str(tmp_path),
            "--seconds",
            "5",
            "--servers",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"},
    )
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "[FAIL]" not in r.stdout
