"""`coserve serve` flags that belong to one kind of server: which were given, and refusing
one given to another kind (it would be accepted and do nothing)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class Given(argparse.Action):
    """Store the value, and add the option to `namespace.given_flags` (a frozenset of
    option strings, e.g. '--embed-sms'), so a flag given at its default still counts."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "given_flags", frozenset())
        namespace.given_flags = given | {self.option_strings[0]}


@dataclass
class KindGroup:
    """An argument group whose flags are for `kinds` only: each records that it was given
    (serve_flags.Given) and is listed in `table` (flag -> kinds)."""

    group: Any
    kinds: tuple[str, ...]
    table: dict[str, tuple[str, ...]]

    def add_argument(self, *names: str, **kw: Any) -> None:
        self.group.add_argument(*names, action=Given, **kw)
        self.table[names[0]] = self.kinds


def misplaced(args: argparse.Namespace, flag_kinds: dict[str, tuple[str, ...]]) -> str | None:
    """Why a flag given is meant for another kind of server than `args.kind`, or None."""
    for flag in sorted(getattr(args, "given_flags", ())):
        kinds = flag_kinds.get(flag)
        if kinds and args.kind not in kinds:
            return (
                f"{flag} is for serve {' and serve '.join(kinds)}; serve {args.kind} would "
                "ignore it"
            )
    return None


def all_reduce_problem(
    tp_all_reduce: str, tensor_parallel_size: int | None, device: str
) -> str | None:
    """Why `--tp-all-reduce symm-mem` would do nothing here (`device`: "cpu", "cuda", "cuda:N";
    `tensor_parallel_size` None: not known yet), or None: the engine would quietly sum
    through the process group while its log said symm-mem."""
    if tp_all_reduce != "symm-mem":
        return None
    if tensor_parallel_size == 1:
        return (
            "--tp-all-reduce symm-mem: one rank has nothing to all-reduce (it takes "
            "--tensor-parallel-size 2 or more); leave it out"
        )
    if device == "cpu":
        return (
            "--tp-all-reduce symm-mem: CPU ranks sum through the process group (gloo); "
            "symmetric memory needs CUDA GPUs; leave it out"
        )
    return None


def tokens_flag(args: argparse.Namespace) -> tuple[str, int, int | None] | None:
    """(flag, tokens, max_model_len flag's value) of the embed engine's tokens per forward
    when a flag set it (None otherwise: the default is raised to max_model_len quietly)."""
    if args.kind == "colocated":
        flag, tokens, mml = (
            "--embed-max-num-batched-tokens",
            args.embed_max_num_batched_tokens,
            args.embed_max_model_len,
        )
    else:
        flag = getattr(args, "tokens_flag", "--max-num-batched-tokens")
        tokens, mml = args.max_num_batched_tokens, args.max_model_len
    return (flag, tokens, mml) if flag in getattr(args, "given_flags", ()) else None


def batched_tokens_problem(flag: str, tokens: int, max_model_len: int | None) -> str | None:
    """Why `tokens` per embed forward cannot be used with inputs of up to `max_model_len`
    tokens (None: unknown yet, or fine): a forward always takes a whole input."""
    if max_model_len is not None and tokens < max_model_len:
        return (
            f"{flag}: {tokens} is less than max_model_len ({max_model_len}); the embed engine "
            "takes a whole input per forward"
        )
    return None


def http_url_problem(flag: str, url: str) -> str | None:
    """Why `url` is not an http(s) URL with a host, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError on a port out of range or not a number)
    except ValueError as e:
        return f"{flag}: {url!r} is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not host:
        return f"{flag}: {url!r} is not an http(s) URL with a host (e.g. http://127.0.0.1:8000)"
    return None


def number(kind: type, text: str, what: str, ok: Callable[[Any], bool]):
    """`text` as `kind` (int or float) where `ok` holds for it; else ArgumentTypeError "must be
    WHAT, got TEXT", also for no number at all (argparse's own message named the type
    function: "invalid positive_int value")."""
    try:
        v = kind(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def positive_float(text: str) -> float:
    return number(float, text, "a positive number", lambda v: 0 < v < 1e9)


def non_negative_float(text: str) -> float:
    return number(float, text, "a number >= 0", lambda v: 0 <= v < 1e9)


def percent(text: str) -> float:
    return number(float, text, "a percentage in (0, 1000]", lambda v: 0 < v <= 1000)


# The kinds of server that can run the SLO guard: an embed server, and the colocated one
# (the guard throttles its embed engine).
GUARDED = ("embed", "colocated")
_GUARD_FLAGS = {  # the probes' flags, by GuardConfig field (a percentage budget only)
    "probe_interval_s": "--slo-guard-probe-interval-s",
    "probe_s": "--slo-guard-probe-s",
    "settle_s": "--slo-guard-settle-s",
}


_BUDGET_FLAGS = {"gen_tpot_slo_ms": "--gen-tpot-slo-ms", "gen_tpot_slo_pct": "--gen-tpot-slo-pct"}


def guard_config(args, max_model_len: int):
    """The SLO guard's settings from the flags; None without --slo-guard-gen-url.
    `max_model_len`: the embed engine's.
    Raises ValueError naming the flag that is missing or misplaced."""
    from coserve.server.slo_guard import GuardConfig

    budget_given = args.gen_tpot_slo_ms is not None or args.gen_tpot_slo_pct is not None
    if args.slo_guard_gen_url is None:
        if budget_given:
            raise ValueError("--gen-tpot-slo-ms/--gen-tpot-slo-pct need --slo-guard-gen-url")
        return None
    if args.kind not in GUARDED:
        raise ValueError(
            "--slo-guard-gen-url: the guard throttles an embed engine; serve embed or colocated"
        )
    bad_url = http_url_problem("--slo-guard-gen-url", args.slo_guard_gen_url)
    if bad_url:
        raise ValueError(bad_url)
    if not budget_given:
        raise ValueError(
            "--slo-guard-gen-url needs a budget: --gen-tpot-slo-ms or --gen-tpot-slo-pct"
        )
    if args.gen_tpot_slo_ms is not None:
        for flag in _GUARD_FLAGS.values():
            if flag in getattr(args, "given_flags", ()):
                raise ValueError(
                    f"{flag} is for --gen-tpot-slo-pct; --gen-tpot-slo-ms is a fixed budget "
                    "that needs no probe of gen alone"
                )
    budget_s = args.gen_tpot_slo_ms / 1e3 if args.gen_tpot_slo_ms is not None else None
    tokens = (
        args.embed_max_num_batched_tokens
        if args.kind == "colocated"
        else args.max_num_batched_tokens
    )
    max_tokens = max(tokens, max_model_len)
    try:
        return GuardConfig(
            budget_s=budget_s,
            over_alone_pct=args.gen_tpot_slo_pct,
            stat=args.slo_guard_stat,
            max_tokens=max_tokens,
            min_tokens=min(args.slo_guard_min_tokens, max_tokens),
            probe_interval_s=args.slo_guard_probe_interval_s,
            probe_s=args.slo_guard_probe_s,
            settle_s=args.slo_guard_settle_s,
        )
    except ValueError as e:  # name the flag rather than the GuardConfig field
        field, _, why = str(e).partition(": ")
        flag = _GUARD_FLAGS.get(field) or _BUDGET_FLAGS.get(field)
        if flag is None:
            raise
        raise ValueError(f"{flag}: {why}") from None


def guard_options(args, max_model_len: int) -> dict:
    """The SLO guard's ServeOptions fields (guard, guard_gen_url, guard_interval_s) from the
    flags; `max_model_len` is the embed engine's. Raises ValueError as guard_config does."""
    return {
        "guard": guard_config(args, max_model_len),
        "guard_gen_url": args.slo_guard_gen_url or "",
        "guard_interval_s": args.slo_guard_interval_ms / 1e3,
    }


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'268435456', '256M', '256MiB', '1.5G' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (e.g. 268435456, 256M, 2G)"
        )
    unit = (m.group(2) or "b")[0].lower()
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(unit))


def body_bytes(text: str) -> int:
    """A request-body limit: parse_bytes of at least one byte (aiohttp reads 0 as no limit)."""
    v = parse_bytes(text)
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1 byte, got {text!r} (0 would lift the limit altogether)"
        )
    return v


def fraction(text: str) -> float:
    return number(float, text, "in (0, 1]", lambda v: 0.0 < v <= 1.0)


def positive_int(text: str) -> int:
    return number(int, text, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return number(int, text, "0 or more", lambda v: v >= 0)


def tcp_port(text: str) -> int:
    """A TCP port, 0 for any free one (the socket layer takes a larger number modulo 65536)."""
    return number(int, text, "a TCP port in [0, 65535]", lambda v: 0 <= v <= 65535)


def seconds(text: str) -> float:
    return number(float, text, "a number of seconds in [0, 1e6)", lambda v: 0 <= v < 1e6)
