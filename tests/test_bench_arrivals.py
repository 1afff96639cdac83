"""The open-loop arrival schedule, checked for its statistics directly (no server): over a
30 s window the count is within 3 % of rate x 30, Poisson gaps have the right mean and a
coefficient of variation of 1, constant ones none, and burstiness shapes them as vLLM's."""

import itertools

import numpy as np
import pytest

from coserve.bench.arrivals import arrival_offsets


def _window(rate, arrival, burstiness=1.0, seed=0, stream=1, window_s=30.0):
    out = []
    for t in arrival_offsets(rate, arrival, burstiness, seed, stream):
        if t >= window_s:
            return np.array(out)
        out.append(t)


@pytest.mark.parametrize("rate", [200.0, 2000.0])  # 6,000+ arrivals: 3 % is over 2 sigma
def test_poisson_over_a_30_s_window(rate):
    t = _window(rate, "poisson")
    gaps = np.diff(t)
    assert abs(len(t) - rate * 30) <= 0.03 * rate * 30, len(t)
    assert abs(gaps.mean() - 1 / rate) <= 0.03 / rate, gaps.mean()
    assert abs(gaps.std() / gaps.mean() - 1.0) <= 0.1


@pytest.mark.parametrize("rate", [7.5, 2000.0])
def test_constant_over_a_30_s_window(rate):
    t = _window(rate, "constant")
    gaps = np.diff(t)
    assert abs(len(t) - rate * 30) <= 1
    assert gaps.std() / gaps.mean() < 0.05
    assert t[0] == 0.0 and abs(t[-1] - (len(t) - 1) / rate) < 1e-9  # no drift


@pytest.mark.parametrize("shape", [0.25, 4.0])
def test_burstiness_is_the_gamma_shape(shape):
    gaps = np.diff(_window(500.0, "poisson", burstiness=shape))
    assert abs(gaps.mean() - 1 / 500) <= 0.03 / 500
    assert abs(gaps.std() / gaps.mean() - 1 / np.sqrt(shape)) <= 0.1 / np.sqrt(shape)


def test_seeded_and_one_stream_per_endpoint():
    first = list(itertools.islice(arrival_offsets(100.0, seed=3, stream=1), 5000))
    assert first == list(itertools.islice(arrival_offsets(100.0, seed=3, stream=1), 5000))
    assert first != list(itertools.islice(arrival_offsets(100.0, seed=4, stream=1), 5000))
    assert first != list(itertools.islice(arrival_offsets(100.0, seed=3, stream=2), 5000))
    assert all(b > a for a, b in zip(first, first[1:], strict=False))  # across blocks too


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"rate": 0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        # rate x shape underflowed to 0: a ZeroDivisionError traceback out of coserve bench
        ({"rate": 4e-324, "burstiness": 1e-3}, "rate"),
        ({"rate": 1, "arrival": "uniform"}, "arrival"),
        ({"rate": 1, "burstiness": -1}, "burstiness"),
    ],
)
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        next(arrival_offsets(**kw))
