"""How many bytes the KV cache may take.

GPU, as vLLM means `gpu_memory_utilization`: this process may use that fraction of the whole
device; the KV cache gets what is left of it after the weights, the peak activations of a
profiling forward pass at full batch, and memory CUDA holds outside torch's allocator.
CPU: a plain byte budget (`cpu_kv_cache_bytes`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("coserve.engine")
GiB = 1 << 30


def kv_budget_bytes(
    total_bytes: int, utilization: float, peak_torch_bytes: int, non_torch_bytes: int
) -> int:
    """Bytes left for the KV cache: `utilization` of the device's `total_bytes` (as
    cudaMemGetInfo reports it) less the torch allocator's peak over weights + profiling pass and
    what CUDA holds outside torch (context, cuBLAS/NCCL workspaces). May be negative: no room."""
    return int(utilization * total_bytes) - peak_torch_bytes - non_torch_bytes


class GpuBudget:
    """Take `start()` before loading weights and `kv_bytes(profile)` after."""

    def __init__(self, device: torch.device, utilization: float) -> None:
        if not 0.0 < utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        self.device, self.utilization = device, utilization

    def start(self) -> None:
        torch.cuda.set_device(self.device)
        torch.cuda.empty_cache()
        self.free0, self.total = torch.cuda.mem_get_info(self.device)
        self.requested = int(self.utilization * self.total)
        if self.free0 < self.requested:
            raise ValueError(
                f"free memory on {self.device} ({self.free0 / GiB:.2f} GiB) is less than "
                f"gpu_memory_utilization {self.utilization} of the device "
                f"({self.requested / GiB:.2f} of {self.total / GiB:.2f} GiB): lower it or free "
                "memory (another process holds the rest)"
            )

    def kv_bytes(self, profile: Callable[[], None]) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        profile()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free1, _ = torch.cuda.mem_get_info(self.device)
        non_torch = max(0, (self.free0 - free1) - torch.cuda.memory_reserved(self.device))
        kv = kv_budget_bytes(self.total, self.utilization, peak, non_torch)
        log.info(
            "memory: %.2f GiB requested (%.2f x %.2f GiB), %.2f GiB peak torch "
            "(weights + activations), %.2f GiB outside torch -> %.2f GiB for the KV cache",
            self.requested / GiB,
            self.utilization,
            self.total / GiB,
            peak / GiB,
            non_torch / GiB,
            kv / GiB,
        )
        torch.cuda.empty_cache()
        return kv
