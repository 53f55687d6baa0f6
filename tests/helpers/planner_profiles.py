"""Synthetic profiles for the planner's tests: one worker shape with a known step model."""

from __future__ import annotations

from typing import Any

from planner.model import StepModel
from planner.profile import Profile, Shape, WorkerProfile

# a SmolLM2-on-CPU-like step: 20 ms base, 1.2 ms per prompt token, 1.5 ms per decode row
STEP = StepModel(
    base_s=0.02, per_prefill_token_s=0.0012, per_attn_pair_s=2e-8, per_decode_seq_s=0.0015, per_context_token_s=3e-7
)


def profile_of(
    step: StepModel = STEP,
    num_blocks: int = 20000,
    max_num_seqs: int = 64,
    budget: int = 2048,
    join_tokens: int | None = None,
    **kw: Any,
) -> Profile:
    """One shape serving every pool; `kw`: Profile fields (transfer, overhead, ...)."""
    w = WorkerProfile(
        shape=Shape(),
        step=step,
        num_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        prefill_join_tokens=join_tokens,
    )
    key = w.shape.key()
    return Profile(model="m", workers=[w], pools={"prefill": key, "decode": key, "aggregated": key}, **kw)
