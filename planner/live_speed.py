"""A worker's speed while it serves, against the profile the planner was given: the live refinement of
`tandem serve --planner sla` (planner/policy.py step 2).

Each warm worker's own step model, refitted from its live steps (planner/model.py LiveFit), is compared
with the profile's price of the same step (the decode grid for decode rows), at the decode step the worker
typically ran; the ratio is divided by the contention its steps ran under (busy neighbours x the profile's
contention per neighbour), because the simulator adds that contention back. The pool's factor is the
median over its warm workers, and `refined_profile` scales the profile's step models by it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import msgspec

from planner.model import StepModel, StepShape
from planner.profile import Profile, ProfileError

POOLS = ("prefill", "decode")
TYPICAL_DECODE = StepShape(0, 0.0, 8, 8 * 512)  # what a decode worker's speed is compared on
TYPICAL_PREFILL = StepShape(512, 512 * 256.5, 0, 0)


@dataclass(frozen=True)
class WorkerLive:
    """One worker as the router sees it: its pool, age, and live step-time estimates (0: not measured)."""

    worker_id: str
    pool: str
    age_s: float
    decode_step_s: float = 0.0  # a measured decode step at `decode_batch` sequences
    decode_batch: int = 1
    decode_context: float = 0.0
    prefill_s_per_token: float = 0.0
    draining: bool = False
    live_step: tuple[float, ...] = ()  # the worker's own refitted StepModel coefficients (WorkerStatus.live_step)
    live_busy: float = 0.0  # other workers of its host stepping beside those steps (WorkerStatus.live_busy)
    live_decode: tuple[float, ...] = ()  # (rows, context per row) of its typical decode step (WorkerStatus)


def contention_share(profile: Profile, pool: str, busy: float) -> float:
    """How much longer a live step ran than alone because `busy` other workers of its host stepped beside it
    on average, as the simulator models it (planner/simulator.py: 1 + contention x busy neighbours); 1.0
    where the profile measured no contention or gives every worker its own host."""
    over = profile.overhead
    if over.workers_per_host <= 0 or busy <= 0:
        return 1.0
    return 1.0 + over.contention.get(pool, 0.0) * busy


def speed_factors(profile: Profile, workers: tuple[WorkerLive, ...], warmup_s: float) -> tuple[dict[str, float], int]:
    """Per pool: median over warm workers of live / profiled step time (1.0 without evidence), and how
    many cold workers were left out.

    A live step ran beside whatever its neighbours on the host were doing, and the simulator slows a step by
    the profile's contention per busy neighbour on top of the refined profile: so each worker's ratio is
    divided by the contention its own steps ran under (`contention_share`), and the factor is the worker's
    own speed against the profile's, not the host's load counted twice."""
    factors: dict[str, float] = {}
    cold = 0
    for pool in POOLS:
        try:
            step = profile.worker(pool=pool).step
        except ProfileError:  # a profile without this pool's shape: no refinement
            factors[pool] = 1.0
            continue
        ratios = []
        for w in workers:
            if w.pool != pool:
                continue
            if w.age_s < warmup_s:
                cold += 1
                continue
            if len(w.live_step) == 5:  # the worker's own five-feature model: compare on a typical step
                live = StepModel.of_coefficients(w.live_step)
                typical = TYPICAL_DECODE if pool == "decode" else TYPICAL_PREFILL
                if pool == "decode" and len(w.live_decode) == 2:  # where the live fit has its steps
                    rows = max(round(w.live_decode[0]), 1)
                    typical = StepShape(0, 0.0, rows, round(rows * w.live_decode[1]))
                # against the step as the simulator prices it (the decode grid where the profile has one): the
                # live fit is local to the shapes the worker serves, while the profile's linear part compromises
                # over its whole sweep (at 8 rows it was 18 % under the profile's own measurement)
                predicted = step.step_s(typical)
                if predicted > 0 and live.step_s(typical) > 0:
                    ratios.append(live.step_s(typical) / predicted / contention_share(profile, pool, w.live_busy))
                continue
            if pool == "decode" and w.decode_step_s > 0:
                predicted = step.decode_step_s(w.decode_batch, w.decode_context)
                if predicted > 0:
                    ratios.append(w.decode_step_s / predicted / contention_share(profile, pool, w.live_busy))
            elif pool == "prefill" and w.prefill_s_per_token > 0 and step.per_prefill_token_s > 0:
                ratios.append(
                    w.prefill_s_per_token / step.per_prefill_token_s / contention_share(profile, pool, w.live_busy)
                )
        factors[pool] = statistics.median(ratios) if ratios else 1.0
    return factors, cold


def scaled(step: StepModel, factor: float) -> StepModel:
    """Every step `factor` times as long: the five coefficients and the decode grid alike."""
    return msgspec.structs.replace(
        step,
        base_s=step.base_s * factor,
        per_prefill_token_s=step.per_prefill_token_s * factor,
        per_attn_pair_s=step.per_attn_pair_s * factor,
        per_decode_seq_s=step.per_decode_seq_s * factor,
        per_context_token_s=step.per_context_token_s * factor,
        decode_grid=step.decode_grid.scaled(factor) if step.decode_grid is not None else None,
    )


def refined_profile(profile: Profile, factors: dict[str, float]) -> Profile:
    """The profile with each pool's shape slowed or sped up by its live factor (shapes shared by both pools
    take the slower one: planning for the slower is the safe side)."""
    out = []
    for w in profile.workers:
        key = w.shape.key()
        fs = [factors[p] for p in POOLS if profile.pools.get(p) == key and p in factors]
        f = max(fs) if fs else 1.0
        out.append(msgspec.structs.replace(w, step=scaled(w.step, f)) if f != 1.0 else w)
    return msgspec.structs.replace(profile, workers=out)


__all__ = [
    "POOLS",
    "TYPICAL_DECODE",
    "TYPICAL_PREFILL",
    "WorkerLive",
    "contention_share",
    "refined_profile",
    "scaled",
    "speed_factors",
]
