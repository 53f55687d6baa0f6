"""Placement by SLO: remote, local on D, or the whole request on a prefill worker, from the workers'
measured step times (common/perf_model.py). `Router._place` builds the options; this module chooses.

The pools are the operator's statement of intent, so the intent (remote) stands unless it is predicted to
miss a target; the router then crosses the pools only for an option predicted to meet both targets with a
margin (SLO_MARGIN) without taking more than STALL_SAFETY of the slack the decode worker's running requests
have left. When nothing is predicted to meet them (overload), the intent stands: a local prefill there
would stall every decode for a request that misses anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# the default targets (`tandem serve`, `tandem simulate`): loose, so the router leaves the pools' intent only
# to rescue a request predicted to miss them
DEFAULT_SLO_TTFT_MS = 4000.0
DEFAULT_SLO_ITL_MS = 200.0
REMAINING_TOKENS = 64  # placement by SLO: output tokens a running request is assumed to have left
SLO_MARGIN = 0.8  # cross the pools only for an option predicted within this share of both targets
STALL_SAFETY = 0.5  # ... and whose prefill stalls the decode worker for at most this share of its requests' slack


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
    slack_s: the smallest TPOT slack of the requests running where the option prefills beside them, as
    that worker last reported it (WorkerStatus.tpot_slack_s); None when it does not report one.
    """

    kind: str
    worker_id: str
    ttft_s: float
    tpot_s: float
    stall_s: float = 0.0
    stalled: int = 0
    slack_s: float | None = None

    def meets(self, ttft_target: float, tpot_target: float, margin: float = SLO_MARGIN) -> bool:
        """Predicted within `margin` of both targets, its stall included: within STALL_SAFETY of the running
        requests' reported slack, or (no report) spread over their REMAINING_TOKENS within the TPOT target."""
        if ttft_target and self.ttft_s > margin * ttft_target:
            return False
        if not tpot_target:
            return True
        if self.tpot_s > margin * tpot_target:
            return False
        if not (self.stalled and self.stall_s):
            return True
        if self.slack_s is not None:
            return self.stall_s <= STALL_SAFETY * self.slack_s
        return self.tpot_s + self.stall_s / REMAINING_TOKENS <= margin * tpot_target

    def score(self, ttft_target: float, tpot_target: float) -> float:
        r = self.ttft_s / ttft_target if ttft_target else 0.0
        t = self.tpot_s / tpot_target if tpot_target else 0.0
        harm = self.stalled * self.stall_s / (REMAINING_TOKENS * tpot_target) if tpot_target else 0.0
        return r + t + harm + 10.0 * max(0.0, max(r, t) - 1.0)

    def describe(self, ttft_target: float, tpot_target: float) -> str:
        stall = f", stalls {self.stalled} for {self.stall_s * 1000:.0f} ms" if self.stalled and self.stall_s else ""
        if stall and self.slack_s is not None:
            stall += f" of {self.slack_s * 1000:.0f} ms slack"
        return (
            f"{self.kind} on {self.worker_id}: TTFT {self.ttft_s * 1000:.0f} ms, TPOT {self.tpot_s * 1000:.0f} ms"
            f"{stall} = {self.score(ttft_target, tpot_target):.2f}"
        )


def place_by_slo(options: Sequence[PlacementOption], ttft_target: float, tpot_target: float) -> PlacementOption:
    """The first option (the pools' intent) while it meets the targets; else the lowest-scoring other option
    that meets them; else, when none does, the intent (see the module docstring)."""
    intent, *others = options
    if intent.meets(ttft_target, tpot_target):
        return intent
    rescue = [o for o in others if o.meets(ttft_target, tpot_target)]
    return min(rescue, key=lambda o: o.score(ttft_target, tpot_target)) if rescue else intent
