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

from coserve.engine.types import ALL_REDUCES


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1
    # MoE layers hold whole experts, an even share of them per rank, instead of a slice of
    # every expert (each rank runs its experts' (token, expert) pairs; the sum is all-reduced
    # as before)
    expert_parallel: bool = False


_state = TPState()


def state() -> TPState:
    return _state


def resolve_all_reduce(all_reduce: str, device: torch.device, size: int) -> str:
    """The all-reduce ("nccl" or "symm-mem") `size` ranks on `device` run for `all_reduce`:
    "auto" is symm-mem on CUDA GPUs at TP >= 2 (offline on two H200s, 1.31x TP=1 against
    NCCL's 1.20x; docs/performance.md) unless this process already had a symm-mem group (it serves
    one per process), else the process group ("nccl"; gloo on CPU). Every rank must run what
    rank 0 resolved. Raises ValueError for a name not in ALL_REDUCES."""
    if all_reduce not in ALL_REDUCES:
        raise ValueError(f"tp all_reduce must be one of {ALL_REDUCES}, got {all_reduce!r}")
    if all_reduce != "auto":
        return all_reduce
    return "symm-mem" if device.type == "cuda" and size > 1 and not _symm_used else "nccl"


GROUP_TIMEOUT = timedelta(minutes=10)


def group_store(rank: int, size: int, port: int, listen_fd: int | None = None) -> dist.TCPStore:
    """The group's rendezvous store on loopback. Rank 0 serves it on `listen_fd`, a socket
    bound to 127.0.0.1:`port` and listening, which the store takes over (torch's TCP store
    given only a host listens on every interface, whatever the host); the other ranks
    connect to 127.0.0.1:`port`."""
    if rank == 0:
        return dist.TCPStore(
            "127.0.0.1",
            port,
            size,
            True,
            GROUP_TIMEOUT,
            wait_for_workers=False,  # init_process_group waits for them
            master_listen_fd=listen_fd,
        )
    return dist.TCPStore("127.0.0.1", port, size, False, GROUP_TIMEOUT)


def init(
    rank: int,
    size: int,
    store: dist.Store | None,
    device: torch.device,
    all_reduce: str = "auto",
    expert_parallel: bool = False,
) -> None:
    """Join the tensor-parallel group through `store` (every rank calls this; it returns when
    all have; `store` may be None at size 1).
    all_reduce "symm-mem": small all-reduces (up to `SymmAllReduce.max_bytes`) run as torch
    symmetric memory's one-shot all-reduce (each GPU reads its peers' buffers over
    NVLink, no multicast); larger ones and CPU ranks use the process group. It can serve
    one group per process (torch keeps a symmetric-memory group's state for the process's
    life): a second raises ValueError."""
    global _state, _symm, _symm_used
    all_reduce = resolve_all_reduce(all_reduce, device, size)
    if size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=size,
            timeout=GROUP_TIMEOUT,
            **kw,
        )
        if all_reduce == "symm-mem" and device.type == "cuda":
            if _symm_used:
                dist.destroy_process_group()
                raise ValueError(
                    "the symm-mem all-reduce serves one tensor-parallel engine per "
                    "process; this process already had one (use nccl)"
                )
            _symm_used = True
            _symm = SymmAllReduce(device)
    _state = TPState(rank, size, expert_parallel and size > 1)


def destroy(abandon: bool = False) -> None:
    """Leave the group without waiting for the other ranks (they may be gone, or stuck in a
    collective): the communicators are aborted, not finalised. With `abandon` (a rank died)
    a CUDA group is only forgotten: ncclCommAbort then waits behind this rank's kernel that
    waits for the dead rank (seen for more than 4 s on two H200s), and so does freeing the
    symm-mem buffer (seen on two H200s, 2026-11-30): both are kept, and the process is about
    to exit, which frees them."""
    global _state, _symm
    if abandon and _symm is not None:
        # freeing its buffer synchronises the device, behind the same stuck kernel
        _abandoned.append(_symm)
    _symm = None
    if dist.is_initialized():
        if dist.get_backend() != "nccl":
            dist.destroy_process_group()
        elif not abandon:
            dist.distributed_c10d._abort_process_group()
    _state = TPState()


class SymmAllReduce:
    """One-shot all-reduce over a symmetric-memory buffer (CUDA graph safe: the buffer's
    address never changes). The input is copied into this rank's buffer, then every rank sums
    all ranks' buffers into its output."""

    max_bytes = 8 << 20

    def __init__(self, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group)
        self.group = group
        self.buf = symm_mem.empty(self.max_bytes // 2, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(self.buf, group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of x over ranks (a new tensor); None when x does not fit this path."""
        n = x.numel()
        if x.dtype != torch.bfloat16 or n * 2 > self.max_bytes or not x.is_contiguous():
            return None
        out = torch.empty_like(x)
        ops = torch.ops.symm_mem
        if hasattr(ops, "one_shot_all_reduce_copy_out"):  # the copy in, inside the kernel
            ops.one_shot_all_reduce_copy_out(
                self.buf[:n], x.view(-1), "sum", self.group, out.view(-1)
            )
        else:
            self.buf[:n].copy_(x.view(-1))
            ops.one_shot_all_reduce_out(self.buf[:n], "sum", self.group, out.view(-1))
        return out


_symm: SymmAllReduce | None = None
_abandoned: list[SymmAllReduce] = []  # kept alive until the process exits (destroy)
_symm_used = False


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
        raise ValueError(
            f"tensor_parallel_size {n} is neither a divisor nor a multiple of "
            f"num_key_value_heads {num_kv_heads}"
        )
    return _state.rank // (n // num_kv_heads), 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks: x itself (summed in place) or a new tensor."""
    if _state.size == 1:
        return x
    if _symm is not None and (out := _symm(x)) is not None:
        return out
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


def argmax_last_dim(x: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """Greedy tokens from vocab-parallel logits without gathering them: x [N, per] is this
    rank's shard (columns start..start+per of `total`; the padding past `total` is ignored).
    Returns [N] int64 on every rank, the index of the first maximum over all shards, exactly
    what argmax over the gathered logits gives. Moves N x 2 values per rank instead of N x
    per."""
    per = x.shape[-1]
    valid = min(per, total - start)
    if _state.size == 1:
        return x[..., :valid].argmax(dim=-1)
    local = x[..., :valid]
    idx = local.argmax(dim=-1)  # the first maximum (documented for argmax)
    best = local.gather(-1, idx[..., None])[..., 0]
    pair = torch.stack([best.float(), (idx + start).float()], dim=-1)  # ids < 2**24: exact
    parts = torch.empty((_state.size * pair.shape[0], 2), dtype=pair.dtype, device=pair.device)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(parts, pair.contiguous())
    parts = parts.view(_state.size, -1, 2)
    # the first rank holding the maximum holds its first occurrence (shards are in order)
    winner = parts[..., 0].argmax(dim=0, keepdim=True)
    return parts[..., 1].gather(0, winner)[0].long()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. the KV budget every rank can hold)."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
