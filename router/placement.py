"""Placement by SLO: remote, local on D, or the whole request on a prefill worker, from the workers'
measured step times (common/perf_model.py). `Router._place` builds the options; this module scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

REMAINING_TOKENS = 64  # placement by SLO: output tokens a running request is assumed to have left


@dataclass(frozen=True)
class PlacementOption:
    """One way to run a request, as placement by SLO predicts it from the workers' performance models.

    kind: "remote" (prefill on P, decode on D), "local" (all on D), "whole" (all on P).
    ttft_s = the worker's prefill line at (queued + uncached tokens), plus per_seq for each request decoding
    beside it (local: on D; whole: on P);
    tpot_s = the decode worker's step at its batch + 1, over (1 - its prefill-busy share);
    stall_s: the prefill this option puts beside `stalled` requests already decoding on that worker
    (local only: remote and whole both prefill on P). With r = ttft / its target and t = tpot / its target,
    score = r + t + stalled * stall_s / (REMAINING_TOKENS * tpot target) + 10 * max(0, max(r, t) - 1):
    the slack left on both targets, the TPOT taken from the others, and a steep price for a missed target.
    The lowest score wins; ties keep the order remote, whole, local.
    """

    kind: str
    worker_id: str
    ttft_s: float
    tpot_s: float
    stall_s: float = 0.0
    stalled: int = 0

    def score(self, ttft_target: float, tpot_target: float) -> float:
        r = self.ttft_s / ttft_target if ttft_target else 0.0
        t = self.tpot_s / tpot_target if tpot_target else 0.0
        harm = self.stalled * self.stall_s / (REMAINING_TOKENS * tpot_target) if tpot_target else 0.0
        return r + t + harm + 10.0 * max(0.0, max(r, t) - 1.0)

    def describe(self, ttft_target: float, tpot_target: float) -> str:
        stall = f", stalls {self.stalled} for {self.stall_s * 1000:.0f} ms" if self.stalled and self.stall_s else ""
        return (
            f"{self.kind} on {self.worker_id}: TTFT {self.ttft_s * 1000:.0f} ms, TPOT {self.tpot_s * 1000:.0f} ms"
            f"{stall} = {self.score(ttft_target, tpot_target):.2f}"
        )


def place_by_slo(options: Sequence[PlacementOption], ttft_target: float, tpot_target: float) -> PlacementOption:
    """The option with the lowest score (see PlacementOption); the first on ties."""
    return min(options, key=lambda o: o.score(ttft_target, tpot_target))
