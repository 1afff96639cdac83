"""What one load run is: endpoints, concurrency or rate, workload shape, SLOs and timing.

The fields mirror `coserve bench`'s flags (`--gen-url` is `gen_url`, `--warmup` is
`warmup_s`, `--duration` is `duration_s`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from coserve.bench.arrivals import ARRIVALS, MAX_BURSTINESS, MAX_RATE, MIN_BURSTINESS, MIN_RATE
from coserve.bench.embed_answer import ENCODINGS

GEN_ENDPOINTS = ("completions", "chat")
# The longest warm-up, window, ramp or stall a load takes: one day. A longer one is a typo
# (1e12 for 1e2) that would hold the servers for ever, not a measurement anyone waits for.
MAX_SECONDS = 86400.0
# How often a load run looks for a dead or silent endpoint, and so the shortest stall: a
# silence shorter than the time between two looks cannot be seen (1e-9 ended every run at its
# first look, a server between two tokens taken for a frozen one).
WATCH_S = 0.1
# The most requests one endpoint keeps in flight: each holds a TCP connection and a task, and
# a host has at most 65,535 ports to open connections to one server from. A larger figure is
# a typo (1e9 closed-loop workers take the machine's memory before the first request).
MAX_CONCURRENCY = 65_536
# Inputs per embeddings request: the OpenAI embeddings API's own limit (coserve's embed
# server refuses more too); 100,000 spent 50 s of the bench's CPU building one window's load.
MAX_EMBED_BATCH = 2048
# The longest prompt, output or embed input a load sends, in tokens: 131,072, the longest
# context of the models coserve serves (Qwen3's, with YaRN rope scaling, as its model cards
# give it; 40,960 without). A longer one is refused by every server, so a load of them
# measures only refusals.
MAX_LEN = 131_072


def url_problem(url: str) -> str | None:
    """Why `url` is no base URL of a server to drive (not http(s), no host, a port out of
    range, a query or fragment the paths would be appended after, a space or control
    character), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port out of range or not a number)
    except ValueError as e:  # 'http://[::1' was a traceback, ':99999' failed at connecting
        return f"{url!r} is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)"
    if parts.query or parts.fragment or any(c <= " " or c == "\x7f" for c in url):
        return (
            f"{url!r} is not a server's base URL: it has a query, a fragment, a space or a "
            "control character"
        )
    return None


class ConfigError(ValueError):
    """A bad load configuration; the message names the field, `.field` holds it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class LoadConfig:
    gen_url: str | None = None
    embed_url: str | None = None
    gen_model: str | None = None  # None: the first entry of the server's /v1/models
    embed_model: str | None = None
    # Closed loop: requests kept in flight. With a rate: the cap on requests in flight.
    gen_concurrency: int = 512
    input_len: int = 30
    output_len: int = 512
    embed_concurrency: int = 64
    embed_batch: int = 8
    # Open loop: requests/s sent on a schedule (see arrivals.py); None = closed loop.
    gen_rate: float | None = None
    embed_rate: float | None = None  # each request carries embed_batch inputs
    arrival: str = "poisson"  # "poisson" | "constant"
    burstiness: float = 1.0  # gamma shape of the gaps, 1 = Poisson (vllm bench serve's)
    # Goodput: a gen request counts only when it meets every bound given (vllm bench's).
    goodput_ttft_ms: float | None = None
    goodput_tpot_ms: float | None = None
    goodput_e2el_ms: float | None = None
    embed_slo_ms: float | None = None  # embed request latency bound for embed goodput
    gen_endpoint: str = "completions"  # "completions" | "chat" (/v1/chat/completions)
    embed_input_len: int = 32
    embed_text: bool = False  # send texts instead of token-id lists to /v1/embeddings
    # encoding_format of /v1/embeddings: "base64" is what the official openai client asks
    # for unless told otherwise (float32 bytes, no JSON float round trip); or "float".
    embed_encoding: str = "base64"
    warmup_s: float = 30.0
    duration_s: float = 60.0
    seed: int = 0
    api_key: str | None = None
    # Prompt token ids are drawn uniformly from [token_id_low, token_id_high): small enough
    # for any vocabulary (the tiny presets' too), above the ids most vocabularies reserve.
    token_id_low: int = 10
    token_id_high: int = 256
    temperature: float = 0.0  # as `vllm bench serve` sends by default
    # Keep every chunk's arrival time in the per-request records (big: one float a token).
    record_chunks: bool = False
    # The C first requests of each endpoint are spread evenly over this many seconds at the
    # start of the warm-up instead of leaving all at once, so that a server whose requests
    # all take the same time is not hit by synchronised bursts forever after.
    # None: min(1 s, warm-up / 4).
    ramp_s: float | None = None
    # Time allowed for the start-up check of each endpoint (GET /v1/models).
    connect_timeout_s: float = 10.0
    # An endpoint with requests in flight that answers nothing (no token, no answer, no
    # failure) for this long is frozen: the run ends with the reason (EndpointDead).
    stall_s: float = 10.0

    def validate(self) -> LoadConfig:
        if not self.gen_url and not self.embed_url:
            raise ConfigError("gen_url", "give a gen URL, an embed URL or both")
        for name in ("gen_url", "embed_url"):
            url = getattr(self, name)
            if url and (why := url_problem(url)):
                raise ConfigError(name, why)
        for name in (
            "gen_concurrency",
            "input_len",
            "output_len",
            "embed_concurrency",
            "embed_batch",
            "embed_input_len",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        for name in ("input_len", "output_len", "embed_input_len"):
            v = getattr(self, name)
            if v > MAX_LEN:
                raise ConfigError(
                    name,
                    f"{v:,} is above {MAX_LEN:,} tokens, the longest context of the models "
                    "coserve serves",
                )
        if self.embed_batch > MAX_EMBED_BATCH:
            raise ConfigError(
                "embed_batch",
                f"{self.embed_batch:,} inputs per request is above {MAX_EMBED_BATCH}, the "
                "OpenAI embeddings API's limit",
            )
        for name in ("gen_concurrency", "embed_concurrency"):
            v = getattr(self, name)
            if v > MAX_CONCURRENCY:
                raise ConfigError(
                    name,
                    f"{v:,} requests in flight is above {MAX_CONCURRENCY:,}, more than one "
                    "bench process can hold open (one connection each)",
                )
        for name in (
            "gen_rate",
            "embed_rate",
            "goodput_ttft_ms",
            "goodput_tpot_ms",
            "goodput_e2el_ms",
            "embed_slo_ms",
        ):
            v = getattr(self, name)
            if v is not None and not _positive(v):
                raise ConfigError(name, f"must be a positive number, got {v!r}")
        for name in ("gen_rate", "embed_rate"):
            v = getattr(self, name)
            if v is not None and v > MAX_RATE:
                raise ConfigError(
                    name,
                    f"{v:g} req/s is above {MAX_RATE:,.0f} req/s, more than one bench "
                    f"process can send",
                )
            if v is not None and v < MIN_RATE:
                raise ConfigError(
                    name, f"{v:g} req/s is below {MIN_RATE:g} req/s (about one a day): no load"
                )
        if self.arrival not in ARRIVALS:
            raise ConfigError(
                "arrival", f"must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}"
            )
        if not (_number(self.burstiness) and MIN_BURSTINESS <= self.burstiness <= MAX_BURSTINESS):
            raise ConfigError(
                "burstiness",
                f"must be a number in [{MIN_BURSTINESS:g}, {MAX_BURSTINESS:g}] (a gamma shape "
                f"outside it piles arrivals onto one instant), got {self.burstiness!r}",
            )
        if self.arrival == "constant" and self.burstiness != 1.0:
            raise ConfigError(
                "burstiness", "shapes the gaps of poisson arrivals; constant arrivals have none"
            )
        if self.gen_endpoint not in GEN_ENDPOINTS:
            raise ConfigError(
                "gen_endpoint",
                f"must be one of {', '.join(GEN_ENDPOINTS)}, got {self.gen_endpoint!r}",
            )
        if self.embed_encoding not in ENCODINGS:
            raise ConfigError(
                "embed_encoding",
                f"must be one of {', '.join(ENCODINGS)}, got {self.embed_encoding!r}",
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        _seconds("warmup_s", self.warmup_s, least=0.0)
        _seconds("duration_s", self.duration_s)
        if not (0 <= self.token_id_low < self.token_id_high):
            raise ConfigError(
                "token_id_low",
                f"token id range [{self.token_id_low}, {self.token_id_high}) is empty",
            )
        if self.ramp_s is not None:
            _seconds("ramp_s", self.ramp_s, least=0.0)
        if self.connect_timeout_s <= 0:
            raise ConfigError("connect_timeout_s", "must be > 0")
        _seconds("stall_s", self.stall_s, least=WATCH_S)
        return self

    @property
    def goodput_bounds(self) -> dict[str, float]:
        """The gen goodput bounds given, by metric: {"ttft": ms, "tpot": ms, "e2el": ms}."""
        b = {
            "ttft": self.goodput_ttft_ms,
            "tpot": self.goodput_tpot_ms,
            "e2el": self.goodput_e2el_ms,
        }
        return {k: v for k, v in b.items() if v is not None}

    @property
    def effective_ramp_s(self) -> float:
        return self.ramp_s if self.ramp_s is not None else min(1.0, self.warmup_s / 4)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d.get("api_key"):
            d["api_key"] = "***"
        return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _seconds(name: str, v, least: float | None = None) -> None:
    """Refuse `v` unless it is a finite number of seconds in (0, MAX_SECONDS], or in
    [least, MAX_SECONDS] when `least` is given: ConfigError naming `name`."""
    low = f"[{least:g}" if least is not None else "(0"
    if not (_number(v) and (v >= least if least is not None else v > 0) and v <= MAX_SECONDS):
        raise ConfigError(
            name, f"must be a number of seconds in {low}, {MAX_SECONDS:g}] (one day), got {v!r}"
        )
