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

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "moe_gemm1_variants.py"


def _run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
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


# (script, a bad option and the error that must name it)
KERNEL_BENCHMARKS = [
    ("fused_prologues.py", ("--tokens", "1,x"), "--tokens: expected integers, got '1,x'"),
    ("moe_layout.py", ("--tokens", "0"), "--tokens: every batch size must be >= 1, got '0'"),
    ("attention_variants.py", ("--ctx", "9,3"), "--ctx: need 1 <= LO <= HI, got LO 9, HI 3"),
    ("attention_variants.py", ("--batch", "0"), "--batch must be >= 1, got 0"),
    ("dense_fp8_tiles.py", ("--tokens", "8"), "--tokens must be >= 16 (cuBLAS's blockwise"),
]


@pytest.mark.parametrize("script,bad,message", KERNEL_BENCHMARKS)
def test_kernel_benchmarks_explain_themselves_and_name_a_bad_option(script, bad, message):
    """--help prints the whole docstring and each default; a bad option is named before the
    GPU check; without a GPU the script says so (no traceback anywhere)."""
    path = BENCHMARKS / script
    h = _run("--help", script=path)
    assert h.returncode == 0 and "(default:" in h.stdout and "Traceback" not in h.stderr
    assert "Needs a CUDA GPU and Triton" in h.stdout or "needs a CUDA GPU and Triton" in h.stdout
    r = _run(*bad, script=path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        r = _run(script=path)
        assert r.returncode == 2 and "error: needs a CUDA GPU" in r.stderr
