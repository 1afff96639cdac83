"""A generation request as the scheduler sees it: its tokens (prompt, then output), how many
of them have their KV in the cache, and which cache blocks hold them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from coserve.engine.types import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"  # not admitted, preempted, or part way through a chunked prefill
    RUNNING = "running"  # prefilled; decodes one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose k/v are in the cache
    block_table: list[int] = field(default_factory=list)
    # names this block table while it only grows (kv_cache.BlockManager); 0: none yet
    block_table_key: int = 0
    finish_reason: str | None = None
    prompt_counted: bool = False
    # asks for top_k, min_tokens or logprobs: the sampler's slower per-row path
    special: bool = field(init=False)
    # the argmax of the raw logits is its token: temperature 0 and not `special`
    plain_greedy: bool = field(init=False)
    # tokens (prompt included) at which max_tokens ends it
    max_total_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.special = p.top_k > 0 or p.min_tokens > 0 or p.logprobs is not None
        self.plain_greedy = p.temperature <= 0 and not self.special
        self.max_total_tokens = self.num_prompt_tokens + p.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]
