"""A worker's performance model, measured from its own engine steps while it serves.

    decode step (no prefill in it):  t = base + per_seq * sequences
    a step with prefill:             t = base + per_seq * sequences + per_token * prefill tokens

`StepTimes.observe(prefill_tokens, decode_seqs, seconds)` after every step. The decode line is a
least-squares fit with exponential forgetting (recent steps weigh more: a worker's speed changes
with what else runs on the machine); `per_token` is an exponentially weighted mean of
(t - decode line) / prefill tokens over steps with at least `min_prefill_tokens`. The first
`warmup_steps` steps are ignored (allocation, first-touch page faults), and the model says
`ready` only once it has seen both kinds of step.

`prefill_busy` is the share of the last `window_s` seconds the engine spent in steps that computed
prompt tokens: a decode sequence on this worker waits that share of the time behind prefills, so
its time per output token is about decode_step / (1 - prefill_busy).

Pure and torch-free: the worker's engine thread feeds it; the router reads `PerfEstimate` from the
worker's status and predicts TTFT (queued + uncached tokens at per_token) and ITL (the decode line
at the batch the request would join).
"""

from __future__ import annotations

from collections import deque

import msgspec


class PerfEstimate(msgspec.Struct, frozen=True):
    """The model as a worker reports it (seconds). `ready` False: too few steps; do not trust the numbers."""

    ready: bool = False
    base_s: float = 0.0
    per_seq_s: float = 0.0
    per_token_s: float = 0.0
    decode_steps: int = 0
    prefill_steps: int = 0
    prefill_busy: float = 0.0  # share of the recent window spent in steps with prompt tokens

    def tpot_s(self, sequences: int) -> float:
        """Expected time per output token of a request joining a batch of `sequences` (itself included)."""
        return self.decode_step_s(sequences) / max(1.0 - self.prefill_busy, 0.05)

    def decode_step_s(self, sequences: int) -> float:
        return self.base_s + self.per_seq_s * max(sequences, 1)

    def prefill_s(self, tokens: int, decoding: int = 0) -> float:
        """One step computing `tokens` prompt tokens beside `decoding` decode sequences."""
        return self.decode_step_s(decoding) + self.per_token_s * tokens


class StepTimes:
    def __init__(self, decay: float = 0.98, warmup_steps: int = 8, min_prefill_tokens: int = 16,
                 window_s: float = 30.0) -> None:
        self.decay = decay
        self.window_s = window_s
        self._busy: deque[tuple[float, float]] = deque()  # (end time, seconds) of recent prefill steps
        self._first: float | None = None
        self.warmup_steps = warmup_steps
        self.min_prefill_tokens = min_prefill_tokens
        self.steps = 0
        self.decode_steps = 0
        self.prefill_steps = 0
        # weighted sums for the decode line y = a + b x
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._per_token = 0.0

    def observe(self, prefill_tokens: int, decode_seqs: int, seconds: float, now: float | None = None) -> None:
        """One step's shape and duration; `now` (its end, monotonic seconds) feeds prefill_busy."""
        if now is not None:
            if self._first is None:
                self._first = now - seconds
            if prefill_tokens > 0:
                self._busy.append((now, seconds))
        self.steps += 1
        if self.steps <= self.warmup_steps or seconds <= 0:
            return
        if prefill_tokens == 0:
            if decode_seqs <= 0:
                return
            d = self.decay
            x, y = float(decode_seqs), seconds
            self._w = d * self._w + 1.0
            self._x = d * self._x + x
            self._y = d * self._y + y
            self._xx = d * self._xx + x * x
            self._xy = d * self._xy + x * y
            self.decode_steps += 1
            return
        if prefill_tokens < self.min_prefill_tokens:
            return
        base, per_seq = self._line()
        sample = max(seconds - (base + per_seq * decode_seqs if self.decode_steps else 0.0), 0.0) / prefill_tokens
        alpha = 0.2 if self.prefill_steps else 1.0
        self._per_token += alpha * (sample - self._per_token)
        self.prefill_steps += 1

    def _line(self) -> tuple[float, float]:
        if self._w <= 0:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var <= 1e-12:  # one batch size seen: all of it is the base
            return mean_y, 0.0
        slope = (self._xy / self._w - mean_x * mean_y) / var
        slope = max(slope, 0.0)
        return max(mean_y - slope * mean_x, 0.0), slope

    def busy(self, now: float) -> float:
        while self._busy and self._busy[0][0] < now - self.window_s:
            self._busy.popleft()
        if self._first is None:
            return 0.0
        span = min(self.window_s, max(now - self._first, 1e-3))
        return min(1.0, sum(sec for _, sec in self._busy) / span)

    def estimate(self, now: float | None = None) -> PerfEstimate:
        base, per_seq = self._line()
        return PerfEstimate(ready=self.decode_steps >= 4 and self.prefill_steps >= 2, base_s=base, per_seq_s=per_seq,
                            per_token_s=self._per_token, decode_steps=self.decode_steps,
                            prefill_steps=self.prefill_steps,
                            prefill_busy=self.busy(now) if now is not None else 0.0)
