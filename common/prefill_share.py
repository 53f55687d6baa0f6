"""TTFT first: how a step's token budget is shared between the prompts waiting to be prefilled, and which
waiting prompt goes first under a TTFT target.

The engine's scheduler (engine/scheduler.py) and the simulator's (planner/sim_worker.py) both use it, so the
simulated worker orders prefills as the real one does.

Filling the budget with every waiting prompt makes each of them wait for the whole batch: on a CPU, where
a step's time grows with its prompt tokens from a few dozen tokens on, three 500-token prompts arriving
together all see their first token after the third is computed. With `join_tokens` set, a step prefills
its oldest prompt (up to the budget: a long prompt is chunked as before) and a later prompt joins that
step only whole and while the step's prompt tokens stay within `join_tokens`; the first prompt refused
closes the step to the prompts behind it (first come, first served). Every prompt then gets its first
token no later than in the filled step, less the few batched tokens' saving: what a step costs beyond its
tokens (one pass over the weights) is shared only by prompts short enough that it dominates them.
`join_tokens` None keeps the filled budget (throughput first).

`meetable_first` orders the waiting prompts under a TTFT target (SLO triage).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PrefillShare:
    """One step's prompt tokens, handed out oldest prompt first (see the module docstring)."""

    __slots__ = ("join_tokens", "_room", "_closed")

    def __init__(self, join_tokens: int | None) -> None:
        self.join_tokens = join_tokens
        self._room: int | None = None  # prompt tokens later prompts may still add (None: no prompt yet)
        self._closed = False

    def take(self, left: int, budget: int) -> int:
        """Prompt tokens a prefill with `left` tokens to compute gets this step, `budget` tokens being left in
        it; 0: it waits for a later step (so does every prompt behind it)."""
        if self.join_tokens is None:
            return min(left, budget)
        if self._closed:
            return 0
        if self._room is None:
            n = min(left, budget)
            self._room = max(0, self.join_tokens - n)
            return n
        if left <= min(self._room, budget):
            self._room -= left
            return left
        self._closed = True
        return 0


OVERDUE_TARGETS = 4.0  # SLO triage: a request waiting this many TTFT targets goes first again, lost or not


def hopeless(waited_s: float, compute_s: float, ttft_target_s: float) -> bool:
    """SLO triage: a request without its first token that, started now, would miss its TTFT target (having
    waited `waited_s`, with `compute_s` of prefill left), unless it has waited OVERDUE_TARGETS targets: then
    it is served in its turn again, so that overload delays a lost request, never starves it."""
    return ttft_target_s > 0 and ttft_target_s < waited_s + compute_s and waited_s <= OVERDUE_TARGETS * ttft_target_s


def meetable_first(waiting: deque[T], lost: Callable[[T], bool]) -> None:
    """SLO triage: move the first waiting request that is not `lost` (see `hopeless`) to the front; the order
    stays when the first is not lost or all are. Under overload first come, first served makes every request
    wait for the backlog and miss; serving those that can still make it first keeps them within the target,
    and the lost ones run when nothing that can make it waits, or when overdue. A request that has its first
    token is never lost: its TTFT is settled."""
    for i, req in enumerate(waiting):
        if not lost(req):
            if i:
                del waiting[i]
                waiting.appendleft(req)
            return
