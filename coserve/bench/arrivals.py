"""When open-loop requests are sent: a seeded schedule of arrival times.

Inter-arrival gaps are drawn from a gamma distribution of shape `burstiness` and mean
1 / rate, as `vllm bench serve` does: shape 1 is a Poisson process (exponential gaps,
coefficient of variation 1), a shape below 1 is burstier (CV = 1 / sqrt(shape)), above 1
more regular. "constant" sends exactly every 1 / rate seconds. The schedule is absolute
(offsets from the load's start, the running sum of the gaps), so a sender that is late for
one arrival catches up on the next instead of shifting every later one.

The schedule is drawn lazily, a block at a time. Rates and shapes are bounded: above
MAX_RATE one client process cannot send (each request costs it tens of microseconds), below
MIN_RATE (about one a day) there is no load to speak of and the mean gap overflows, and a
shape outside [MIN_BURSTINESS, MAX_BURSTINESS] makes most gaps round to zero (the arrivals
pile up on one instant, then nothing for a long time), which is no longer a load shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "ARRIVALS",
    "MAX_BURSTINESS",
    "MAX_RATE",
    "MIN_BURSTINESS",
    "MIN_RATE",
    "arrival_offsets",
    "count_arrivals",
]

ARRIVALS = ("poisson", "constant")
MAX_RATE = 100_000.0  # requests/s
MIN_RATE = 1e-5  # requests/s
MIN_BURSTINESS, MAX_BURSTINESS = 1e-3, 1e3
_BLOCK = 4096


def _blocks(
    rate: float, arrival: str, burstiness: float, seed: int, stream: int
) -> Iterator[np.ndarray]:
    """The schedule in blocks of _BLOCK offsets; the arguments checked at the call."""
    if not (isinstance(rate, (int, float)) and MIN_RATE <= rate <= MAX_RATE):
        raise ValueError(
            f"rate must be a number of requests/s in [{MIN_RATE:g}, {MAX_RATE:g}], got {rate!r}"
        )
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if not (
        isinstance(burstiness, (int, float)) and MIN_BURSTINESS <= burstiness <= MAX_BURSTINESS
    ):
        raise ValueError(
            f"burstiness must be a number in [{MIN_BURSTINESS:g}, {MAX_BURSTINESS:g}], "
            f"got {burstiness!r}"
        )
    return _draw(rate, arrival, burstiness, np.random.default_rng([seed & 0xFFFFFFFF, stream]))


def _draw(rate: float, arrival: str, burstiness: float, rng) -> Iterator[np.ndarray]:
    base = 0.0
    k = 0
    while True:
        if arrival == "constant":
            # k / rate rather than a running sum: no rounding drift over millions of arrivals
            yield np.arange(k, k + _BLOCK, dtype=np.float64) / rate
            k += _BLOCK
        else:
            gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), _BLOCK)
            ends = base + np.cumsum(gaps)  # the arrivals after each of this block's
            yield np.concatenate(([base], ends[:-1]))
            base = float(ends[-1])


def arrival_offsets(
    rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0, stream: int = 0
) -> Iterator[float]:
    """Endless offsets in seconds (0 first, increasing) of the arrivals of `rate` requests/s.
    The same (seed, stream) gives the same schedule; each endpoint uses its own stream.
    Raises ValueError for a rate outside [MIN_RATE, MAX_RATE], a shape outside [MIN_BURSTINESS,
    MAX_BURSTINESS], or an unknown `arrival`."""
    blocks = _blocks(rate, arrival, burstiness, seed, stream)
    return (off for block in blocks for off in block.tolist())


def count_arrivals(
    rate: float, arrival: str, burstiness: float, seed: int, stream: int, lo: float, hi: float
) -> int:
    """How many of `arrival_offsets(...)` fall in [lo, hi) seconds; a block at a time, so
    MAX_RATE over an hour is some 90 thousand vector steps. Raises as arrival_offsets."""
    n = 0
    for block in _blocks(rate, arrival, burstiness, seed, stream):
        n += int(np.searchsorted(block, hi, "left") - np.searchsorted(block, lo, "left"))
        if block[-1] >= hi:
            return n
    raise AssertionError("unreachable: the schedule is endless")  # pragma: no cover
