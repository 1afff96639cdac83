"""Timing and reporting shared by the kernel benchmarks (kernels.py, kernels_moe.py, ...):
CUDA-graph medians, the result rows and the device's measured bandwidth (CUDA only); and their
command-line pieces (help layout, --tokens, the GPU check), which work without a GPU or Triton."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coserve.engine.kernels import fp8 as ref_fp8  # noqa: E402

BLOCK = (128, 128)
DEV = "cuda"
BF16_PEAK_TFLOPS = 790.0  # measured on H100 and H200 here (KINDS.md); FP8 dense is ~2x
RESULTS: list[dict] = []
STATE: dict = {}


def graph_time_ms(calls, reps: int = 30, inner: int = 1) -> float:
    """Median ms per call of `calls` (a list of closures, one per input set), replayed as one
    CUDA graph that runs the list `inner` times (so a graph launch's own cost, ~10 us, is
    spread over many calls for small kernels)."""
    calls = list(calls) * inner
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / len(calls))
    del g
    return statistics.median(times)


def eager_time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def report(
    kernel: str, shape: str, ms: float, nbytes: float = 0.0, flops: float = 0.0, note: str = ""
) -> None:
    gbs = nbytes / ms / 1e6 if nbytes else 0.0
    tfl = flops / ms / 1e9 if flops else 0.0
    bw = STATE["copy_gbs"]
    row = dict(
        kernel=kernel,
        shape=shape,
        us=round(ms * 1e3, 2),
        GBps=round(gbs, 1),
        pct_bw=round(100 * gbs / bw, 1) if gbs else None,
        TFLOPs=round(tfl, 1),
        note=note,
    )
    RESULTS.append(row)
    pct = f"{row['pct_bw']:5.1f}%bw" if gbs else "        "
    print(
        f"{kernel:<34} {shape:<34} {ms * 1e3:10.1f} us {gbs:8.0f} GB/s {pct} "
        f"{tfl:7.1f} TFLOP/s  {note}",
        flush=True,
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's --help: its module docstring as written, and each option's default."""


def token_counts(p: argparse.ArgumentParser, text: str) -> list[int]:
    """--tokens "1,64,512" -> [1, 64, 512]; anything else ends the program with p's error
    naming the option."""
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        p.error(f"--tokens: expected integers, got {text!r}")
    if not tokens or min(tokens) < 1:
        p.error(f"--tokens: every batch size must be >= 1, got {text!r}")
    return tokens


def require_gpu(p: argparse.ArgumentParser) -> None:
    """End the program with p's error unless a CUDA GPU and Triton are there."""
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if importlib.util.find_spec("triton") is None:
        p.error("needs Triton (pip install triton)")


def measure_bandwidth() -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s of a sum over 2 GiB)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy = 2 * n / graph_time_ms([lambda: b.copy_(a)], reps=20) / 1e6
    x = torch.ones(n // 2, dtype=torch.float32, device=DEV)
    read = 2 * n / graph_time_ms([lambda: x.sum()], reps=20) / 1e6
    return copy, read


def rand_fp8_weight(shape, g, std=0.02):
    """Random FP8 block-quantised weights ([N, K] or stacked [E, N, K]) and their scales."""
    w = torch.randn(shape, generator=g, device=DEV) * std
    q, s = ref_fp8.block_quant(w, BLOCK)
    del w
    return q, s
