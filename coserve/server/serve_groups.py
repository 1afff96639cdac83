"""The flag groups of `coserve serve` that belong to one kind of server (colocated, the
embed server's SLO guard) or bound one request (limits); each kind's flags are listed in the
parser's `flag_kinds` (serve_flags.misplaced refuses one given to another kind)."""

from __future__ import annotations

import argparse

from coserve.server.fields import CHARS_PER_TOKEN_BOUND, RequestLimits
from coserve.server.profile_flags import add_flags as add_profile_flags
from coserve.server.serve_flags import (
    GUARDED,
    KindGroup,
    body_bytes,
    fraction,
    non_negative_float,
    percent,
    positive_float,
    positive_int,
    tcp_port,
)
from coserve.server.slo_guard import GuardConfig


def add_flag_groups(parser: argparse.ArgumentParser) -> None:
    kinds: dict[str, tuple[str, ...]] = {}  # flag -> the kinds it is for (others refuse it)
    parser.set_defaults(flag_kinds=kinds, given_flags=frozenset())
    co = KindGroup(
        parser.add_argument_group(
            "colocated: the embed engine beside gen in one process",
            "Gen decodes on a high-priority CUDA stream, embed on a low one. Of the flags "
            "above, --model, --served-model-name, --port, --gpu-memory-utilization, "
            "--max-model-len, --max-num-seqs, --max-num-batched-tokens and --enforce-eager are "
            "gen's (embed's are below); the rest, --random-weights, --device, --dtype and --seed "
            "among them, hold for both engines.",
        ),
        ("colocated",),
        kinds,
    )
    co.add_argument(
        "--embed-model", metavar="PRESET_OR_DIR", default=None, help="the embedding model"
    )
    co.add_argument(
        "--embed-port",
        metavar="N",
        type=tcp_port,
        default=8001,
        help="the embed endpoint's port (0 picks a free one) (default %(default)s)",
    )
    co.add_argument(
        "--embed-gpu-memory-utilization",
        metavar="F",
        type=fraction,
        default=0.3,
        help="the embed engine's fraction of the GPU (default %(default)s)",
    )
    co.add_argument(
        "--embed-max-model-len",
        metavar="N",
        type=positive_int,
        default=None,
        help="the embed engine's longest input (default: the model's own limit)",
    )
    co.add_argument(
        "--embed-max-num-seqs",
        metavar="N",
        type=positive_int,
        default=256,
        help="inputs in one embed forward (default %(default)s)",
    )
    co.add_argument(
        "--embed-sms",
        metavar="M",
        type=positive_int,
        default=None,
        help="confine embed to a CUDA green context of M SMs (gen keeps all; needs torch with "
        "green contexts)",
    )
    co.add_argument(
        "--gen-sms",
        metavar="N",
        type=positive_int,
        default=None,
        help="confine gen to N SMs disjoint from embed's --embed-sms (both rounded up to the "
        "driver's SM groups, 8 on Hopper); requires --embed-sms and the cuda-bindings package; "
        "without it gen may use every SM",
    )
    co.add_argument(
        "--embed-max-num-batched-tokens",
        metavar="N",
        type=positive_int,
        default=8192,
        help="tokens in one embed forward (default %(default)s)",
    )
    guard = KindGroup(
        parser.add_argument_group(
            "SLO guard (embed, colocated): throttle embed forwards to hold a gen server's step time"
        ),
        GUARDED,
        kinds,
    )
    guard.add_argument(
        "--slo-guard-gen-url",
        metavar="URL",
        default=None,
        help="the gen server whose /metrics the guard reads",
    )
    slo = KindGroup(guard.group.add_mutually_exclusive_group(), GUARDED, kinds)
    slo.add_argument(
        "--gen-tpot-slo-ms",
        metavar="MS",
        type=positive_float,
        default=None,
        help="budget of gen's step time (--slo-guard-stat), in ms",
    )
    slo.add_argument(
        "--gen-tpot-slo-pct",
        metavar="P",
        type=percent,
        default=None,
        help="budget: gen alone's step time plus P %%; gen alone is measured by probes that "
        "hold embed (the first when gen first gets busy)",
    )
    guard.add_argument(
        "--slo-guard-stat",
        choices=["mean", "p99"],
        default="mean",
        help="gen's step time over 0.5 s the guard holds: mean (a request's TPOT is a mean of step "
        "times) or p99 (default %(default)s)",
    )
    guard.add_argument(
        "--slo-guard-min-tokens",
        metavar="N",
        type=positive_int,
        default=GuardConfig.min_tokens,
        help="fewest tokens per embed forward the guard cuts to before it pauses between forwards "
        "(default %(default)s)",
    )
    guard.add_argument(
        "--slo-guard-interval-ms",
        metavar="MS",
        type=positive_float,
        default=50.0,
        help="how often the guard reads gen's /metrics (default %(default)s)",
    )
    guard.add_argument(
        "--slo-guard-probe-interval-s",
        metavar="S",
        type=non_negative_float,
        default=GuardConfig.probe_interval_s,
        help="with --gen-tpot-slo-pct: seconds from one probe of gen alone to the next while gen "
        "is busy; 0: probe once, when gen first gets busy (default %(default)s)",
    )
    guard.add_argument(
        "--slo-guard-probe-s",
        metavar="S",
        type=positive_float,
        default=GuardConfig.probe_s,
        help="with --gen-tpot-slo-pct: seconds a probe measures gen alone, after the settle; at "
        f"least gen's step window ({GuardConfig.gen_window_s:g} s) (default %(default)s)",
    )
    guard.add_argument(
        "--slo-guard-settle-s",
        metavar="S",
        type=non_negative_float,
        default=GuardConfig.settle_s,
        help="with --gen-tpot-slo-pct: seconds a probe holds embed before it measures: the "
        "longest embed forward, one gen step and 50 ms for gen's figures to catch up "
        "(default %(default)s)",
    )
    add_profile_flags(
        KindGroup(parser.add_argument_group("profiling (gen and embed)"), ("gen", "embed"), kinds)
    )
    limits = parser.add_argument_group(
        "limits on one request (checked before any work; a request over one gets a 4xx)"
    )
    limits.add_argument(
        "--max-embed-inputs",
        metavar="N",
        type=positive_int,
        default=RequestLimits.max_embed_inputs,
        help="inputs in one /v1/embeddings request (default %(default)s, OpenAI's limit)",
    )
    limits.add_argument(
        "--max-gen-choices",
        metavar="N",
        type=positive_int,
        default=RequestLimits.max_gen_choices,
        help="sequences one completion/chat request may start, prompts x n (default %(default)s, "
        "vLLM's default max_num_seqs)",
    )
    limits.add_argument(
        "--max-request-bytes",
        metavar="BYTES",
        type=body_bytes,
        default=RequestLimits.max_body_bytes,
        help="size of one request body (default 64M); larger ones get 413",
    )
    limits.add_argument(
        "--max-prompt-chars",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"characters of one text prompt or input, checked before tokenising (default: "
        f"{CHARS_PER_TOKEN_BOUND} x max_model_len)",
    )
