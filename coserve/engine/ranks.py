"""What every rank of an engine builds and runs: its shard of the model and, for generation,
its share of the KV cache and the runner over them.

Rank 0's engine (gen_engine.py, embed_engine.py) builds one of these and puts the scheduling,
sampling and pooling on top; ranks 1..N-1 of a tensor-parallel engine (tp_workers.py) build
only this and `run` the steps rank 0 sends. Building runs collectives (the memory profile's
forward, the KV budget's minimum over ranks, CUDA graph capture), so every rank builds the
same way, at the same time."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from coserve.engine import parallel
from coserve.engine.attention import AttnMetadata
from coserve.engine.config import BertConfig
from coserve.engine.host_copy import to_device
from coserve.engine.kernels.sampling import sample
from coserve.engine.kv_cache import allocate_kv_cache, usable_blocks
from coserve.engine.memory import GiB, GpuBudget
from coserve.engine.messages import EmbedForward
from coserve.engine.runner import ModelRunner
from coserve.engine.steps import StaticStep, VarlenStep
from coserve.engine.types import EngineArgs
from coserve.engine.weights import LoadedModel, load_model

log = logging.getLogger("coserve.engine")

BLOCK_SIZE = 16  # token slots per KV-cache block


def resolve_device(name: str) -> torch.device:
    """`name` as a torch device; a bare "cuda" becomes the current CUDA device."""
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass(eq=False)
class GenRank:
    """One rank's generation model, KV cache and runner. Sizes: `num_blocks` KV blocks of
    `block_size` tokens (the null block not counted), `kv_bytes_per_token` this rank's bytes
    (its kv heads), `kv_bytes` the budget they came from."""

    args: EngineArgs
    lm: LoadedModel
    device: torch.device
    runner: ModelRunner
    num_blocks: int
    block_size: int
    kv_bytes: int
    kv_bytes_per_token: int

    @property
    def config(self):
        return self.lm.config

    @property
    def model(self):
        return self.lm.model

    @property
    def kv_capacity_tokens(self) -> int:
        return max(0, self.num_blocks) * self.block_size

    @classmethod
    def build(cls, args: EngineArgs, device: torch.device, block_size: int = BLOCK_SIZE) -> GenRank:
        """Load the model, size the KV cache to the memory budget (the smallest over the
        ranks), allocate it, capture the runner's CUDA graphs. Raises ValueError when the
        cache cannot hold max_model_len tokens."""
        budget, lm = _load(args, device, "generate")
        kv_bytes = (
            budget.kv_bytes(lambda: _profile(lm, args, device))
            if budget
            else args.cpu_kv_cache_bytes
        )
        kv_bytes = parallel.min_over_ranks(kv_bytes, device)  # every rank holds the same blocks
        c = lm.config
        elsize = torch.empty((), dtype=lm.dtype).element_size()
        kv_heads = parallel.kv_head_split(c.num_heads, c.num_kv_heads)[1]
        per_token = 2 * c.num_layers * kv_heads * c.head_dim * elsize  # this rank's kv heads
        num_blocks = usable_blocks(kv_bytes, per_token, block_size)
        capacity = max(0, num_blocks) * block_size
        if capacity < lm.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens "
                f"({kv_bytes / GiB:.3f} GiB at {per_token} B/token), fewer than "
                f"max_model_len {lm.max_model_len}: raise the memory budget "
                "(gpu_memory_utilization / cpu_kv_cache_bytes) or lower max_model_len"
            )
        kv = allocate_kv_cache(
            c.num_layers, num_blocks, block_size, kv_heads, c.head_dim, lm.dtype, device
        )
        runner = ModelRunner(
            lm.model,
            kv,
            block_size=block_size,
            max_num_seqs=args.max_num_seqs,
            max_model_len=lm.max_model_len,
            enforce_eager=args.enforce_eager,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        runner.capture_graphs()
        return cls(args, lm, device, runner, num_blocks, block_size, kv_bytes, per_token)

    def run(self, step: StaticStep | VarlenStep) -> None:
        """Ranks 1..N-1: run the step rank 0 sent (its logits are rank 0's to sample). Not
        waited for: the runner's staging waits for its own copies before reusing a buffer."""
        if not isinstance(step, StaticStep | VarlenStep):
            raise TypeError(f"a generation rank runs StaticStep or VarlenStep, not {step!r}")
        self.runner.execute(step)


@torch.inference_mode()
def _profile(lm: LoadedModel, args: EngineArgs, device: torch.device) -> None:
    """A forward pass at the largest prefill batch, plus logits and sampling for the largest
    decode batch, so the memory budget sees their peak."""
    max_len = lm.max_model_len
    n = min(args.max_num_batched_tokens, args.max_num_seqs * max_len)
    lens = [max_len] * (n // max_len) + ([n % max_len] if n % max_len else [])
    ids = torch.randint(0, lm.config.vocab_size, (n,), device=device)
    pos = torch.cat([torch.arange(k, device=device) for k in lens])
    hidden = lm.model(ids, pos, AttnMetadata.dense(lens, causal=True))
    rows = min(args.max_num_seqs, n)
    logits = lm.model.compute_logits(hidden[:rows])
    ones = torch.ones(rows, device=device)
    sample(logits, ones, ones * 0.9, [None] * rows, None)
    del hidden, logits


@dataclass(eq=False)
class EmbedRank:
    """One rank's embedding model: a forward pass over packed inputs."""

    lm: LoadedModel
    device: torch.device

    @property
    def config(self):
        return self.lm.config

    @property
    def model(self):
        return self.lm.model

    @property
    def causal(self) -> bool:
        return not isinstance(self.lm.config, BertConfig)

    @classmethod
    def build(cls, args: EngineArgs, device: torch.device) -> EmbedRank:
        """Load the model. Raises ValueError when its weights alone exceed the GPU memory
        budget."""
        budget, lm = _load(args, device, "embed")
        if budget is not None and lm.weight_bytes > budget.requested:
            raise ValueError(
                f"weights take {lm.weight_bytes / GiB:.2f} GiB, more than the "
                f"{budget.requested / GiB:.2f} GiB gpu_memory_utilization allows"
            )
        return cls(lm, device)

    def forward(self, inputs: list[list[int]]) -> torch.Tensor:
        """Final hidden states [sum of input lengths, hidden] of the packed inputs."""
        lens = [len(x) for x in inputs]
        flat = np.fromiter(itertools.chain.from_iterable(inputs), np.int64, sum(lens))
        starts = np.cumsum(lens) - lens
        pos = np.arange(len(flat)) - np.repeat(starts, lens)
        ids, pos = to_device(np.stack([flat, pos]), torch.int64, self.device)
        return self.model(ids, pos, AttnMetadata.dense(lens, causal=self.causal))

    def run(self, msg: EmbedForward) -> None:
        """Ranks 1..N-1: the forward pass of the batch rank 0 sent, waited for."""
        if not isinstance(msg, EmbedForward):
            raise TypeError(f"an embedding rank runs EmbedForward, not {msg!r}")
        with torch.inference_mode():
            self.forward(msg.inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _load(
    args: EngineArgs, device: torch.device, task: str
) -> tuple[GpuBudget | None, LoadedModel]:
    """The model of `args` for `task`, with the GPU budget started before it loads (so the
    budget sees the weights); no budget on CPU."""
    budget = GpuBudget(device, args.gpu_memory_utilization) if device.type == "cuda" else None
    if budget is not None:
        budget.start()
    lm = load_model(
        args.model,
        task=task,
        random_weights=args.random_weights,
        device=str(device),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    return budget, lm
