"""Gen alone's step time as a function of the work a step does, fitted to the SLO guard's
probes.

A decode step's time follows what it computes: the sequences in its batch, the prompt tokens
it schedules, and the KV tokens its attention reads. A closed loop of many sequences refills
in waves, so gen alone's mean step alternates between levels seconds apart (on an H200,
successive probes read 16.4, 19.6, 16.7, 19.8, 16.7, 20.3, 17.3 ms): a budget from the median
of the last probes swings with whichever level they happened to catch. The guard instead fits

    step_s = a + b x kv_tokens + c x prefill_tokens + d x seqs

to its last probes (each: gen alone's figure and the mean work of the steps behind it) and
compares gen now against the fit's prediction for the work gen does now.

The fit is a ridge regression on standardized features (each centred on the probes' mean
and scaled by their spread), which stays solvable when features move together (a refill
brings prompt tokens and younger, shorter sequences at once) or two probe levels leave a
direction unmeasured. A feature that does not vary across the probes is left out; with
none that varies, or fewer probes than parameters, the baseline is the probes' median. A
prediction is held within [MIN_RATIO x, MAX_RATIO x] the probed figures, so a few probes
never set a budget far from anything measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from coserve.engine.types import StepWork

# Shrinkage per probe, in standardized units: the fitted level at a probed point moves by
# about RIDGE / (RIDGE + 1) of the feature's effect (0.1 %), while collinear features get a
# finite, shared coefficient instead of a singular system.
RIDGE = 1e-3
# A feature varies when its spread exceeds this fraction of its mean magnitude (and 1e-9
# absolute): noise in a constant feature must not become a slope.
MIN_SPREAD = 1e-6
MIN_RATIO, MAX_RATIO = 0.5, 2.0
FEATURES = ("kv_tokens", "prefill_tokens", "seqs")


def _features(work: StepWork) -> np.ndarray:
    """[kv_tokens, prefill_tokens, seqs] float64, the order of FEATURES."""
    return np.array([work.kv_tokens, work.prefill_tokens, work.seqs], dtype=np.float64)


@dataclass(frozen=True)
class ProbePoint:
    """One probe of gen alone: its step figure (s) and the work behind it (None: gen does
    not publish its work)."""

    step_s: float
    work: StepWork | None


@dataclass(frozen=True)
class Baseline:
    """Gen alone's step time: the fit when `fitted`, else the probes' median. Coefficients
    are in raw units: `intercept_s` seconds, `per_feature_s` seconds per unit of each of
    FEATURES (0 for a feature left out)."""

    median_s: float
    fitted: bool
    intercept_s: float
    per_feature_s: tuple[float, float, float]
    low_s: float
    high_s: float

    def predict(self, work: StepWork | None) -> float:
        """Gen alone's step time (s) for a step window doing `work`; the median without a fit
        or without `work`."""
        if not self.fitted or work is None:
            return self.median_s
        value = self.intercept_s + float(np.dot(self.per_feature_s, _features(work)))
        return min(max(value, self.low_s), self.high_s)

    def describe(self) -> str:
        """The baseline in words, for the log."""
        if not self.fitted:
            return f"median {self.median_s * 1e3:.2f} ms"
        kv, prefill, seq = (c * 1e3 for c in self.per_feature_s)
        return (
            f"fit {self.intercept_s * 1e3:.3f} ms + {kv:.3g} ms/kv token + "
            f"{prefill:.3g} ms/prefill token + {seq:.3g} ms/seq"
        )


def fit_baseline(points: list[ProbePoint]) -> Baseline:
    """The baseline from probes (at least one). Never raises on degenerate probes: it falls
    back to the median.

    Raises ValueError when `points` is empty."""
    if not points:
        raise ValueError("points: at least one probe is needed")
    steps = np.array([p.step_s for p in points], dtype=np.float64)
    median = statistics.median(steps.tolist())
    fallback = Baseline(median, False, median, (0.0, 0.0, 0.0), median, median)
    if any(p.work is None for p in points):
        return fallback
    x = np.stack([_features(p.work) for p in points])  # [probes, features]
    mean, spread = x.mean(axis=0), x.std(axis=0)
    varies = spread > np.maximum(MIN_SPREAD * np.abs(mean), 1e-9)
    n, k = len(points), int(varies.sum())
    if k == 0 or n < k + 1:  # nothing to fit, or fewer probes than parameters
        return fallback
    z = (x[:, varies] - mean[varies]) / spread[varies]
    y = steps - steps.mean()
    w = np.linalg.solve(z.T @ z + RIDGE * n * np.eye(k), z.T @ y)
    if not np.all(np.isfinite(w)):
        return fallback
    per = np.zeros(len(FEATURES))
    per[varies] = w / spread[varies]
    intercept = float(steps.mean() - per @ mean)
    return Baseline(
        median,
        True,
        intercept,
        (float(per[0]), float(per[1]), float(per[2])),
        MIN_RATIO * float(steps.min()),
        MAX_RATIO * float(steps.max()),
    )
