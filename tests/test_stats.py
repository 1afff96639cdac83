"""Statistics without scipy: t quantiles, CIs and deltas against known values."""

from __future__ import annotations

import math
import random

import pytest

from coserve.stats import delta, summarize, t_cdf, t_critical, t_ppf

# Two-sided 95 % critical values of Student's t (any statistics table).
TABLE = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    9: 2.262,
    10: 2.228,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
    100000: 1.960,
}


@pytest.mark.parametrize("df, value", TABLE.items())
def test_t_critical_matches_the_table(df, value):
    assert t_critical(df) == pytest.approx(value, abs=6e-4)


def test_t_quantiles_and_cdf():
    assert t_ppf(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert t_ppf(0.025, 3) == pytest.approx(-3.182446, abs=1e-5)
    assert t_ppf(0.995, 1) == pytest.approx(63.656741, rel=1e-6)  # tan(pi * 0.495)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2.0 / (2 * math.sqrt(6)))
    assert t_critical(4.5) == pytest.approx(2.658912, abs=1e-5)  # fractional df (Welch)


def test_summary_of_the_studys_ab_reps():
    s = summarize([24101, 24533, 24247])
    assert s.n == 3 and s.mean == pytest.approx(24293.667, abs=1e-3)
    assert s.std == pytest.approx(219.748, abs=1e-3)
    half = 4.302653 * 219.748 / math.sqrt(3)
    assert s.ci_low == pytest.approx(s.mean - half, abs=1e-2)
    assert s.ci_high == pytest.approx(s.mean + half, abs=1e-2)


def test_single_value_and_empty():
    s = summarize([5.0])
    assert (s.n, s.mean, s.std, s.ci_low) == (1, 5.0, None, None)
    assert summarize([]) is None
    assert summarize([None, float("nan"), 2.0]).n == 1


def test_delta_against_baseline():
    d = delta([22956, 22881, 23173], [24101, 24533, 24247])  # the study's MPS vs time-sliced
    assert d.pct == pytest.approx((23003.333 / 24293.667 - 1) * 100, abs=1e-3)
    assert d.ci_low < d.pct < d.ci_high < 0  # a clearly negative change
    one = delta([1.0], [2.0])
    assert one.pct == pytest.approx(-50) and one.ci_low is None
    assert delta([1.0, 2.0], [0.0, 0.0]) is None
    assert delta([], [1.0]) is None


def test_ci_covers_the_true_mean_about_95_percent():
    rng = random.Random(1)
    hits = 0
    for _ in range(2000):
        s = summarize([rng.gauss(10.0, 2.0) for _ in range(4)])
        hits += s.ci_low <= 10.0 <= s.ci_high
    assert 0.93 < hits / 2000 < 0.97


def test_delta_ci_covers_the_true_ratio():
    rng = random.Random(2)
    hits = 0
    for _ in range(1000):
        a = [rng.gauss(95.0, 2.0) for _ in range(3)]
        b = [rng.gauss(100.0, 2.0) for _ in range(3)]
        d = delta(a, b)
        hits += d.ci_low <= -5.0 <= d.ci_high
    assert hits / 1000 > 0.92


def test_delta_of_a_vanishing_mean_has_no_division_by_zero():
    d = delta([1e-300] * 3, [990.0, 1000.0, 1010.0])  # 1e-300 squared underflows to 0
    assert (d.pct, d.ci_low, d.ci_high) == pytest.approx((-100.0, -100.0, -100.0))


def test_summary_of_figures_near_the_float_limit_overflows_nothing():
    s = summarize([1.7e308, 1.7e308])  # their sum is past a float
    assert s.mean == 1.7e308 and s.std == 0
    wide = summarize([1.7e308, -1.7e308])  # so is their spread
    assert wide.mean == 0 and wide.std is None and wide.ci_low is None
