"""The performance model the simulator and the planner run on: what one engine step of a worker costs.

One engine step computes some prompt tokens (prefill chunks) and some decode rows together. Its time is
linear in five features of what it computes:

    t = base
      + per_prefill_token * prompt tokens computed          (projections and MLP of every new token)
      + per_attn_pair     * sum over chunks of n * (ctx + (n + 1) / 2)   (attention: each new token
                                                             against the context before it and the
                                                             chunk's earlier tokens)
      + per_decode_seq    * decode rows                      (weights streamed once per step, a row's
                                                             sampling and bookkeeping)
      + per_context_token * sum of the decode rows' context lengths   (attention reading the cache)

The same formula covers prefill-only, decode-only and mixed (chunked prefill beside decodes) steps, so a
model measured on a prefill worker and a decode worker of one shape is one model. `fit_step_model` fits it
by non-negative least squares on relative error (a 20 ms decode step and a 2 s prefill weigh alike): every
subset of the features is fitted and the best fit with no negative coefficient wins, so a feature the
samples do not exercise gets 0 rather than a wild value.

On a CPU the decode part is not linear in the batch: a few rows run a GEMV-like kernel that streams the
weights once per row group, larger batches a GEMM whose efficiency grows with the rows (on this project's
2-core host a decode step of 8 rows costs 4x one of 4). So a profile also keeps its decode-only steps as a
`DecodeGrid` (median step time per batch size, per context length), and the model answers decode rows from
that grid where it has one: linear between measured batch sizes, then between measured contexts. The five
coefficients stay what a worker refits live (`LiveFit`) and what plans fall back on without a grid.

`TransferModel`: moving a request's KV from a prefill to a decode worker, `base + per_block * blocks`.

Pure Python, no torch, no numpy: workers refine the same model from their live steps, and the planner
runs where only the client is installed.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence

import msgspec

FEATURES = ("prefill_tokens", "attn_pairs", "decode_seqs", "decode_context")


class StepShape(msgspec.Struct, frozen=True, array_like=True):
    """What one engine step computed (the model's features)."""

    prefill_tokens: int = 0
    attn_pairs: float = 0.0
    decode_seqs: int = 0
    decode_context: int = 0

    @staticmethod
    def of(chunks: Iterable[tuple[int, int]] = (), decode_contexts: Iterable[int] = ()) -> StepShape:
        """From the step's prefill chunks as (new tokens, tokens before them) and its decode rows' contexts."""
        tokens = 0
        pairs = 0.0
        for n, ctx in chunks:
            tokens += n
            pairs += attn_pairs(n, ctx)
        seqs = 0
        context = 0
        for c in decode_contexts:
            seqs += 1
            context += c
        return StepShape(tokens, pairs, seqs, context)

    def features(self) -> tuple[float, float, float, float, float]:
        return (1.0, float(self.prefill_tokens), self.attn_pairs, float(self.decode_seqs), float(self.decode_context))


def attn_pairs(new_tokens: int, context: int) -> float:
    """Query-key pairs of a chunk of `new_tokens` after `context` tokens (causal within the chunk)."""
    return new_tokens * (context + (new_tokens + 1) / 2.0)


class StepSample(msgspec.Struct, frozen=True, array_like=True):
    shape: StepShape
    seconds: float


class DecodeGrid(msgspec.Struct, frozen=True):
    """Decode-only step times as measured (`fit_decode_grid`), in groups of one swept context length each: per
    group, the batch sizes measured (ascending), the median step seconds at each, and the median context per
    row it was measured at (a sweep grows its rows by a token a step, so each batch has its own)."""

    rows: tuple[tuple[int, ...], ...]
    seconds: tuple[tuple[float, ...], ...]
    contexts: tuple[tuple[float, ...], ...]

    def at(self, rows: int, context: float) -> float:
        """One decode-only step of `rows` rows of `context` tokens each: piecewise linear in the batch within
        each group, then in the context between the groups; time extended linearly above the largest batch
        and context and held at the smallest; a group's context held beyond its measured batches."""
        points = sorted(
            (_interp(r, c, rows, extend=False), _interp(r, s, rows))
            for r, s, c in zip(self.rows, self.seconds, self.contexts, strict=True)
        )
        return _interp([c for c, _ in points], [s for _, s in points], context)

    def scaled(self, factor: float) -> DecodeGrid:
        """Every step `factor` times as long (the planner's live speed correction)."""
        return DecodeGrid(self.rows, tuple(tuple(t * factor for t in s) for s in self.seconds), self.contexts)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, extend: bool = True) -> float:
    """Piecewise linear through (xs, ys) (xs ascending, at least 2), held below the first point, and beyond
    the last extended linearly (`extend`) or held; never below the smallest y (a step takes at least what
    the cheapest one measured did)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1] and not extend:
        return ys[-1]
    i = next((k for k in range(1, len(xs)) if x <= xs[k]), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 <= x0:  # equal abscissae (two groups measured at one context): no slope to follow
        return max(min(ys), y1)
    return max(min(ys), y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class StepModel(msgspec.Struct, frozen=True):
    """Seconds of one engine step as a linear function of its StepShape (see the module docstring), with decode
    rows answered from `decode_grid` where a profile measured one."""

    base_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_attn_pair_s: float = 0.0
    per_decode_seq_s: float = 0.0
    per_context_token_s: float = 0.0
    samples: int = 0  # steps the fit used
    rel_error_p50: float = 0.0  # |predicted - measured| / measured over those steps
    rel_error_p90: float = 0.0
    decode_grid: DecodeGrid | None = None

    @classmethod
    def of_coefficients(cls, values: Sequence[float]) -> StepModel:
        """The model of five coefficients in `coefficients()` order (a worker's live fit on the wire)."""
        base, prefill_token, attn_pair, decode_seq, context_token = values
        return cls(base, prefill_token, attn_pair, decode_seq, context_token)

    def linear(self) -> StepModel:
        """The five-term model alone (what a worker's live fit is: compare like with like)."""
        return msgspec.structs.replace(self, decode_grid=None) if self.decode_grid is not None else self

    def coefficients(self) -> tuple[float, float, float, float, float]:
        return (
            self.base_s,
            self.per_prefill_token_s,
            self.per_attn_pair_s,
            self.per_decode_seq_s,
            self.per_context_token_s,
        )

    def step_s(self, shape: StepShape) -> float:
        grid = self.decode_grid
        if grid is not None and shape.decode_seqs > 0:  # decode rows as measured, prompt work on top
            decode = grid.at(shape.decode_seqs, shape.decode_context / shape.decode_seqs)
            return decode + self.per_prefill_token_s * shape.prefill_tokens + self.per_attn_pair_s * shape.attn_pairs
        return sum(c * f for c, f in zip(self.coefficients(), shape.features(), strict=True))

    def prefill_s(self, tokens: int, cached: int = 0, budget: int | None = None) -> float:
        """Computing `tokens` prompt tokens after `cached` ones already in the cache: one step, or with a token
        `budget` (max_num_batched_tokens) one step per chunk of at most `budget` tokens."""
        chunk = tokens if budget is None else max(1, budget)
        total, done = 0.0, 0
        while done < tokens:
            n = min(chunk, tokens - done)
            total += self.step_s(StepShape(n, attn_pairs(n, cached + done), 0, 0))
            done += n
        return total

    def decode_step_s(self, batch: int, mean_context: float) -> float:
        """One step decoding `batch` sequences of `mean_context` tokens each."""
        return self.step_s(StepShape(0, 0.0, batch, int(batch * mean_context)))

    @property
    def ready(self) -> bool:
        return self.samples > 0


class TransferModel(msgspec.Struct, frozen=True):
    """Seconds to move one request's KV (prefill worker -> decode worker), from submit to landed."""

    base_s: float = 0.0
    per_block_s: float = 0.0
    samples: int = 0

    def transfer_s(self, blocks: int) -> float:
        return self.base_s + self.per_block_s * blocks


class ModelFitError(ValueError):
    """Too few or degenerate samples to fit a model; the message says what to measure."""


def fit_step_model(samples: Sequence[StepSample]) -> StepModel:
    """Non-negative least squares on relative error (the module docstring), in two stages when the samples
    allow: base, per-row and per-context from the decode-only steps (many, short, and what ITL is made of),
    then the prompt-token and attention terms from the other steps with those held. One joint fit over every
    feature subset otherwise. Both stages pick the best non-negative fit over their features' subsets."""
    rows = [(s.shape.features(), s.seconds) for s in samples if s.seconds > 0]
    if len(rows) < 2:
        raise ModelFitError(f"a step model needs at least 2 timed steps, got {len(rows)}")
    n_features = len(FEATURES) + 1
    decode = [(x, y) for x, y in rows if x[1] == 0 and x[3] > 0]
    other = [(x, y) for x, y in rows if not (x[1] == 0 and x[3] > 0)]
    coef: list[float] | None = None
    if len(decode) >= 3 and other:
        first = _best_subset(decode, (0, 3, 4), [0.0] * len(decode), n_features)
        if first is not None:
            offsets = [_dot(first, x) for x, _ in other]
            second = _best_subset(other, (1, 2), offsets, n_features)
            if second is not None:
                coef = [a + b for a, b in zip(first, second, strict=True)]
    if coef is None:
        coef = _best_subset(rows, tuple(range(n_features)), [0.0] * len(rows), n_features)
    if coef is None:
        raise ModelFitError("no non-negative fit of the step samples (are the step times all equal to zero?)")
    errors = sorted(abs(_dot(coef, x) - y) / y for x, y in rows)
    return StepModel(
        base_s=coef[0],
        per_prefill_token_s=coef[1],
        per_attn_pair_s=coef[2],
        per_decode_seq_s=coef[3],
        per_context_token_s=coef[4],
        samples=len(rows),
        rel_error_p50=_quantile(errors, 0.5),
        rel_error_p90=_quantile(errors, 0.9),
    )


def fit_decode_grid(samples: Sequence[StepSample], gap: float = 1.25) -> DecodeGrid | None:
    """The decode-only steps as a DecodeGrid: grouped by context per row (a new group where the sorted contexts
    jump by more than `gap` x or reach double the group's first: a profile's sweep grows each context by a
    token per step), the median time and context per batch size in each group. None unless two groups have at
    least two batch sizes each."""
    points = sorted(
        (s.shape.decode_context / s.shape.decode_seqs, s.shape.decode_seqs, s.seconds)
        for s in samples
        if s.shape.prefill_tokens == 0 and s.shape.decode_seqs > 0 and s.seconds > 0
    )
    groups: list[list[tuple[float, int, float]]] = []
    for p in points:  # a step of more than `gap` x, or double the group's first context, starts a group
        if groups and p[0] <= groups[-1][-1][0] * gap and p[0] <= groups[-1][0][0] * 2:
            groups[-1].append(p)
        else:
            groups.append([p])
    rows: list[tuple[int, ...]] = []
    seconds: list[tuple[float, ...]] = []
    contexts: list[tuple[float, ...]] = []
    for g in groups:
        by_rows: dict[int, list[tuple[float, float]]] = {}
        for c, r, t in g:
            by_rows.setdefault(r, []).append((c, t))
        if len(by_rows) < 2:
            continue
        batch = sorted(by_rows)
        rows.append(tuple(batch))
        seconds.append(tuple(_quantile(sorted(t for _, t in by_rows[r]), 0.5) for r in batch))
        contexts.append(tuple(_quantile(sorted(c for c, _ in by_rows[r]), 0.5) for r in batch))
    if len(rows) < 2:
        return None
    return DecodeGrid(tuple(rows), tuple(seconds), tuple(contexts))


def with_decode_grid(model: StepModel, samples: Sequence[StepSample]) -> StepModel:
    """`model` with the samples' DecodeGrid (when they make one), its errors recomputed as it now predicts."""
    grid = fit_decode_grid(samples)
    if grid is None:
        return model
    model = msgspec.structs.replace(model, decode_grid=grid)
    errors = sorted(abs(model.step_s(s.shape) - s.seconds) / s.seconds for s in samples if s.seconds > 0)
    return msgspec.structs.replace(model, rel_error_p50=_quantile(errors, 0.5), rel_error_p90=_quantile(errors, 0.9))


def _best_subset(
    rows: Sequence[tuple[Sequence[float], float]], features: Sequence[int], offsets: Sequence[float], width: int
) -> list[float] | None:
    """min sum ((x_S . c + offset - y) / y)^2 with c >= 0, over every subset S of `features`; full-width
    coefficients (0 outside S), or None when no subset has a non-negative solution."""
    best: tuple[float, list[float]] | None = None
    shifted = [(x, y - o, y) for (x, y), o in zip(rows, offsets, strict=True)]
    for k in range(1, len(features) + 1):
        for subset in itertools.combinations(features, k):
            coef = _weighted_lstsq([(x, t) for x, t, _ in shifted], subset, [y for _, _, y in shifted])
            if coef is None or any(c < 0 for c in coef):
                continue
            full = [0.0] * width
            for i, c in zip(subset, coef, strict=True):
                full[i] = c
            sse = sum(((_dot(full, x) - t) / y) ** 2 for x, t, y in shifted)
            if best is None or sse < best[0] * (1 - 1e-12):
                best = (sse, full)
    return best[1] if best is not None else None


def fit_transfer_model(points: Sequence[tuple[int, float]]) -> TransferModel:
    """(blocks, seconds) pairs -> base + per_block * blocks, both >= 0 (relative least squares)."""
    rows = [((1.0, float(b)), s) for b, s in points if s > 0]
    if not rows:
        raise ModelFitError("a transfer model needs at least one timed transfer")
    best: tuple[float, list[float]] | None = None
    for subset in ((0, 1), (0,), (1,)):
        coef = _weighted_lstsq(rows, subset)
        if coef is None or any(c < 0 for c in coef):
            continue
        full = [0.0, 0.0]
        for i, c in zip(subset, coef, strict=True):
            full[i] = c
        sse = sum(((_dot(full, x) - y) / y) ** 2 for x, y in rows)
        if best is None or sse < best[0]:
            best = (sse, full)
    assert best is not None  # the base alone always fits with a non-negative mean
    return TransferModel(best[1][0], best[1][1], samples=len(rows))


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _weighted_lstsq(
    rows: Sequence[tuple[Sequence[float], float]], subset: Sequence[int], scale: Sequence[float] | None = None
) -> list[float] | None:
    """min sum ((x_S . c - y) / s)^2 by the normal equations (s: `scale`, else y itself: relative error);
    None when they are singular."""
    k = len(subset)
    ata = [[0.0] * k for _ in range(k)]
    atb = [0.0] * k
    for j, (x, y) in enumerate(rows):
        s = scale[j] if scale is not None else y
        w = 1.0 / (s * s)
        xs = [x[i] for i in subset]
        for i in range(k):
            atb[i] += w * xs[i] * y
            for j in range(i, k):
                ata[i][j] += w * xs[i] * xs[j]
    for i in range(k):
        for j in range(i):
            ata[i][j] = ata[j][i]
    return _solve(ata, atb)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting on scaled columns; None if singular."""
    n = len(b)
    scale = [math.sqrt(a[i][i]) if a[i][i] > 0 else 0.0 for i in range(n)]
    if any(s == 0 for s in scale):
        return None
    m = [[a[i][j] / (scale[i] * scale[j]) for j in range(n)] + [b[i] / scale[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-10:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] / scale[i] for i in range(n)]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class LiveFit:
    """A worker's step model refitted from its own live steps (worker_core/engine_loop.py feeds it).

    Steps in the first `warmup_s` after the first one are left out (allocation, first-touch page faults,
    a cold cache: what a new worker's first minutes look like, not its speed), and so are steps that
    computed nothing. The last `window` steps are kept; `model()` refits them at most every `refit_every`
    new steps (the two-stage fit of `fit_step_model`, a few milliseconds), and returns None until there are
    `min_steps` of them. The engine thread observes while the event loop reads: a lock keeps them apart.
    """

    def __init__(self, warmup_s: float = 120.0, window: int = 512, refit_every: int = 64, min_steps: int = 32):
        import threading
        from collections import deque

        self.warmup_s = warmup_s
        self.refit_every = refit_every
        self.min_steps = min_steps
        self._samples: deque[StepSample] = deque(maxlen=window)
        self._busy: deque[float] = deque(maxlen=window)  # per kept step: other workers of the host busy meanwhile
        self._first: float | None = None
        self._new = 0
        self._model: StepModel | None = None
        self.excluded = 0  # steps left out as warm-up
        self._lock = threading.Lock()

    def observe(self, features: tuple[int, float, int, int], seconds: float, now: float, busy: float = 0.0) -> None:
        """`busy`: how many other workers of the host were running steps as it started (the simulator's
        contention counts those; worker_core/core_share.py). The fit keeps the step as it ran;
        `busy_neighbours()` says how loaded the host was, so that a planner can tell this worker's own speed
        from its neighbours' load."""
        with self._lock:
            if self._first is None:
                self._first = now
            if now - self._first < self.warmup_s:
                self.excluded += 1
                return
            if seconds <= 0 or (features[0] == 0 and features[2] == 0):
                return
            self._samples.append(StepSample(StepShape(*features), seconds))
            self._busy.append(busy)
            self._new += 1

    def served_decode(self, at_least: int = 8) -> tuple[int, float] | None:
        """The decode-only step this worker typically ran in its window: (median rows, median context per row);
        None with fewer than `at_least` such steps. Where a planner compares the live fit with the profile:
        the fit is right where it has steps, and may be far off elsewhere."""
        with self._lock:
            decode = [s.shape for s in self._samples if s.shape.prefill_tokens == 0 and s.shape.decode_seqs > 0]
        if len(decode) < at_least:
            return None
        rows = round(statistics.median(d.decode_seqs for d in decode))
        return max(rows, 1), statistics.median(d.decode_context / d.decode_seqs for d in decode)

    def busy_neighbours(self) -> float:
        """Mean busy neighbours over the kept steps, each step counted once as the fit counts it (relative
        error): with one neighbour, the share of the steps it was stepping beside; 0.0 without steps."""
        with self._lock:
            return sum(self._busy) / len(self._busy) if self._busy else 0.0

    def model(self) -> StepModel | None:
        with self._lock:
            if len(self._samples) < self.min_steps:
                return None
            if self._model is None or self._new >= self.refit_every:
                samples = list(self._samples)
                self._new = 0
            else:
                return self._model
        try:
            fitted = fit_step_model(samples)
        except ModelFitError:
            return self._model
        with self._lock:
            self._model = fitted
        return fitted
