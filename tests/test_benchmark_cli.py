"""Benchmark scripts a user runs by hand answer --help and refuse a machine they cannot use
with a usage error, without Triton or a GPU (the new-user check of 2026-12-01 found
benchmarks/moe_gemm1_variants.py importing Triton before it parsed its arguments: a traceback
for --help on the CPU install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "moe_gemm1_variants.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_help_needs_no_triton():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "--only {desc,persistent,tiled}" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU it asks for")
def test_without_a_gpu_it_says_so():
    r = _run("--only", "tiled")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: needs a CUDA GPU" in r.stderr
    bad = _run("--tokens", "0")
    assert bad.returncode == 2 and "--tokens: must be at least 1, got 0" in bad.stderr
