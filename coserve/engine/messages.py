"""Every message that crosses a process boundary around an engine, as typed records.

Two lines carry them, each one pickle per engine step:

- the HTTP front and its engine core (server/engine_client.py, server/engine_core.py):
  front -> core, a list of `Add` / `Abort` / `Allow` / `Profile` / `Stop` per turn of the
  front's event loop; core -> front, `Ready` or `Failed` once, then a `Step` per engine step
  (or `Dead`).
- rank 0 of a tensor-parallel engine and its other ranks (engine/tp_workers.py): a step to run
  (`StaticStep`, `VarlenStep`, engine/steps.py), an `EmbedForward`, a `Call`, or `Stop`, each
  in a `Sent`.

NamedTuples, not dataclasses, on the hot lines: a NamedTuple pickles as its class and a tuple
(a dataclass carries its field names in every pickle). A step's generation outputs cross as
columns (`GenOutputs`), not a record per request: the pickler makes a Python call for every
NamedTuple it writes (a record per output made building and pickling a 256-output step about
5x slower than plain tuples, on a CPU, in the engine core's step loop); the front makes the
per-request `GenOut`s."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from coserve.engine.types import SamplingParams

if TYPE_CHECKING:  # steps.py imports torch, which the HTTP front never loads
    from coserve.engine.steps import StaticStep, VarlenStep

# -- front -> engine core ---------------------------------------------------------------------


class NewGen(NamedTuple):
    """A generation request, as `GenEngine.add_request(*new)` takes it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class NewEmbed(NamedTuple):
    """An embedding request, as `EmbedEngine.add_request(*new)` takes it."""

    request_id: str
    inputs: list[list[int]]


class Add(NamedTuple):
    """Requests the core adds all or none; it answers with an `Ack` of the same add_id."""

    add_id: int
    requests: list[NewGen] | list[NewEmbed]


class Abort(NamedTuple):
    request_ids: list[str]


class Allow(NamedTuple):
    """The SLO guard's allowance for an embed engine (server/slo_guard.py): tokens per
    forward, seconds of pause between forwards, or a hold (no forward at all)."""

    tokens_per_forward: int
    pause_s: float
    hold: bool


class Profile(NamedTuple):
    """The step profiler (server/step_profile.py): "prepare" (set the profiler up before any
    load), "start" (capture the next `steps` steps into `out_dir`, and on until `min_s`
    seconds have passed) or "stop"."""

    action: str
    out_dir: str | None = None
    steps: int = 0
    min_s: float = 0.0


class Stop(NamedTuple):
    """Finish the step in progress and exit (also sent by rank 0 to its other ranks)."""


Command = Add | Abort | Allow | Profile | Stop


# -- engine core -> front ---------------------------------------------------------------------


class Ready(NamedTuple):
    """The engine is built: what the front needs to know of it."""

    model_name: str
    max_model_len: int
    dim: int | None  # embedding width; None for a generation engine
    tokenizer: Any  # a tokenizers.Tokenizer, or None for a model without one
    eos_token_ids: tuple[int, ...]
    stats: dict[str, float]


class Failed(NamedTuple):
    """The engine could not be built; the front exits with exit_code (2: the user's input)."""

    message: str
    exit_code: int


class GenOut(NamedTuple):
    """One step's output of one generation request. logprobs: the engine Sampler's
    `take_logprobs` entry, only for requests that ask for them."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: Any


class GenOutputs(NamedTuple):
    """One step's generation outputs, a column per field of `GenOut` (row i of every column
    is one request's)."""

    request_ids: list[str]
    new_token_ids: list[list[int]]
    finished: list[bool]
    finish_reasons: list[str | None]
    logprobs: list[Any]

    def rows(self) -> Iterator[GenOut]:
        return map(_gen_out, zip(*self, strict=True))


# GenOut from a row tuple without a Python call per row (GenOut._make is one)
_gen_out = functools.partial(tuple.__new__, GenOut)


class EmbedOut(NamedTuple):
    request_id: str
    embeddings: np.ndarray  # [inputs, dim] float32, L2-normalised
    prompt_tokens: int


class AddError(NamedTuple):
    kind: str  # "value": input the engine cannot serve (the client's); "other": the engine's
    message: str


class Ack(NamedTuple):
    """The answer to an `Add`: error None when every request went in."""

    add_id: int
    error: AddError | None


class Step(NamedTuple):
    """One engine step: its outputs, the adds answered since the last one, the engine's
    stats (None between stats intervals) and the steps run so far."""

    outputs: GenOutputs | list[EmbedOut]
    acks: list[Ack]
    stats: dict[str, float] | None
    steps: int


class Dead(NamedTuple):
    """The engine's step loop died; the core exits."""

    message: str


# -- rank 0 -> ranks 1..N-1 -------------------------------------------------------------------


class EmbedForward(NamedTuple):
    """The forward pass of one embedding batch (rank 0 pools its own result)."""

    inputs: list[list[int]]


class Call(NamedTuple):
    """Runs `fn(rank, *args)` on every other rank, where rank is that rank's `GenRank` or
    `EmbedRank` (diagnostics: profilers, collective benchmarks); `fn` must be importable
    (module-level)."""

    fn: Callable
    args: tuple = ()


class Sent(NamedTuple):
    """What crosses a rank's pipe: a message and when rank 0 sent it (time.monotonic(), for
    the worker's send-to-receive lag counters)."""

    at: float
    msg: StaticStep | VarlenStep | EmbedForward | Call | Stop
