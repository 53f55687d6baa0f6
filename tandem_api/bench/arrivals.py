"""Arrival processes: when each request (or conversation) is released, in seconds from the start.

- `rate = inf`: everything at t = 0 (the run is then paced only by --max-concurrency).
- otherwise gamma-distributed gaps with shape `burstiness` and mean 1 / rate: burstiness 1 is a
  Poisson process, below 1 burstier (clumps and lulls, same mean), above 1 more regular.
- `trace_times`: a trace's own timestamps from its first, optionally rescaled to a mean rate.

The same seed gives the same times (random.Random, no global state).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence


def parse_rates(text: str) -> list[float]:
    """`0.2,0.4,inf` -> [0.2, 0.4, inf]; ValueError naming --request-rate."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number (requests per second, or inf)") from None
        if math.isnan(rate) or rate <= 0:
            raise ValueError(f"--request-rate: {part} must be positive (or inf: every request at once)")
        rates.append(rate)
    if not rates:
        raise ValueError("--request-rate: give at least one rate")
    return rates


def gamma_arrivals(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless arrival times: the first at 0, then gaps ~ Gamma(burstiness, 1 / (rate * burstiness))."""
    if burstiness <= 0 or not math.isfinite(burstiness):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {rate}")
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    t = 0.0
    while True:
        yield t
        t += rng.gammavariate(burstiness, theta)


def trace_times(timestamps: Sequence[float], rate: float | None = None) -> list[float]:
    """A trace's timestamps from its first; with `rate`, scaled so the mean rate is `rate`."""
    if not timestamps:
        return []
    t0 = timestamps[0]
    times = [t - t0 for t in timestamps]
    span = times[-1]
    if rate is None or len(times) < 2 or span <= 0:
        return [0.0] * len(times) if rate is not None and math.isinf(rate) else times
    if math.isinf(rate):
        return [0.0] * len(times)
    scale = (len(times) - 1) / (rate * span)  # (n - 1) gaps over the span -> mean gap 1 / rate
    return [t * scale for t in times]
