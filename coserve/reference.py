"""Published figures a report can mark beside its own (never mixed into measured data).

`REFERENCES` maps the name a spec gives in `[report] reference = NAME` to the figures.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReferencePoint:
    """One co-located result of a published run."""

    strategy: str  # the coserve strategy it corresponds to: "timeslice" | "mps"
    embed_seq_s: float  # embed sequences/s achieved beside gen
    gen_tok_s: float  # gen output tokens/s
    gen_delta_pct: float  # against the reference's gen-alone baseline, in %
    tpot_p99_ms: float | None = None


@dataclass(frozen=True)
class Reference:
    label: str  # the legend entry, e.g. "study (vLLM 0.15.1)"
    source: str  # where the figures are written
    baseline_tok_s: float  # gen alone
    baseline_tpot_p99_ms: float | None
    points: tuple[ReferencePoint, ...]


# The seed study (Qwen3-30B-A3B FP8 + Qwen3-Embedding-8B on one H200, vLLM 0.15.1): the
# A/B means of section 3.1 (3 reps each). Its TPOT table does not say which of its runs it
# comes from; its p99s are placed at the A/B's embed rates.
SEED = Reference(
    label="study (vLLM 0.15.1)",
    source="the seed study, section 3.1 (A/B test, 3 reps) and its per-token latency table",
    baseline_tok_s=24_363.0,
    baseline_tpot_p99_ms=21.6,
    points=(
        ReferencePoint(
            "timeslice", embed_seq_s=492.0, gen_tok_s=24_294.0, gen_delta_pct=-0.3, tpot_p99_ms=24.3
        ),
        ReferencePoint(
            "mps", embed_seq_s=486.0, gen_tok_s=23_003.0, gen_delta_pct=-5.6, tpot_p99_ms=24.6
        ),
    ),
)

REFERENCES: dict[str, Reference] = {"seed": SEED}
