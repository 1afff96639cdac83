"""What crosses the line between an engine and whatever drives it (the HTTP server, the
offline benchmark): requests in, per-step outputs out. Engines run one step at a time on
the caller's thread; the caller owns threading."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# EngineArgs.tp_all_reduce's choices (parallel.resolve_all_reduce says what "auto" runs)
ALL_REDUCES = ("auto", "nccl", "symm-mem")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0  # sample from the k most likely tokens; 0: all
    min_tokens: int = 0  # no stop token (all_stop_token_ids) before this many tokens
    stop_token_ids: tuple[
        int, ...
    ] = ()  # tokens that end the sequence ("stop"), kept in the output
    # stop_token_ids plus the model's EOS ids unless ignore_eos: what min_tokens holds back.
    # The caller fills it in from the model's EOS ids, as vLLM's front end does.
    all_stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # the sampled token's logprob and the top-N; None: none


@dataclass
class EngineArgs:
    model: str
    random_weights: bool = False
    device: str = "cpu"
    dtype: str | None = None
    # Fraction of the whole device this process may use, as in vLLM (GPU only).
    gpu_memory_utilization: float = 0.9
    # KV-cache budget in bytes on CPU, where "fraction of the device" means nothing.
    cpu_kv_cache_bytes: int = 256 << 20
    # torch intra-op threads of each of the engine's processes on the CPU; None: the engine's
    # choice (cpu_threads.py: one for generation in a process of its own, a share of the
    # cores per TP rank, torch's default otherwise)
    cpu_threads: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enforce_eager: bool = False
    seed: int = 0
    # ranks (one process and one device each) the weights are split across
    tensor_parallel_size: int = 1
    # how ranks sum their partial results: "nccl" (the process group), "symm-mem" (a one-shot
    # all-reduce over torch symmetric memory for small tensors, no multicast) or "auto"
    # (parallel.resolve_all_reduce: symm-mem on CUDA GPUs, the process group elsewhere)
    tp_all_reduce: str = "auto"
    # tensor parallel MoE: each rank holds whole experts (num_experts / N of them) instead of
    # a slice of every expert (vLLM's --enable-expert-parallel)
    enable_expert_parallel: bool = False
    # greedy decode steps are launched before the previous step's tokens reach the host
    # (they are fed from the device), so the host's work overlaps the GPU's
    async_scheduling: bool = True


@dataclass(frozen=True, slots=True)
class StepWork:
    """What a generation step computed: `seqs` sequences in its batch, `prefill_tokens` prompt
    tokens it scheduled (chunks included; decodes count none), and `kv_tokens` KV tokens its
    attention read (the sum of its sequences' context lengths, new tokens included). A decode
    step's time follows these (the SLO guard compares like with like).

    One step's record (an engine's `last_step_work`) holds whole counts; `mean` of a window's
    records, and the SLO guard's reading of them off gen's /metrics, hold fractions. Hence
    the float fields."""

    seqs: float
    prefill_tokens: float
    kv_tokens: float

    def __str__(self) -> str:
        return (
            f"{self.seqs:.1f} seqs, {self.prefill_tokens:.0f} prefill tokens, "
            f"{self.kv_tokens:.0f} KV tokens"
        )

    @classmethod
    def mean(cls, works: Sequence[StepWork]) -> StepWork:
        """Per-step means of `works`, each field its own mean; all 0 when `works` is empty."""
        n = len(works) or 1
        return cls(
            sum(w.seqs for w in works) / n,
            sum(w.prefill_tokens for w in works) / n,
            sum(w.kv_tokens for w in works) / n,
        )


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EmbedOutput:
    request_id: str
    embeddings: np.ndarray  # [inputs, dim] float32, L2-normalised
    prompt_tokens: int = 0
