"""The SM count a kernel sizes its grid by (the split count of paged decode attention)."""

from __future__ import annotations

from functools import cache

import torch


@cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, on_cpu: int) -> int:
    """Streaming multiprocessors of a CUDA `device` (the current one when it has no index);
    `on_cpu` under Triton's interpreter, where the caller picks what its tests need."""
    if device.type != "cuda":
        return on_cpu
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
