"""/v1/chat/completions requests: the messages rendered to one prompt, then the same sampling
fields as completions (protocol.py), with chat's names (`max_completion_tokens`, `logprobs`
true + `top_logprobs`).

The prompt is the model directory's chat template (tokenizer_config.json, rendered with Jinja
in a sandbox, as transformers does) where the model has one; otherwise a plain template:
`<|ROLE|>\\nCONTENT\\n` per message, then `<|assistant|>\\n`."""

from __future__ import annotations

from functools import lru_cache

from coserve.server.errors import ApiError, quote
from coserve.server.fields import (
    DEFAULT_LIMITS,
    RequestLimits,
    check_model,
    check_neutral,
    check_text,
    check_user,
    opt_bool,
    opt_int,
    type_name,
)
from coserve.server.protocol import MAX_LOGPROBS, GenRequest, build_params, parse_sampling

ROLES = ("system", "developer", "user", "assistant", "tool")
_CHAT_NEUTRAL = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
}


def _content(message: dict, i: int) -> str:
    param = f"messages[{i}].content"
    v = message.get("content")
    if v is None:
        if message.get("role") == "assistant":
            return ""
        raise ApiError(f"'{param}' is required", param="messages")
    if isinstance(v, str):
        return check_text(v, "messages")
    if isinstance(v, list):
        parts = []
        for part in v:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f"'{param}' may only hold text parts ({{'type': 'text', 'text': ...}}), got "
                    f"{quote(part)}",
                    param="messages",
                )
            parts.append(check_text(part["text"], "messages"))
        return "\n".join(parts)
    raise ApiError(
        f"'{param}' must be a string or a list of text parts, got {type_name(v)}", param="messages"
    )


def parse_messages(body: dict) -> list[dict[str, str]]:
    """`messages` as [{"role", "content"}] with text content only."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else type_name(messages)
        raise ApiError(
            f"'messages' must be a non-empty list of messages, got {got}", param="messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(
                f"'messages[{i}]' must be an object, got {type_name(m)}", param="messages"
            )
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {quote(role)}",
                param="messages",
            )
        out.append({"role": role, "content": _content(m, i)})
    return out


def plain_template(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


@lru_cache(maxsize=4)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` with the model's chat template, or the plain one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return plain_template(messages, add_generation_prompt)
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **getattr(tokenizer, "special_tokens", {}),
        )
    except Exception as e:  # the model's template refused these messages (raise_exception)
        raise ApiError(
            f"the model's chat template cannot render these messages: {quote(str(e))}",
            param="messages",
        ) from None


def parse_chat(
    body: dict,
    served_names: list[str],
    tokenizer,
    max_model_len: int,
    limits: RequestLimits = DEFAULT_LIMITS,
    eos_token_ids: tuple[int, ...] = (),
) -> GenRequest:
    model = check_model(body, served_names)
    check_neutral(body, _CHAT_NEUTRAL)
    check_user(body)
    if tokenizer is None:
        raise ApiError(
            "this model has no tokenizer, so it cannot read chat messages: use /v1/completions "
            "with token ids",
            param="messages",
        )
    f = parse_sampling(body, tokenizer, ("max_completion_tokens", "max_tokens"), limits)
    want = opt_bool(body, "logprobs", False)
    top = opt_int(body, "top_logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
    if top is not None and not want:
        raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if want else None
    text = render(parse_messages(body), tokenizer, opt_bool(body, "add_generation_prompt", True))
    chars = limits.prompt_chars(max_model_len)
    if len(text) > chars:
        raise ApiError(
            f"the messages make a prompt of {len(text)} characters, more than this server takes "
            f"({chars}, for a context of {max_model_len} tokens). Please shorten them.",
            param="messages",
        )
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ApiError("the messages make an empty prompt", param="messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = build_params(f, [ids], max_model_len, None, eos_token_ids, logprobs, "messages", key)
    return GenRequest(
        model,
        [ids] * f.n,
        params,
        f.stream,
        f.include_usage,
        f.continuous_usage,
        f.stop,
        logprobs,
        1,
    )
