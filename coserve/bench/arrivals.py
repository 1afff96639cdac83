"""When open-loop requests are sent: a seeded schedule of arrival times.

Inter-arrival gaps are drawn from a gamma distribution of shape `burstiness` and mean
1 / rate, as `vllm bench serve` does: shape 1 is a Poisson process (exponential gaps,
coefficient of variation 1), a shape below 1 is burstier (CV = 1 / sqrt(shape)), above 1
more regular. "constant" sends exactly every 1 / rate seconds. The schedule is absolute
(offsets from the load's start, the running sum of the gaps), so a sender that is late for
one arrival catches up on the next instead of shifting every later one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ARRIVALS", "arrival_offsets"]

ARRIVALS = ("poisson", "constant")
_BLOCK = 4096


def arrival_offsets(
    rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0, stream: int = 0
) -> Iterator[float]:
    """Endless offsets in seconds (0 first, increasing) of the arrivals of `rate` requests/s.
    The same (seed, stream) gives the same schedule; each endpoint uses its own stream.
    Raises ValueError for a rate or shape that is not a positive finite number, or an
    unknown `arrival`."""
    if not (isinstance(rate, (int, float)) and 0 < rate < float("inf")):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate!r}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if not (isinstance(burstiness, (int, float)) and 0 < burstiness < float("inf")):
        raise ValueError(f"burstiness must be a positive number, got {burstiness!r}")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, stream])
    base = 0.0
    k = 0
    while True:
        if arrival == "constant":
            # k / rate rather than a running sum: no rounding drift over millions of arrivals
            offsets = (np.arange(k, k + _BLOCK, dtype=np.float64) / rate).tolist()
            k += _BLOCK
        else:
            gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), _BLOCK)
            ends = base + np.cumsum(gaps)  # the arrivals after each of this block's
            offsets = [base, *ends[:-1].tolist()]
            base = float(ends[-1])
        yield from offsets
