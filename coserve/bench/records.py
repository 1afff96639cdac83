"""What a load run measured: one `RequestRecord` per request, an `EndpointRun` per endpoint,
and the `BenchResult` of the run. Times inside the run are perf_counter seconds; record times
are seconds after the run's t0.

The record's fields are the keys of a `FILE.records.jsonl` line (`to_json` / `from_json`);
fields left None are not written, except `http_status` and `error` on a failure, whose null
says "no HTTP answer".
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field, fields

__all__ = ["BenchResult", "EndpointRun", "Progress", "RequestRecord", "STATUSES"]

# ok: answered in full. failed: the server's fault (a non-2xx answer, an error event, a
# dropped or refused connection, a stream that ends without a token, an unreadable answer).
# cancelled: still running when the bench stopped it (the window's end, a stop).
STATUSES = ("ok", "failed", "cancelled")


@dataclass(slots=True)
class RequestRecord:
    endpoint: str  # "gen" | "embed"
    i: int  # request index: its input is rebuilt from (seed, i)
    start_s: float  # sent, seconds after t0
    status: str = "ok"  # one of STATUSES
    end_s: float | None = None  # last byte (ok), the failure or the cut
    worker: int | None = None  # closed loop: the worker that sent it
    scheduled_s: float | None = None  # open loop: when the schedule said to send it
    http_status: int | None = None
    error: str | None = None
    # gen
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    output_tokens: int | None = None  # usage.completion_tokens, else the tokens counted
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    chunks: int | None = None  # token-bearing chunks
    chunk_tokens: int | None = None  # tokens the chunks said they carry
    tokens_in_window: float | None = None  # what counts in the window's tok/s (see docs)
    chunk_times_s: list[float] | None = None  # each chunk's arrival after the send
    # embed
    latency_ms: float | None = None
    sequences: int | None = None
    dim: int | None = None
    encoding: str | None = None  # the encoding answered, when not the one asked

    def to_json(self) -> str:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None or (self.status == "failed" and f.name in ("http_status", "error")):
                d[f.name] = v
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> RequestRecord:
        """Raises ValueError on a line that is not a record."""
        d = json.loads(line)
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"endpoint", "i", "start_s"} <= set(d):
            raise ValueError(f"not a request record: {str(line)[:80]!r}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(repr=False)
class EndpointRun:
    """Everything measured on one endpoint. Times are perf_counter seconds."""

    kind: str  # "gen" | "embed"
    url: str
    model: str
    concurrency: int  # closed loop: workers; open loop: the cap on requests in flight
    rate: float | None = None  # open loop: requests/s offered; None: closed loop
    records: list[RequestRecord] = field(default_factory=list)
    # gen: gaps between token-bearing chunks that arrived inside the window (seconds), of
    # requests that did not fail
    itl_window: array = field(default_factory=lambda: array("d"))
    tokens_window: float = 0.0  # gen tokens / embed sequences counted in the window
    tokens_total: int = 0  # gen tokens / embed sequences of requests that did not fail
    in_flight: int = 0
    sent: int = 0
    sent_window: int = 0  # requests sent inside the window
    scheduled_window: int = 0  # open loop: arrivals the schedule put inside the window
    sent_of_scheduled: int = 0  # open loop: of those, how many were sent (at any time)
    sent_backlog: int = 0  # open loop: of sent_window, arrivals scheduled before the window
    cap_waits: int = 0  # open loop: arrivals in the window that found the cap full
    # open loop: seconds of the window the sender spent held at the cap (an arrival due
    # before the window can hold it there, and the window's arrivals queue behind it)
    cap_wait_s: float = 0.0
    completed_total: int = 0
    failed_total: int = 0
    usage_mismatch: int = 0  # requests whose usage disagreed with the chunks counted
    dim: int | None = None  # embed: the dimension of the first vectors answered
    encoding_answered: str | None = None  # embed: set when answers come in another encoding
    encoding_mismatch: int = 0  # embed: answers in another encoding than asked
    errors: Counter = field(default_factory=Counter)  # (status, message) -> count
    # Liveness: since when only connection errors came (None: the endpoint answers).
    down_since: float | None = None
    backoff_s: float = 0.0
    connection_errors: int = 0  # since down_since
    last_connection_error: str | None = None
    stalled: str | None = None  # why it counts as frozen: in flight and silent too long

    def __repr__(self) -> str:  # short: asyncio and debuggers repr results freely
        return (
            f"EndpointRun({self.kind} {self.url} model={self.model!r} "
            f"C={self.concurrency} rate={self.rate} records={len(self.records)})"
        )


@dataclass(repr=False)
class BenchResult:
    config: object  # the LoadConfig run
    started_at: str  # ISO 8601, wall clock, when load began (t0)
    t0: float
    window_start: float
    window_end: float  # planned end of the window
    stopped_at: float  # when load stopped
    cut_short: bool
    gen: EndpointRun | None
    embed: EndpointRun | None
    # why the run failed on its own: a dead or frozen endpoint, or one silent all window
    aborted: str | None = None

    def __repr__(self) -> str:
        return (
            f"BenchResult(started_at={self.started_at!r}, cut_short={self.cut_short}, "
            f"gen={self.gen!r}, embed={self.embed!r})"
        )

    @property
    def measured_s(self) -> float:
        """Length of the window actually measured (shorter than planned when cut short)."""
        return max(0.0, min(self.stopped_at, self.window_end) - self.window_start)

    @property
    def records(self) -> list[RequestRecord]:
        out = []
        for ep in (self.gen, self.embed):
            if ep is not None:
                out.extend(ep.records)
        return out

    def summary(self) -> dict:
        from coserve.bench.metrics import summarize

        return summarize(self)


@dataclass
class Progress:
    """A snapshot handed to `on_progress` about every `interval` seconds."""

    phase: str  # "warmup" | "measure" | "done"
    elapsed_s: float
    total_s: float
    gen_tok_s: float | None  # over the last interval
    embed_seq_s: float | None
    gen_in_flight: int
    embed_in_flight: int
    gen_completed: int
    embed_completed: int
    gen_failed: int
    embed_failed: int
