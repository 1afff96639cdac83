"""Will a model's weights fit where it is to be served? Checked before anything is allocated,
so that `coserve serve gen --model qwen3-30b-a3b --random-weights` on a CPU machine refuses
at once instead of filling the RAM with 30B parameters.

The need is the weights' size as the engine holds them (`coserve.model_size.model_size`): on
a GPU FP8 where the preset's config says so, else 2 bytes a parameter; on a CPU every weight in
the engine's dtype, 4 bytes unless --dtype says otherwise, since the CPU engine dequantises an
FP8 checkpoint at load. It is a lower bound of what the engine allocates; a model is refused
only when even that exceeds what is free, so a refusal is always right.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class MemoryNeed:
    model: str
    device: str  # "cpu" or "cuda"
    need_bytes: int  # weights (per rank with tensor parallelism)
    free_bytes: int  # RAM available, or the GPU memory the server may use

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes

    def problem(self) -> str | None:
        """None when it fits, else one line saying what, how much and what would help."""
        if self.fits:
            return None
        where = "RAM available" if self.device == "cpu" else "GPU memory it may use"
        return (
            f"{self.model} needs at least {self.need_bytes / GiB:.1f} GiB for its weights, more "
            f"than the {self.free_bytes / GiB:.1f} GiB of {where} on this machine "
            f"({self.device}); use a smaller model (tiny-dense, tiny-moe, tiny-embed) or a "
            f"bigger device"
        )


def weight_bytes(model: str, device: str = "cuda", dtype: str | None = None) -> int | None:
    """Bytes of `model`'s weights (a preset or a model directory) as the engine holds them on
    `device` ("cpu" or "cuda") in `dtype` (None: the engine's choice, float32 on a CPU, else
    bf16), or None if unknown."""
    from coserve.model_size import DTYPE_BYTES, engine_dtype, model_size

    cpu = device == "cpu"
    width = DTYPE_BYTES.get(engine_dtype(dtype, cpu), 2)
    try:
        return model_size(model, width, dequantised=cpu).weight_bytes
    except (ValueError, KeyError, OSError):
        return None


def ram_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_need(
    model: str,
    device: str,
    free_bytes: int | None,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
) -> MemoryNeed | None:
    """The check for `model` on `device` ("cpu", "cuda", "cuda:N") in `dtype` (None: the
    engine's choice) given `free_bytes`; None when either side is unknown (nothing to say)."""
    kind = "cpu" if device == "cpu" else "cuda"
    need = weight_bytes(model, kind, dtype)
    if need is None or free_bytes is None:
        return None
    return MemoryNeed(
        model,
        kind,
        need // max(1, tensor_parallel_size),
        free_bytes,
    )


def serve_problem(
    model: str,
    device: str,
    gpu_memory_utilization: float,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
) -> str | None:
    """For `coserve serve`: why `model` cannot be loaded on `device` (no such CUDA device, or
    weights bigger than the memory), or None. On CUDA the budget is `gpu_memory_utilization`
    of the device's memory (torch must be importable)."""
    if device == "cpu":
        free = ram_available()
    else:
        import torch

        if not torch.cuda.is_available():
            return (
                f"--device {device}: this machine has no CUDA GPU (torch sees none); use "
                "--device cpu or auto"
            )
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            return (
                f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        free = int(torch.cuda.get_device_properties(index).total_memory * gpu_memory_utilization)
    need = memory_need(model, device, free, tensor_parallel_size, dtype)
    return need.problem() if need else None
