"""A worker's performance model, measured from its own engine steps while it serves.

    a decode step (no prompt tokens):   t = decode_base + per_seq * sequences
    a prefill step:                     t = prefill_base + per_token * prompt tokens (+ the decode line's
                                        per_seq * sequences when decode sequences share the step)

`StepTimes.observe(prefill_tokens, decode_seqs, seconds, now, widened)` after every step. Each line is a
least-squares fit with exponential forgetting (recent steps weigh more: a worker's speed changes
with what else runs on the machine). The first `warmup_steps` steps are ignored (allocation,
first-touch page faults), and so are prefill steps of fewer than `min_prefill_tokens` tokens and
steps that ran `widened` on cores a peer left idle or lent (worker_core/core_share.py): the lines are
the worker's speed on its own cores, which is all a prediction can count on (a lender may be busy).
A line is `ready` after a few steps of its kind; a prefill worker in a disaggregated pool never
decodes and a decode worker may never prefill, so `PerfEstimate.completed_by` lends the missing
line from another worker of the same model.

`prefill_busy` is the share of the last `window_s` seconds the engine spent in steps that computed
prompt tokens: a decode sequence on this worker waits that share of the time behind prefills, so
its time per output token is about decode_step / (1 - prefill_busy).

Torch-free: the worker's engine thread feeds it while its event loop reads `estimate()` for a status
reply (a lock keeps the two apart), and the router predicts TTFT and TPOT from the `PerfEstimate` it
gets (router/routing.py, placement by SLO).
"""

from __future__ import annotations

import threading
from collections import deque

import msgspec

MIN_DECODE_STEPS = 4
MIN_PREFILL_STEPS = 2


class PerfEstimate(msgspec.Struct, frozen=True):
    """The model as a worker reports it (seconds)."""

    decode_base_s: float = 0.0
    per_seq_s: float = 0.0
    prefill_base_s: float = 0.0
    per_token_s: float = 0.0
    decode_steps: int = 0
    prefill_steps: int = 0
    prefill_busy: float = 0.0  # share of the recent window spent in steps with prompt tokens

    @property
    def decode_ready(self) -> bool:
        return self.decode_steps >= MIN_DECODE_STEPS

    @property
    def prefill_ready(self) -> bool:
        return self.prefill_steps >= MIN_PREFILL_STEPS

    @property
    def ready(self) -> bool:
        return self.decode_ready and self.prefill_ready

    def decode_step_s(self, sequences: int) -> float:
        return self.decode_base_s + self.per_seq_s * max(sequences, 1)

    def prefill_s(self, tokens: int) -> float:
        """One step computing `tokens` prompt tokens."""
        return self.prefill_base_s + self.per_token_s * tokens

    def tpot_s(self, sequences: int) -> float:
        """Expected time per output token of a request joining a batch of `sequences` (itself included)."""
        return self.decode_step_s(sequences) / max(1.0 - self.prefill_busy, 0.05)

    def completed_by(self, other: PerfEstimate) -> PerfEstimate:
        """This worker's model with the line it has not measured taken from `other` (same model)."""
        mine = self
        if not mine.decode_ready and other.decode_ready:
            mine = msgspec.structs.replace(
                mine, decode_base_s=other.decode_base_s, per_seq_s=other.per_seq_s, decode_steps=other.decode_steps
            )
        if not mine.prefill_ready and other.prefill_ready:
            mine = msgspec.structs.replace(
                mine,
                prefill_base_s=other.prefill_base_s,
                per_token_s=other.per_token_s,
                prefill_steps=other.prefill_steps,
            )
        return mine


class _Line:
    """Weighted least squares y = a + b x with exponential forgetting; b >= 0, a >= 0."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.n = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self.n += 1

    def fit(self) -> tuple[float, float]:
        if self._w <= 0:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var <= 1e-9 * max(mean_x * mean_x, 1.0):  # one x seen: no evidence of a slope, all of it is base
            return mean_y, 0.0
        slope = max((self._xy / self._w - mean_x * mean_y) / var, 0.0)
        base = mean_y - slope * mean_x
        if base < 0:  # through the origin instead
            return 0.0, (self._xy / self._w) / (self._xx / self._w)
        return base, slope


class StepTimes:
    def __init__(
        self, decay: float = 0.98, warmup_steps: int = 8, min_prefill_tokens: int = 16, window_s: float = 30.0
    ) -> None:
        self.warmup_steps = warmup_steps
        self.min_prefill_tokens = min_prefill_tokens
        self.window_s = window_s
        self.steps = 0
        self._decode = _Line(decay)
        self._prefill = _Line(decay)
        self._busy: deque[tuple[float, float]] = deque()  # (end time, seconds) of recent prefill steps
        self._first: float | None = None
        self._lock = threading.Lock()

    def observe(
        self, prefill_tokens: int, decode_seqs: int, seconds: float, now: float | None = None, widened: bool = False
    ) -> None:
        """One step's shape and duration; `now` (its end, monotonic seconds) feeds prefill_busy; a `widened`
        step counts there but not in the lines."""
        with self._lock:
            self._observe(prefill_tokens, decode_seqs, seconds, now, widened)

    def _observe(self, prefill_tokens: int, decode_seqs: int, seconds: float, now: float | None, widened: bool) -> None:
        if now is not None:
            if self._first is None:
                self._first = now - seconds
            if prefill_tokens > 0:
                self._busy.append((now, seconds))
        self.steps += 1
        if self.steps <= self.warmup_steps or seconds <= 0 or widened:
            return
        if prefill_tokens == 0:
            if decode_seqs > 0:
                self._decode.add(decode_seqs, seconds)
            return
        if prefill_tokens < self.min_prefill_tokens:
            return
        _, per_seq = self._decode.fit()
        self._prefill.add(prefill_tokens, max(seconds - per_seq * decode_seqs, 0.0))

    def busy(self, now: float) -> float:
        while self._busy and self._busy[0][0] < now - self.window_s:
            self._busy.popleft()
        if self._first is None:
            return 0.0
        span = min(self.window_s, max(now - self._first, 1e-3))
        return min(1.0, sum(sec for _, sec in self._busy) / span)

    def estimate(self, now: float | None = None) -> PerfEstimate:
        with self._lock:
            return self._estimate(now)

    def _estimate(self, now: float | None) -> PerfEstimate:
        decode_base, per_seq = self._decode.fit()
        prefill_base, per_token = self._prefill.fit()
        return PerfEstimate(
            decode_base_s=decode_base,
            per_seq_s=per_seq,
            prefill_base_s=prefill_base,
            per_token_s=per_token,
            decode_steps=self._decode.n,
            prefill_steps=self._prefill.n,
            prefill_busy=self.busy(now) if now is not None else 0.0,
        )
