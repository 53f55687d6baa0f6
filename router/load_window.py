"""What the router saw recently, for the SLA planner (deploy/planner_loop.py): arrivals and ended requests.

The request path notes each admitted request (`arrived`) and `RouterMetrics.observe_request` each ended
one (`ended`), on the router's clock. `since(t0)` returns what happened after t0. Entries older than
`horizon_s` are dropped as new ones come, so memory stays bounded under any load.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.responses import RequestTrace


@dataclass(frozen=True)
class EndedRequest:
    ended: float  # router clock
    ok: bool  # finished with tokens, no error
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float | None
    tpot_s: float | None  # mean time per output token after the first
    itl_p99_s: float | None  # the request's own 99th-percentile inter-token gap


class LoadWindow:
    def __init__(self, horizon_s: float = 900.0) -> None:
        self.horizon_s = horizon_s
        self._arrivals: deque[float] = deque()
        self._ended: deque[EndedRequest] = deque()

    def arrived(self, t: float) -> None:
        self._arrivals.append(t)
        while self._arrivals and self._arrivals[0] < t - self.horizon_s:
            self._arrivals.popleft()

    def ended(self, trace: RequestTrace, code: str, now: float) -> None:
        ttft = tpot = itl = None
        if trace.first_sent is not None:
            ttft = trace.first_sent - trace.received
            if trace.completion_tokens > 1 and trace.last_sent is not None:
                tpot = (trace.last_sent - trace.first_sent) / (trace.completion_tokens - 1)
            itl = _p99_per_token(trace.token_gaps)
        self._ended.append(
            EndedRequest(
                now,
                code == "OK" and trace.first_sent is not None,
                trace.prompt_tokens,
                trace.completion_tokens,
                trace.cached_tokens,
                ttft,
                tpot,
                itl,
            )
        )
        while self._ended and self._ended[0].ended < now - self.horizon_s:
            self._ended.popleft()

    def since(self, t0: float) -> tuple[int, list[EndedRequest]]:
        """(requests admitted after t0, requests that ended after t0)."""
        return sum(1 for t in self._arrivals if t > t0), [e for e in self._ended if e.ended > t0]


def _p99_per_token(gaps: list[tuple[float, int]]) -> float | None:
    """The 99th-percentile inter-token time (nearest rank) of chunks `(seconds since the last, tokens)`, each
    token of a chunk counted at gap / tokens, without expanding the chunks into one entry per token."""
    per_token = sorted((gap / n, n) for gap, n in gaps if n > 0)
    total = sum(n for _, n in per_token)
    if not total:
        return None
    rank = min(total - 1, int(0.99 * (total - 1) + 0.5))
    seen = 0
    for value, n in per_token:
        seen += n
        if seen > rank:
            return value
    return per_token[-1][0]
