"""Checks of single request fields, shared by every endpoint, and the limits on the work one
request may ask for.

Every check raises ApiError naming the field and quoting at most ~100 characters of the
value, so a bad request gets a short 400 that says what is wrong and the server carries on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from coserve.server.errors import ApiError, quote

PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"
INT64 = (-(1 << 63), (1 << 63) - 1)
# No tokenizer in use turns more than this many characters into one token on average, so a
# text longer than this times the context cannot fit and is refused before it is tokenised.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class RequestLimits:
    """The most work one request may ask for, checked before any of it is done.

    max_embed_inputs: inputs per /v1/embeddings request (OpenAI's limit, 2048).
    max_gen_choices: sequences per completion/chat request, prompts x n (vLLM's default
        max_num_seqs, 256: one full batch).
    max_body_bytes: bytes of one request body (413 above it).
    max_prompt_chars: characters of one text prompt/input; None: CHARS_PER_TOKEN_BOUND x
        max_model_len."""

    max_embed_inputs: int = 2048
    max_gen_choices: int = 256
    max_body_bytes: int = 64 << 20
    max_prompt_chars: int | None = None

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * max_model_len


DEFAULT_LIMITS = RequestLimits()


def type_name(v) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def opt_bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be a boolean, got {type_name(v)}", param=key)
    return v


def opt_int(
    body: dict,
    key: str,
    default: int | None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not is_int(v):
        raise ApiError(f"'{key}' must be an integer, got {type_name(v)}", param=key)
    if minimum is not None and v < minimum:
        raise ApiError(f"'{key}' must be at least {minimum}, got {quote(v)}", param=key)
    if maximum is not None and v > maximum:
        raise ApiError(f"'{key}' must be at most {maximum}, got {quote(v)}", param=key)
    return v


def opt_number(
    body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False
) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not (is_int(v) or isinstance(v, float)):
        raise ApiError(f"'{key}' must be a number, got {type_name(v)}", param=key)
    v = float(v) if is_int(v) and abs(v) < 1 << 1000 else v
    if is_int(v) or not math.isfinite(v):
        raise ApiError(f"'{key}' must be a finite number, got {quote(v)}", param=key)
    if v < lo or (lo_open and v == lo) or v > hi:
        where = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ApiError(f"'{key}' must be in {where}, got {v}", param=key)
    return float(v)


def check_model(body: dict, served_names: list[str]) -> str:
    """The served name a request asks for; an absent model means the (only) served one.
    An unknown name is a 404, as OpenAI and vLLM answer it."""
    v = body.get("model")
    if v is None:
        return served_names[0]
    if not isinstance(v, str):
        raise ApiError(f"'model' must be a string, got {type_name(v)}", param="model")
    if v not in served_names:
        raise ApiError(
            f"The model {quote(v)} does not exist; this server serves {', '.join(served_names)}",
            status=404,
            param="model",
        )
    return v


def check_user(body: dict) -> None:
    """'user' (an end user's id, which OpenAI keeps for abuse monitoring) has no effect here,
    but one that is not a string is a 400, as OpenAI and vLLM answer it."""
    v = body.get("user")
    if v is not None and not isinstance(v, str):
        raise ApiError(f"'user' must be a string, got {type_name(v)}", param="user")


def check_neutral(body: dict, table: dict) -> None:
    """Fields this server does not implement: accepted only at a neutral value, anything else
    is a 400 naming the field (never silently ignored)."""
    for key, neutral in table.items():
        if key in body and not any(body[key] == n and type(body[key]) is type(n) for n in neutral):
            raise ApiError(
                f"'{key}' is not supported by this server (got {quote(body[key])})", param=key
            )


def check_text(text: str, param: str) -> str:
    """A string that can be encoded as UTF-8 (JSON allows lone surrogates; text cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            f"'{param}' holds a character that is not valid Unicode text "
            f"({quote(text[e.start : e.end])} at index {e.start})",
            param=param,
        ) from None
    return text


def check_ids(ids: list, param: str, limit: int | None = None) -> list[int]:
    if limit is not None and len(ids) > limit:
        raise ApiError(
            f"This model's maximum context length is {limit} tokens, and '{param}' holds "
            f"{len(ids)} token ids. Please shorten it.",
            param=param,
        )
    for t in ids:
        if not is_int(t) or not 0 <= t <= INT64[1]:
            raise ApiError(
                f"'{param}' holds {quote(t)}, which is not a token id (a non-negative integer)",
                param=param,
            )
    return ids


def token_lists(
    value, tokenizer, param: str, max_model_len: int, max_chars: int
) -> list[list[int]]:
    """A prompt/input in any of the four OpenAI forms -> one token-id list per sequence.
    Lengths are checked before any text is tokenised: a text over `max_chars` characters or
    an id list over `max_model_len` (which cannot fit either) is refused as it is."""
    if value is None:
        raise ApiError(f"'{param}' is required", param=param)

    def encode(text: str, i: int) -> list[int]:
        if tokenizer is None:
            raise ApiError(
                f"this model has no tokenizer: send '{param}' as token ids, not text", param=param
            )
        if not text:  # as OpenAI: even where the tokenizer would add special tokens
            raise ApiError(f"'{param}' holds an empty string", param=param)
        if len(text) > max_chars:
            raise ApiError(
                f"'{param}'{which(i)} has {len(text)} characters, more than this server takes "
                f"({max_chars}, for a context of {max_model_len} tokens). Please shorten it.",
                param=param,
            )
        ids = list(tokenizer.encode(check_text(text, param)))
        if len(ids) > max_model_len:  # refused at once, before the rest of the request is tokenised
            raise ApiError(
                f"This model's maximum context length is {max_model_len} tokens, and '{param}'"
                f"{which(i)} has {len(ids)} tokens. Please shorten it.",
                param=param,
            )
        return ids

    def which(i: int) -> str:
        return f" (item {i})" if isinstance(value, list) else ""

    if isinstance(value, str):
        out = [encode(value, 0)]
    elif isinstance(value, list) and value:
        if all(is_int(t) for t in value):
            out = [check_ids(value, param, max_model_len)]
        elif all(isinstance(t, str) for t in value):
            out = [encode(t, i) for i, t in enumerate(value)]
        elif all(isinstance(t, list) for t in value):
            out = [check_ids(t, param, max_model_len) for t in value]
        else:
            raise ApiError(
                f"'{param}' must be {PROMPT_FORMS}; got a list mixing types", param=param
            )
    elif isinstance(value, list):
        raise ApiError(f"'{param}' must not be an empty list", param=param)
    else:
        raise ApiError(f"'{param}' must be {PROMPT_FORMS}, got {type_name(value)}", param=param)
    for i, ids in enumerate(out):
        if not ids:
            raise ApiError(f"'{param}'{which(i) if len(out) > 1 else ''} is empty", param=param)
    return out


def count_items(value, param: str, limit: int, what: str) -> None:
    """Refuse a prompt/input list with more sequences than `limit`, before any is looked at."""
    if isinstance(value, list) and value and not is_int(value[0]) and len(value) > limit:
        raise ApiError(
            f"'{param}' holds {len(value)} {what}, more than this server takes in one request "
            f"({limit})",
            param=param,
        )
