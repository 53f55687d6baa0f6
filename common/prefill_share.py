"""TTFT first: how a step's token budget is shared between the prompts waiting to be prefilled.

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
"""

from __future__ import annotations


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
