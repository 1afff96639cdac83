"""Prometheus text exposition (format 0.0.4), written by hand. Names follow vLLM's
(`vllm:num_requests_running` ...) under the `coserve:` prefix, so dashboards carry over."""

from __future__ import annotations

from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (engine stats key, metric name, type, help)
_ENGINE_METRICS = [
    (
        "num_running",
        "coserve:num_requests_running",
        "gauge",
        "Requests in the engine's running batch.",
    ),
    (
        "num_waiting",
        "coserve:num_requests_waiting",
        "gauge",
        "Requests queued in the engine, not yet running.",
    ),
    (
        "kv_cache_usage",
        "coserve:kv_cache_usage_perc",
        "gauge",
        "Fraction of KV-cache blocks in use (0..1).",
    ),
    (
        "kv_capacity_tokens",
        "coserve:kv_cache_capacity_tokens",
        "gauge",
        "Tokens the KV cache can hold.",
    ),
    (
        "num_preemptions",
        "coserve:num_preemptions_total",
        "counter",
        "Requests preempted because the KV cache ran out.",
    ),
    ("prompt_tokens_total", "coserve:prompt_tokens_total", "counter", "Prompt tokens processed."),
    ("generation_tokens_total", "coserve:generation_tokens_total", "counter", "Tokens generated."),
    (
        "step_time_mean_s",
        "coserve:engine_step_seconds_mean",
        "gauge",
        "Mean engine step wall time over the last 0.5 s (0 when no step ran).",
    ),
    (
        "step_time_p99_s",
        "coserve:engine_step_seconds_p99",
        "gauge",
        "p99 of engine step wall time over the last 0.5 s (0 when no step ran).",
    ),
    (
        "step_window_steps",
        "coserve:engine_steps_window",
        "gauge",
        "Engine steps in that 0.5 s window.",
    ),
    (
        "step_batch_mean",
        "coserve:engine_step_batch_mean",
        "gauge",
        "Mean sequences per engine step over that window (generation only; 0: no step).",
    ),
    (
        "step_prefill_tokens_mean",
        "coserve:engine_step_prefill_tokens_mean",
        "gauge",
        "Mean prompt (prefill) tokens scheduled per engine step over that window (generation "
        "only).",
    ),
    (
        "step_kv_tokens_mean",
        "coserve:engine_step_kv_tokens_mean",
        "gauge",
        "Mean KV tokens an engine step's attention read (sum of its sequences' context "
        "lengths) over that window (generation only).",
    ),
]
# the engine core's stats key -> its name on /metrics (what the SLO guard reads back)
ENGINE_METRIC = {key: name for key, name, _, _ in _ENGINE_METRICS}


def _labels(labels: dict) -> str:
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


class Metrics:
    """Counters the HTTP side keeps; engine figures come from the engine loop's snapshot."""

    def __init__(self, model_name: str, kind: str):
        self.model_name = model_name
        self.kind = kind
        self.requests = Counter()  # (endpoint, outcome) -> n
        self.finished = Counter()  # finish reason -> n (each choice of a completion)
        self.in_flight = 0
        self.embedded_inputs = 0

    def render(
        self, engine_stats: dict, engine_steps: int, extra: list[tuple[str, str, str, float]] = ()
    ) -> str:
        """The page; `extra` adds (name, type, help, value) families (the SLO guard's)."""
        base = {"model_name": self.model_name}
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels({**base, **labels})} {_num(value)}")

        for key, name, kind, help_text in _ENGINE_METRICS:
            if key in engine_stats:
                family(name, kind, help_text, [({}, engine_stats[key])])
        family(
            "coserve:engine_steps_total",
            "counter",
            "Engine scheduler steps run.",
            [({}, engine_steps)],
        )
        family(
            "coserve:requests_in_flight",
            "gauge",
            "HTTP API requests being served now.",
            [({}, self.in_flight)],
        )
        family(
            "coserve:request_success_total",
            "counter",
            "Finished sequences by finish reason (stop, length, abort).",
            [({"finished_reason": r}, n) for r, n in sorted(self.finished.items())],
        )
        family(
            "coserve:requests_total",
            "counter",
            "HTTP API requests by endpoint and outcome (success, bad_request, unauthorized, "
            "aborted, unavailable, error).",
            [({"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(self.requests.items())],
        )
        if self.kind == "embed":
            family(
                "coserve:embedding_inputs_total",
                "counter",
                "Sequences embedded.",
                [({}, self.embedded_inputs)],
            )
        for name, kind, help_text, value in extra:
            family(name, kind, help_text, [({}, value)])
        return "\n".join(out) + "\n"
