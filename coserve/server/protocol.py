"""Request bodies of /v1/completions and /v1/embeddings (chat: chat.py), checked by hand (no
pydantic on the GPU machine), with vLLM's meanings and defaults.

Prompts come out as token ids: text goes through the model's tokenizer here, before anything
reaches the engine, and only after the request's size has been checked against the limits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from coserve.engine.types import SamplingParams
from coserve.server.errors import ApiError, quote
from coserve.server.fields import (
    DEFAULT_LIMITS,
    INT64,
    RequestLimits,
    check_ids,
    check_model,
    check_neutral,
    check_text,
    check_user,
    count_items,
    opt_bool,
    opt_int,
    opt_number,
    token_lists,
    type_name,
)

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOPS = 64
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default on /v1/completions

# Fields of the OpenAI/vLLM APIs this server does not implement: accepted only at their
# neutral value (the openai client may send them), anything else is a 400 naming the field.
_SAMPLING_NEUTRAL = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "min_p": (None, 0, 0.0),
    "guided_json": (None,),
    "include_stop_str_in_output": (None, False),
}
_COMPLETION_NEUTRAL = {
    **_SAMPLING_NEUTRAL,
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "response_format": (None,),
}
_EMBEDDING_NEUTRAL = {
    "truncate_prompt_tokens": (None,),
}


@dataclass
class GenRequest:
    """A completion or chat request: one engine sequence per choice (prompts x n)."""

    model: str
    prompts: list[list[int]]  # token ids, one list per choice
    params: list[SamplingParams]  # one per choice (a defaulted max_tokens depends on its length)
    stream: bool
    include_usage: bool
    continuous_usage: bool
    stop: list[str] = field(default_factory=list)  # text that ends a choice (not part of it)
    logprobs: int | None = None  # top-N logprobs per token; None: none asked
    num_prompts: int = 1  # distinct prompts (usage counts each once per choice, as vLLM)


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[list[int]]
    encoding_format: str  # "float" | "base64"


@dataclass
class SamplingFields:
    """The sampling fields completions and chat share, before per-prompt lengths."""

    max_tokens: int | None
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_tokens: int
    seed: int | None
    ignore_eos: bool
    stop: list[str]
    stop_token_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _stop_strings(body: dict, tokenizer) -> list[str]:
    v = body.get("stop")
    if v is None or v == "" or v == []:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(
            f"'stop' must be a string or a list of strings, got {quote(v)}", param="stop"
        )
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' holds {len(stops)} strings, more than {MAX_STOPS}", param="stop")
    if tokenizer is None:
        raise ApiError(
            "this model has no tokenizer, so it cannot stop on text: use 'stop_token_ids'",
            param="stop",
        )
    return [check_text(s, "stop") for s in stops if s]


def _stop_token_ids(body: dict) -> tuple[int, ...]:
    v = body.get("stop_token_ids")
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ApiError(
            f"'stop_token_ids' must be a list of token ids, got {type_name(v)}",
            param="stop_token_ids",
        )
    if len(v) > MAX_STOPS:
        raise ApiError(
            f"'stop_token_ids' holds {len(v)} ids, more than {MAX_STOPS}", param="stop_token_ids"
        )
    return tuple(check_ids(v, "stop_token_ids"))


def parse_sampling(
    body: dict, tokenizer, max_tokens_keys: tuple[str, ...], limits: RequestLimits
) -> SamplingFields:
    check_neutral(body, _SAMPLING_NEUTRAL)
    n = opt_int(body, "n", 1, minimum=1, maximum=limits.max_gen_choices)
    max_tokens = None
    for key in max_tokens_keys:  # chat: max_completion_tokens wins over the older max_tokens
        if body.get(key) is not None:
            max_tokens = opt_int(body, key, None, minimum=1)
            break
    min_tokens = opt_int(body, "min_tokens", 0, minimum=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise ApiError(
            f"'min_tokens' ({min_tokens}) must not exceed '{max_tokens_keys[0]}' ({max_tokens})",
            param="min_tokens",
        )
    top_k = opt_int(
        body, "top_k", 0, minimum=-1, maximum=INT64[1]
    )  # over the vocabulary: all tokens
    stream = opt_bool(body, "stream", False)
    stream_options = body.get("stream_options")
    include_usage = continuous = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise ApiError(
                f"'stream_options' must be an object, got {type_name(stream_options)}",
                param="stream_options",
            )
        if not stream:
            raise ApiError(
                "'stream_options' is only allowed with 'stream': true", param="stream_options"
            )
        include_usage = opt_bool(stream_options, "include_usage", False)
        continuous = opt_bool(stream_options, "continuous_usage_stats", False)
    return SamplingFields(
        max_tokens=max_tokens,
        n=n,
        temperature=opt_number(body, "temperature", 1.0, 0.0, 1e6),
        top_p=opt_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(0, top_k),
        min_tokens=min_tokens,
        seed=opt_int(body, "seed", None, minimum=INT64[0], maximum=INT64[1]),
        ignore_eos=opt_bool(body, "ignore_eos", False),
        stop=_stop_strings(body, tokenizer),
        stop_token_ids=_stop_token_ids(body),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
    )


def build_params(
    f: SamplingFields,
    prompts: list[list[int]],
    max_model_len: int,
    default_max_tokens: int | None,
    eos_token_ids: tuple[int, ...],
    logprobs: int | None,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> list[SamplingParams]:
    """One SamplingParams per choice: n per prompt, choice i*n+j from prompt i (as vLLM)."""
    params = []
    stops = f.stop_token_ids + (() if f.ignore_eos else tuple(eos_token_ids))
    for ids in prompts:
        if len(ids) >= max_model_len:
            raise ApiError(
                f"This model's maximum context length is {max_model_len} tokens, and the prompt "
                f"has {len(ids)}: no room left for a completion. Please shorten the prompt.",
                param=prompt_param,
            )
        room = max_model_len - len(ids)
        if f.max_tokens is not None:
            mt = f.max_tokens
        else:
            mt = room if default_max_tokens is None else min(default_max_tokens, room)
        if mt > room:
            raise ApiError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {len(ids) + mt} tokens ({len(ids)} in the prompt, {mt} in the "
                f"completion). Please reduce the length of the prompt or completion.",
                param=max_tokens_param,
            )
        p = SamplingParams(
            max_tokens=mt,
            temperature=f.temperature,
            top_p=f.top_p,
            seed=f.seed,
            ignore_eos=f.ignore_eos,
            top_k=f.top_k,
            min_tokens=min(f.min_tokens, mt),
            stop_token_ids=f.stop_token_ids,
            all_stop_token_ids=stops,
            logprobs=logprobs,
        )
        # vLLM's parallel sampling: a seeded request's choice j draws with seed + j
        params.extend(
            [p]
            if f.n == 1
            else [p if f.seed is None else replace(p, seed=f.seed + j) for j in range(f.n)]
        )
    return params


def parse_completion(
    body: dict,
    served_names: list[str],
    tokenizer,
    max_model_len: int,
    limits: RequestLimits = DEFAULT_LIMITS,
    eos_token_ids: tuple[int, ...] = (),
) -> GenRequest:
    model = check_model(body, served_names)
    check_neutral(body, _COMPLETION_NEUTRAL)
    check_user(body)
    f = parse_sampling(body, tokenizer, ("max_tokens",), limits)
    logprobs = opt_int(body, "logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
    opt_bool(body, "return_token_ids", True)  # accepted; token ids are always returned
    prompt = body.get("prompt")
    count_items(
        prompt,
        "prompt",
        limits.max_gen_choices // f.n,
        "prompts" if f.n == 1 else f"prompts (n={f.n})",
    )
    prompts = token_lists(
        prompt, tokenizer, "prompt", max_model_len, limits.prompt_chars(max_model_len)
    )
    params = build_params(
        f, prompts, max_model_len, COMPLETION_DEFAULT_MAX_TOKENS, eos_token_ids, logprobs
    )
    return GenRequest(
        model,
        [ids for ids in prompts for _ in range(f.n)],
        params,
        f.stream,
        f.include_usage,
        f.continuous_usage,
        f.stop,
        logprobs,
        len(prompts),
    )


def parse_embedding(
    body: dict,
    served_names: list[str],
    tokenizer,
    max_model_len: int,
    dim: int,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> EmbeddingRequest:
    model = check_model(body, served_names)
    check_neutral(body, _EMBEDDING_NEUTRAL)
    check_user(body)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(
            f"'encoding_format' must be 'float' or 'base64', got {quote(fmt)}",
            param="encoding_format",
        )
    dims = opt_int(body, "dimensions", None)
    if dims is not None and dims != dim:
        raise ApiError(
            f"'dimensions' cannot change this model's embedding size ({dim}), got {quote(dims)}",
            param="dimensions",
        )
    value = body.get("input")
    count_items(value, "input", limits.max_embed_inputs, "inputs")
    inputs = token_lists(
        value, tokenizer, "input", max_model_len, limits.prompt_chars(max_model_len)
    )
    for i, ids in enumerate(inputs):
        if len(ids) > max_model_len:
            which = f"item {i} of 'input'" if len(inputs) > 1 else "'input'"
            raise ApiError(
                f"{which} has {len(ids)} tokens, more than this model's maximum of "
                f"{max_model_len}. Please shorten it.",
                param="input",
            )
    return EmbeddingRequest(model, inputs, fmt)
