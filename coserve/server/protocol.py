"""Request bodies of the OpenAI API, checked by hand (no pydantic on the GPU machine).

Every check raises ApiError naming the field, so a bad request gets a 400 that says what is
wrong and the server carries on. Prompts come out as token ids: text goes through the
model's tokenizer here, before anything reaches the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from coserve.engine.types import SamplingParams
from coserve.server.errors import ApiError

PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"

# Fields of the OpenAI/vLLM completion API this server does not implement: accepted only at
# their neutral value, anything else is a 400 naming the field (never silently ignored).
_COMPLETION_NEUTRAL = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None,),
    "suffix": (None, ""),
    "stop": (None, "", []),
    "stop_token_ids": (None, []),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "guided_json": (None,),
    "response_format": (None,),
}
_EMBEDDING_NEUTRAL = {
    "truncate_prompt_tokens": (None,),
}


@dataclass
class CompletionRequest:
    model: str
    prompts: list[list[int]]  # token ids, one list per choice
    params: list[SamplingParams]  # one per prompt (a defaulted max_tokens depends on its length)
    stream: bool
    include_usage: bool
    continuous_usage: bool


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[list[int]]
    encoding_format: str  # "float" | "base64"


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def opt_bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be a boolean, got {_type_name(v)}", param=key)
    return v


def opt_int(body: dict, key: str, default: int | None, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise ApiError(f"'{key}' must be an integer, got {_type_name(v)}", param=key)
    if minimum is not None and v < minimum:
        raise ApiError(f"'{key}' must be at least {minimum}, got {v}", param=key)
    return v


def opt_number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise ApiError(f"'{key}' must be a number, got {_type_name(v)}", param=key)
    if v < lo or (lo_open and v == lo) or v > hi:
        where = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ApiError(f"'{key}' must be in {where}, got {v}", param=key)
    return float(v)


def check_model(body: dict, served_names: list[str]) -> str:
    """The served name a request asks for; an absent model means the (only) served one."""
    v = body.get("model")
    if v is None:
        return served_names[0]
    if not isinstance(v, str):
        raise ApiError(f"'model' must be a string, got {_type_name(v)}", param="model")
    if v not in served_names:
        raise ApiError(f"The model `{v}` does not exist; this server serves {', '.join(served_names)}",
                       param="model")
    return v


def _check_neutral(body: dict, table: dict) -> None:
    for key, neutral in table.items():
        if key in body and body[key] not in neutral:
            raise ApiError(f"'{key}' is not supported by this server (got {body[key]!r})", param=key)


def _check_ids(ids: list, param: str) -> list[int]:
    for t in ids:
        if not _is_int(t) or t < 0:
            raise ApiError(f"'{param}' holds {t!r}, which is not a token id (a non-negative integer)",
                           param=param)
    return ids


def token_lists(value, tokenizer, param: str) -> list[list[int]]:
    """A prompt/input in any of the four OpenAI forms -> one token-id list per sequence."""
    if value is None:
        raise ApiError(f"'{param}' is required", param=param)

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise ApiError(f"this model has no tokenizer: send '{param}' as token ids, not text", param=param)
        if not text:  # as OpenAI: even where the tokenizer would add special tokens
            raise ApiError(f"'{param}' holds an empty string", param=param)
        return list(tokenizer.encode(text))

    if isinstance(value, str):
        out = [encode(value)]
    elif isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            out = [_check_ids(value, param)]
        elif all(isinstance(t, str) for t in value):
            out = [encode(t) for t in value]
        elif all(isinstance(t, list) for t in value):
            out = [_check_ids(t, param) for t in value]
        else:
            raise ApiError(f"'{param}' must be {PROMPT_FORMS}; got a list mixing types", param=param)
    elif isinstance(value, list):
        raise ApiError(f"'{param}' must not be an empty list", param=param)
    else:
        raise ApiError(f"'{param}' must be {PROMPT_FORMS}, got {_type_name(value)}", param=param)
    for i, ids in enumerate(out):
        if not ids:
            which = f" (item {i})" if len(out) > 1 else ""
            raise ApiError(f"'{param}'{which} is empty", param=param)
    return out


def parse_completion(body: dict, served_names: list[str], tokenizer, max_model_len: int) -> CompletionRequest:
    model = check_model(body, served_names)
    _check_neutral(body, _COMPLETION_NEUTRAL)
    n = opt_int(body, "n", 1)
    if n != 1:
        raise ApiError(f"'n' must be 1 (several choices per prompt are not supported), got {n}", param="n")
    max_tokens = opt_int(body, "max_tokens", None)
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = opt_number(body, "temperature", 1.0, 0.0, math.inf)
    top_p = opt_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = opt_int(body, "seed", None)
    ignore_eos = opt_bool(body, "ignore_eos", False)
    opt_bool(body, "return_token_ids", True)  # accepted; token ids are always returned
    stream = opt_bool(body, "stream", False)
    stream_options = body.get("stream_options")
    include_usage = continuous = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise ApiError(f"'stream_options' must be an object, got {_type_name(stream_options)}",
                           param="stream_options")
        if not stream:
            raise ApiError("'stream_options' is only allowed with 'stream': true", param="stream_options")
        include_usage = opt_bool(stream_options, "include_usage", False)
        continuous = opt_bool(stream_options, "continuous_usage_stats", False)
    prompts = token_lists(body.get("prompt"), tokenizer, "prompt")
    params = []
    for ids in prompts:
        if len(ids) >= max_model_len:
            raise ApiError(f"This model's maximum context length is {max_model_len} tokens, and the prompt "
                           f"has {len(ids)}: no room left for a completion. Please shorten the prompt.",
                           param="prompt")
        mt = max_model_len - len(ids) if max_tokens is None else max_tokens
        if len(ids) + mt > max_model_len:
            raise ApiError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {len(ids) + mt} tokens ({len(ids)} in the prompt, {mt} in the "
                           f"completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens")
        params.append(SamplingParams(max_tokens=mt, temperature=temperature, top_p=top_p, seed=seed,
                                     ignore_eos=ignore_eos))
    return CompletionRequest(model, prompts, params, stream, include_usage, continuous)


def parse_embedding(body: dict, served_names: list[str], tokenizer, max_model_len: int, dim: int) -> EmbeddingRequest:
    model = check_model(body, served_names)
    _check_neutral(body, _EMBEDDING_NEUTRAL)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dims = opt_int(body, "dimensions", None)
    if dims is not None and dims != dim:
        raise ApiError(f"'dimensions' cannot change this model's embedding size ({dim}), got {dims}",
                       param="dimensions")
    inputs = token_lists(body.get("input"), tokenizer, "input")
    for i, ids in enumerate(inputs):
        if len(ids) > max_model_len:
            which = f"item {i} of 'input'" if len(inputs) > 1 else "'input'"
            raise ApiError(f"{which} has {len(ids)} tokens, more than this model's maximum of "
                           f"{max_model_len}. Please shorten it.", param="input")
    return EmbeddingRequest(model, inputs, fmt)
