"""Statistics over repetitions: mean, sample std, 95 % CI (Student's t), and the relative delta
of a condition against its baseline with a CI. No scipy: the t quantile comes from the
regularised incomplete beta function (continued fraction, as in Numerical Recipes), which
also serves the fractional degrees of freedom of Welch's interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, may be fractional) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on t_cdf."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_ppf needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_critical(df: float, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value: t with P(|T| <= t) = confidence."""
    return t_ppf(0.5 + confidence / 2.0, df)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample std (n - 1); None for n < 2
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else self.ci_high - self.mean

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci95": None if self.ci_low is None else [self.ci_low, self.ci_high],
        }


def finite_number(v: object) -> bool:
    """Whether a value read from JSON is a finite int or float (a bool is no figure; nor is an
    int too large for a float, which JSON allows)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary | None:
    """Mean, sample std and the t confidence interval of the mean; None for no values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return None
    try:
        mean = math.fsum(xs) / n
    except OverflowError:  # two 1.7e308 sum past a float; their mean does not
        mean = math.fsum(x / n for x in xs)
    if n < 2:
        return Summary(n, mean, None, None, None)
    try:
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    except OverflowError:  # a spread no float holds: no CI
        return Summary(n, mean, None, None, None)
    half = t_critical(n - 1, confidence) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Delta:
    """(condition / baseline - 1) in percent, with its CI in percent (None if not estimable)."""

    pct: float
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict:
        return {
            "pct": self.pct,
            "ci95": None if self.ci_low is None else [self.ci_low, self.ci_high],
        }


def delta(
    values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> Delta | None:
    """Relative change of the mean of `values` against the mean of `baseline`.

    The CI is the delta method's for a ratio of two independent means,
    se(r) = r * sqrt(s_a^2 / (n_a m_a^2) + s_b^2 / (n_b m_b^2)), with Welch-Satterthwaite
    degrees of freedom; it needs at least two values on each side."""
    a, b = summarize(values, confidence), summarize(baseline, confidence)
    if a is None or b is None or b.mean == 0:
        return None
    r = a.mean / b.mean
    pct = (r - 1.0) * 100.0
    if a.std is None or b.std is None or a.mean == 0:
        return Delta(pct, None, None)
    # (std / mean)^2 / n, not std^2 / (n mean^2): a mean of 1e-300 squares to 0.
    va = (a.std / a.mean) ** 2 / a.n
    vb = (b.std / b.mean) ** 2 / b.n
    if not math.isfinite(va + vb):  # a spread no float holds: no CI
        return Delta(pct, None, None)
    if va + vb == 0:
        return Delta(pct, pct, pct)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = t_critical(df, confidence) * abs(r) * math.sqrt(va + vb) * 100.0
    return Delta(pct, pct - half, pct + half)
