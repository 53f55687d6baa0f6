"""What `tandem profile` computes from what it measured (deploy/profile_cli.py measures): pure functions.

    worker steps (common.contract.StepTiming)  -> fit_step_model -> WorkerProfile (shape from the pool
                                                  config and the worker's status)
    served requests (ServedRecord, sequential)  -> fit_transfer_model on (blocks, kv_transfer_s)
                                                -> ServedOverhead: what TTFT and inter-token time hold
                                                   beyond the step model's steps

The served path's figures, per request:

    first token   client TTFT - the step model's prefill of the prompt (the chunks the token budget cuts
                  it into). In Tandem token 1 comes from the prefill worker, so the KV transfer is in token
                  2's latency, not in TTFT (router/responses.py): it is not subtracted.
    per token     mean client gap from token 2 to the last - decode_step_s(1, mean context): the gap
                  1 -> 2 holds the transfer and is left out (the transfer model covers it).

Both are medians over the requests, clamped at 0. Needs no torch and no Ray.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from common.contract import ProfilePlan, StepTiming, WorkerStatus
from deploy.config import PoolConfig
from planner.model import (
    ModelFitError,
    StepSample,
    StepShape,
    TransferModel,
    fit_step_model,
    fit_transfer_model,
    with_decode_grid,
)
from planner.profile import Profile, ServedOverhead, Shape, WorkerProfile


@dataclass(frozen=True)
class ServedPlan:
    """The sequential requests sent through the router: prompts of `blocks` decode-pool blocks each."""

    blocks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    repeats: int = 2
    max_tokens: int = 16

    @classmethod
    def quick(cls) -> ServedPlan:
        return cls(blocks=(1, 4, 16), repeats=1)


@dataclass
class ServedRecord:
    """One request as the client saw it (times in seconds from sending it)."""

    prompt_tokens: int
    ttft_s: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token (a chunk's share one)
    kv_transfer_s: float = 0.0  # the decode worker's pull (0: none, e.g. aggregated)
    prefill_pool: str = "decode"  # the pool whose worker computed the prompt
    decode_pool: str = "decode"


def shape_of(pool: PoolConfig, status: WorkerStatus) -> Shape:
    """A worker's shape: parallelism and threads from its pool, block size and dtype as it resolved them."""
    return Shape(
        tp=pool.tp,
        pp=pool.pp,
        block_size=status.block_size,
        dtype=status.dtype,
        device=pool.device,
        num_threads=pool.num_threads or max(1, int(pool.num_cpus)),
    )


def worker_profile(pool: PoolConfig, status: WorkerStatus, timings: list[StepTiming], warmup: int) -> WorkerProfile:
    """The fitted step model of one worker and its capacity and limits (ModelFitError: too few steps)."""
    samples = [StepSample(StepShape(int(p), float(a), int(d), int(c)), float(s)) for p, a, d, c, s in timings]
    return WorkerProfile(
        shape=shape_of(pool, status),
        step=with_decode_grid(fit_step_model(samples), samples),
        num_blocks=status.kv_blocks_total,
        max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens,
        prefill_join_tokens=pool.join_tokens,
        enable_prefix_caching=pool.enable_prefix_caching,
        cost=float(pool.world_size),
        warmup_excluded=warmup,
        samples=samples,
    )


def transfer_model(records: list[ServedRecord], block_size: int) -> TransferModel:
    """(blocks, kv_transfer_s) of every request that pulled its KV -> TransferModel (default if none did)."""
    points = [(-(-r.prompt_tokens // block_size), r.kv_transfer_s) for r in records if r.kv_transfer_s > 0]
    try:
        return fit_transfer_model(points)
    except ModelFitError:
        return TransferModel()


def served_overhead(records: list[ServedRecord], models: dict[str, WorkerProfile]) -> ServedOverhead:
    """Median TTFT and inter-token time beyond the step model (module docstring); `models` by pool name."""
    first: list[float] = []
    per_token: list[float] = []
    for r in records:
        p = models[r.prefill_pool]
        first.append(r.ttft_s - p.step.prefill_s(r.prompt_tokens, budget=p.max_num_batched_tokens))
        n = len(r.token_times)
        if n >= 3:
            itl = (r.token_times[-1] - r.token_times[1]) / (n - 2)
            context = r.prompt_tokens + (n + 1) / 2  # rows computing tokens 3..n read prompt + 2 .. prompt + n - 1
            per_token.append(itl - models[r.decode_pool].step.decode_step_s(1, context))
    if not first:
        return ServedOverhead()
    return ServedOverhead(
        first_token_s=max(0.0, statistics.median(first)),
        per_token_s=max(0.0, statistics.median(per_token)) if per_token else 0.0,
        samples=len(records),
    )


def format_table(profile: Profile) -> str:
    """The fitted coefficients and fit errors, one line per shape, then the served path's figures."""
    head = (
        f"{'shape':<32} {'base ms':>8} {'us/tok':>8} {'ns/pair':>8} {'ms/seq':>8} {'us/ctx':>8} "
        f"{'steps':>6} {'err p50':>8} {'err p90':>8} {'blocks':>7}"
    )
    lines = [head]
    for w in profile.workers:
        m = w.step
        lines.append(
            f"{w.shape.key():<32} {m.base_s * 1e3:>8.2f} {m.per_prefill_token_s * 1e6:>8.1f} "
            f"{m.per_attn_pair_s * 1e9:>8.2f} {m.per_decode_seq_s * 1e3:>8.3f} {m.per_context_token_s * 1e6:>8.3f} "
            f"{m.samples:>6} {m.rel_error_p50:>8.1%} {m.rel_error_p90:>8.1%} {w.num_blocks:>7}"
        )
    pools = ", ".join(f"{name}: {key}" for name, key in sorted(profile.pools.items()))
    t, o = profile.transfer, profile.overhead
    lines.append(f"pools: {pools}")
    lines.append(
        f"transfer: {t.base_s * 1e3:.2f} ms + {t.per_block_s * 1e3:.3f} ms/block ({t.samples} transfers)"
        if t.samples
        else "transfer: not measured"
    )
    lines.append(
        f"served path: first token +{o.first_token_s * 1e3:.2f} ms, per decode step +{o.per_token_s * 1e3:.2f} ms "
        f"({o.samples} requests)"
    )
    if o.widened_prefill_speedup:
        lines.append(
            f"core sharing: a prefill on {o.widen_threads} threads {o.widened_prefill_speedup:.2f}x faster; "
            f"decode lends within {o.lend_tpot_s * 1e3:.0f} ms per output token"
        )
    return "\n".join(lines)


# Contention: the measured worker runs a short sweep while a neighbour on the same host runs a longer one, so
# every measured step overlaps the neighbour's work (tandem profile, after the sweeps of each shape).
def _prefills(lengths: tuple[int, ...], repeats: int, warmup_steps: int) -> ProfilePlan:
    """A sweep of prompts alone and nothing else."""
    return ProfilePlan(warmup_steps, lengths, repeats, cached=(), decode_contexts=(), decode_batches=(), mixed=())


def _decodes(batches: tuple[int, ...], steps: int, warmup_steps: int) -> ProfilePlan:
    """A sweep of decode steps at 256 tokens of context and nothing else."""
    return ProfilePlan(
        warmup_steps,
        prefill_lengths=(),
        cached=(),
        decode_contexts=(256,),
        decode_batches=batches,
        decode_steps=steps,
        mixed=(),
    )


CORUN_DECODE = _decodes((1, 4, 16), steps=20, warmup_steps=1)
CORUN_PREFILL = _prefills((256, 512), repeats=3, warmup_steps=1)
BUSY_PREFILL = _prefills((1024,), repeats=6, warmup_steps=0)  # the neighbour while decode steps are measured
BUSY_DECODE = _decodes((8,), steps=120, warmup_steps=0)  # the neighbour while prefill steps are measured
CORUN_ROUNDS = 2  # alone / beside (/ widened) rounds, their step ratios pooled


def widening(alone: list[StepTiming], wide: list[StepTiming], warmup: int) -> float:
    """How many times faster the same sweep's steps ran on more threads: the median of the step-by-step
    ratios (0 when no step pairs up)."""
    ratios = [a[4] / w[4] for a, w in zip(alone[warmup:], wide[warmup:], strict=False) if w[4] > 0 and a[:4] == w[:4]]
    return statistics.median(ratios) if ratios else 0.0


def contention(alone: list[StepTiming], beside: list[StepTiming], warmup: int) -> float:
    """How much longer the same sweep's steps ran beside a busy neighbour than alone: the median of the
    step-by-step ratios, less 1, at least 0 (the same plan gives the same steps in the same order)."""
    ratios = [b[4] / a[4] for a, b in zip(alone[warmup:], beside[warmup:], strict=False) if a[4] > 0 and a[:4] == b[:4]]
    return max(0.0, statistics.median(ratios) - 1.0) if ratios else 0.0
