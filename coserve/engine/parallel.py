"""Tensor parallelism: which rank this process is, how weights split across ranks, and the
collectives the model calls (all-reduce after row-parallel layers and the vocab-parallel
embedding, all-gather of vocab-parallel logits).

One process per rank. The state is process-wide and set once, before the model is built:
by rank 0's engine (`coserve.engine.tp_workers.launch`) and by each worker it spawns. With
one rank every collective is the identity and no process group exists.

Collectives run through `torch.distributed` (NCCL on CUDA, gloo on CPU), synchronously:
since torch 2.8 (pytorch#150398) a collective with async_op=False is launched on the current
stream, with no side stream to join, so a CUDA graph that captures a forward pass captures
its all-reduces in order, and the NCCL communicator is created eagerly at init (`device_id`),
never inside a capture."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1


_state = TPState()


def state() -> TPState:
    return _state


def init(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the tensor-parallel group (every rank calls this; it returns when all have)."""
    global _state
    if size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(minutes=10), **kw)
    _state = TPState(rank, size)


def destroy() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = TPState()


def split(total: int, what: str) -> tuple[int, int]:
    """(start, size) of this rank's even share of `total` units (heads, channels)."""
    r, n = _state.rank, _state.size
    if total % n:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {n}")
    per = total // n
    return r * per, per


def padded_split(total: int) -> tuple[int, int]:
    """(start, size) of this rank's share of `total` rows cut in equal parts of
    ceil(total / ranks); the last part may run past `total` (those rows stay zero)."""
    per = -(-total // _state.size)
    return _state.rank * per, per


def kv_head_split(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(first kv head, kv heads) of this rank. With fewer kv heads than ranks each kv head is
    replicated on tp / num_kv_heads consecutive ranks, which hold the query heads of its group."""
    n = _state.size
    split(num_heads, "num_attention_heads")
    if num_kv_heads >= n:
        return split(num_kv_heads, "num_key_value_heads")
    if n % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {n} is neither a divisor nor a multiple of "
                         f"num_key_value_heads {num_kv_heads}")
    return _state.rank // (n // num_kv_heads), 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks, in place."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor, total: int) -> torch.Tensor:
    """[..., per] shards of every rank -> [..., total] (padding of the last shard dropped)."""
    if _state.size == 1:
        return x[..., :total]
    x = x.contiguous()
    parts = torch.empty((_state.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # torch 2.13 renames all_gather_into_tensor (the GPU host has 2.11, which lacks the new name)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(parts, x)
    return torch.cat(parts.chunk(_state.size), dim=-1)[..., :total]


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. the KV budget every rank can hold)."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
