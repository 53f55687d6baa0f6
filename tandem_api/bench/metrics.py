"""What one benchmark run measured: per-request records and the pinned per-rate summary.

Pure arithmetic (no I/O, no clock): the runner fills `RequestRecord`s, `summarize` turns
them into the `summary.json` object of one rate.

Definitions (also in docs/BENCHMARKS.md, "tandem bench"):

- Times of a request are seconds since the run started, on the client's monotonic clock.
  `send_s` is when the request left the client (after any `--max-concurrency` wait);
  `arrival_s` when the arrival process released it (equal to `send_s` without a cap).
- A stream arrives as chunks, each `(time, tokens)`. TTFT = first chunk - send; E2EL = last
  chunk - send. Every token has an arrival time (its chunk's).
- ITL is per token. A chunk of n tokens arriving `gap` seconds after the previous chunk gives
  n samples of gap / n: a multi-token chunk shares its gap among its tokens, none is dropped.
  The first chunk's tokens after the first arrived with it: they give samples of 0. So a
  request's ITL samples sum to E2EL - TTFT, and their mean is its TPOT.
- TPOT = (E2EL - TTFT) / (output tokens - 1), only for requests with 2+ output tokens.
- A request meets the SLO when it completed and every given target holds: `ttft_ms` (its TTFT),
  `tpot_ms` (its TPOT), `itl_ms` (the p99 of its own ITL samples), `e2el_ms` (its E2EL). A target
  that cannot be judged (TPOT or ITL of a one-token reply) holds. Failed requests never meet it.
- goodput = requests that met the SLO / duration; slo_attainment = those / all measured requests.
  With no SLO given every completed request meets it (goodput = request throughput).
- Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
PERCENTILES = (50, 90, 95, 99)
OK = "OK"


class SloError(ValueError):
    """A malformed --slo value."""


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,itl_ms=50` -> {"ttft_ms": 500.0, "itl_ms": 50.0}; SloError naming what is wrong."""
    if text is None or not text.strip():
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip()
        if not sep:
            raise SloError(f"--slo: {part.strip()!r} is not KEY=VALUE (e.g. ttft_ms=500,itl_ms=50)")
        if key not in SLO_KEYS:
            raise SloError(f"--slo: unknown target {key!r}; known: {', '.join(SLO_KEYS)}")
        if key in slo:
            raise SloError(f"--slo: {key} given twice")
        try:
            number = float(value)
        except ValueError:
            raise SloError(f"--slo: {key}={value.strip()!r} is not a number of milliseconds") from None
        if not math.isfinite(number) or number <= 0:
            raise SloError(f"--slo: {key} must be a positive number of milliseconds, got {value.strip()}")
        slo[key] = number
    return slo


def meets_targets(
    slo: Mapping[str, float], seconds: Mapping[str, float | None], keys: Sequence[str] = SLO_KEYS
) -> bool:
    """Every target of `slo` among `keys` holds for these latencies (seconds, by target name); a latency that
    cannot be judged (None, or not given) holds. The one rule `tandem bench` and the SLA planner judge by."""
    return all((v := seconds.get(k)) is None or v * 1000.0 <= target for k, target in slo.items() if k in keys)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default); None without values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std (population), p50, p90, p95, p99, max; every field None without values."""
    if not values:
        return {"mean": None, "std": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
        "max": max(values),
    }


@dataclass
class RequestRecord:
    """One request as the client saw it (and what the server reported about it)."""

    index: int
    request_id: str
    arrival_s: float
    send_s: float | None = None
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in the chunk)
    input_tokens: int = 0  # as the server counted them when it reports usage, else as sent
    expected_output_tokens: int = 0  # max_tokens asked for
    output_tokens: int | None = None  # the server's count when it reports usage, else the chunks' sum
    cached_tokens: int | None = None
    status: str = "PENDING"  # "OK", a gRPC status name, "HTTP_<code>", "CONNECTION_ERROR", ...
    error: str = ""
    route: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""
    server_timings: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    prefix_group: int | None = None
    conversation: int | None = None
    turn: int | None = None

    # -- derived -----------------------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.status == OK and bool(self.chunks)

    @property
    def n_output(self) -> int:
        return self.output_tokens if self.output_tokens is not None else sum(n for _, n in self.chunks)

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.send_s if self.chunks and self.send_s is not None else None

    @property
    def e2el_s(self) -> float | None:
        return self.chunks[-1][0] - self.send_s if self.chunks and self.send_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        n, e2el, ttft = self.n_output, self.e2el_s, self.ttft_s
        if not self.ok or n < 2 or e2el is None or ttft is None:
            return None
        return (e2el - ttft) / (n - 1)

    def itl_s(self) -> list[float]:
        """One sample per token after the first (see the module docstring)."""
        if not self.chunks:
            return []
        (t_prev, n_first), rest = self.chunks[0], self.chunks[1:]
        samples = [0.0] * max(n_first - 1, 0)
        for t, n in rest:
            if n > 0:
                samples.extend([(t - t_prev) / n] * n)
                t_prev = t
        return samples

    def token_times(self) -> list[float]:
        return [t for t, n in self.chunks for _ in range(n)]

    def meets(self, slo: Mapping[str, float]) -> bool:
        if not self.ok:
            return False
        checks = {
            "ttft_ms": self.ttft_s,
            "tpot_ms": self.tpot_s,
            "e2el_ms": self.e2el_s,
            "itl_ms": percentile(self.itl_s(), 99),
        }
        return meets_targets(slo, checks)

    def to_json(self) -> dict[str, Any]:
        """The requests.jsonl line: every token's arrival time and the derived latencies in ms."""
        doc = asdict(self)
        doc.pop("chunks")

        def ms(s: float | None) -> float | None:
            return None if s is None else s * 1000.0

        doc.update(
            first_token_s=self.chunks[0][0] if self.chunks else None,
            token_times_s=self.token_times(),
            chunk_tokens=[n for _, n in self.chunks],
            output_tokens=self.n_output,
            ttft_ms=ms(self.ttft_s),
            tpot_ms=ms(self.tpot_s),
            e2el_ms=ms(self.e2el_s),
            itl_ms=[s * 1000.0 for s in self.itl_s()],
        )
        return doc


def _ms(values: Iterable[float | None]) -> list[float]:
    return [v * 1000.0 for v in values if v is not None]


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Mapping[str, float]) -> dict[str, Any]:
    """The pinned per-rate object of summary.json (without `metadata`, which the caller adds)."""
    done = [r for r in records if r.ok]
    failed = Counter(r.status if r.status != OK else "EMPTY_STREAM" for r in records if not r.ok)
    met = sum(r.meets(slo) for r in records)
    duration = max(duration_s, 1e-9)
    out_tokens = sum(r.n_output for r in done)
    in_tokens = sum(r.input_tokens for r in done)
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": dict(sorted(failed.items())),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "goodput": met / duration,
        "slo_attainment": met / len(records) if records else None,
        "slo": dict(slo),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "cached_tokens": sum(cached) if cached else None,
        "ttft_ms": distribution(_ms(r.ttft_s for r in done)),
        "tpot_ms": distribution(_ms(r.tpot_s for r in done)),
        "itl_ms": distribution(_ms(s for r in done for s in r.itl_s())),
        "e2el_ms": distribution(_ms(r.e2el_s for r in done)),
        "ttft_breakdown_ms": ttft_breakdown(done),
    }


def ttft_breakdown(done: Sequence[RequestRecord]) -> dict[str, float] | None:
    """Mean TTFT split by what the server reports (tandem.v1 timings), in ms; None if it reports none.

    router_queue: receipt -> first worker call (admission, validation, routing);
    prefill: the prefill worker's queueing and compute; server_other: the rest of the server's
    TTFT (Ray calls, handing token 1 back); client_network: client TTFT - server TTFT.
    """
    rows = [r for r in done if "time_to_first_token_s" in r.server_timings]
    if not rows:
        return None
    parts = {"router_queue": 0.0, "prefill": 0.0, "server_other": 0.0, "client_network": 0.0}
    for r in rows:
        t = r.server_timings
        server = t["time_to_first_token_s"]
        queue, prefill = t.get("queue_s", 0.0), min(t.get("prefill_s", 0.0), server)
        parts["router_queue"] += queue
        parts["prefill"] += prefill
        parts["server_other"] += max(server - queue - prefill, 0.0)
        parts["client_network"] += max((r.ttft_s or 0.0) - server, 0.0)
    return {k: v * 1000.0 / len(rows) for k, v in parts.items()}
