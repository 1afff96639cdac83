"""What the stream test server (stream_server.py) answers: its rates, sizes, failures on
purpose and processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StreamServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "stream-test"
    # Generation: first chunk `ttft_ms` after the request is read, then one chunk every
    # `itl_ms`. `tokens` overrides the request's max_tokens (None: honour max_tokens).
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    tokens: int | None = None
    tokens_per_chunk: int = 1  # tokens carried by each chunk (the last may carry fewer)
    token_ids: bool = False  # put the chunk's new token ids in each chunk ("token_ids")
    usage: bool = True  # answer stream_options.include_usage with a final usage chunk
    # Embeddings: answered `embed_latency_ms` after the request is read.
    embed_latency_ms: float = 20.0
    embed_dim: int = 8
    # Answer embeddings in this encoding whatever was asked ("float" | "base64"; None: as
    # asked), as some servers and proxies do.
    embed_answer_encoding: str | None = None
    # Failures. Every `fail_every`-th request (counted per endpoint, 1-based) is answered
    # with `fail_status`; every `drop_every`-th gen request has its connection cut after
    # `drop_after` chunks (embeddings: before any answer).
    fail_every: int = 0
    fail_status: int = 503
    fail_message: str = "injected failure"
    drop_every: int = 0
    drop_after: int = 1
    # End those streams with an error event (then [DONE]) instead of cutting the connection.
    drop_as_error: bool = False
    # Slow requests: every `slow_every`-th request (per endpoint) is answered `slow_ms`
    # later: its first token (gen), its answer (embed). For goodput tests.
    slow_every: int = 0
    slow_ms: float = 0.0
    api_key: str | None = None
    # Spin instead of sleeping when a chunk is due within a millisecond: chunks then leave
    # within ~20 us of their time instead of up to 1 ms late, at the cost of a busy core.
    precise: bool = False
    # Processes sharing the port (SO_REUSEPORT), for rates one core cannot write. Each counts
    # its own requests for fail_every / drop_every.
    workers: int = 1
    # Where each server process writes its counters and chunk lateness when it stops.
    stats_dir: str | None = None
