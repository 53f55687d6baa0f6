"""The arithmetic of `tandem profile`, without an engine or a cluster.

- SchedulerOutput.features (what EngineCore.last_step_features records) equals planner.model.StepShape.of
  for prefill chunks and decode rows; a verification row of 1 + k tokens counts as 1 + k decode rows
  reading the cache up to each one's position; last_step_shape's counts are as before.
- deploy/profiling.py: a prompt's prefill time sums the chunks the token budget cuts it into; the transfer
  model is fitted on (decode blocks, pull seconds) of the requests that pulled; the served overhead is the
  median of TTFT less the prefill, and of the inter-token gap after token 2 less a decode step, at >= 0.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deploy.profiling import ServedRecord, served_overhead, transfer_model
from engine.scheduler import ScheduledRequest, SchedulerOutput
from planner.model import StepModel, StepShape
from planner.profile import Shape, WorkerProfile


def scheduled(n: int, computed: int, spec_slots: int = 0) -> ScheduledRequest:
    return ScheduledRequest(SimpleNamespace(num_computed_tokens=computed), n, [], spec_slots)  # type: ignore[arg-type]


def test_features_equal_the_planners_step_shape():
    out = SchedulerOutput([scheduled(100, 0), scheduled(30, 64), scheduled(1, 500), scheduled(1, 9)])
    want = StepShape.of(chunks=[(100, 0), (30, 64)], decode_contexts=[501, 10])
    assert out.features() == (want.prefill_tokens, want.attn_pairs, want.decode_seqs, want.decode_context)
    assert out.num_decoding == 2


def test_a_verification_row_is_one_decode_row_per_token():
    out = SchedulerOutput([scheduled(5, 40, spec_slots=4), scheduled(1, 40, spec_slots=4)])
    assert out.features() == (0, 0.0, 6, 41 + 42 + 43 + 44 + 45 + 41)
    assert out.num_decoding == 2  # last_step_shape counts requests, as the worker's StepTimes always did


def profile_of(model: StepModel, budget: int = 2048) -> WorkerProfile:
    return WorkerProfile(Shape(), model, num_blocks=100, max_num_batched_tokens=budget)


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks():
    model = StepModel(base_s=0.01, per_prefill_token_s=1e-3, per_attn_pair_s=1e-6)
    whole = model.prefill_s(300)
    chunked = model.prefill_s(256) + model.prefill_s(44, cached=256)
    assert model.prefill_s(300, budget=2048) == pytest.approx(whole)
    assert model.prefill_s(300, budget=256) == pytest.approx(chunked)


def test_the_transfer_model_is_fitted_on_the_requests_that_pulled():
    records = [ServedRecord(16 * b - 8, 0.1, kv_transfer_s=0.002 + 0.0005 * b) for b in (1, 2, 4, 8)]
    records.append(ServedRecord(100, 0.1))  # prefilled locally: no pull
    model = transfer_model(records, block_size=16)
    assert model.samples == 4
    assert model.base_s == pytest.approx(0.002) and model.per_block_s == pytest.approx(0.0005)
    assert transfer_model([ServedRecord(100, 0.1)], 16).samples == 0


def test_the_served_overhead_is_what_the_steps_do_not_explain():
    model = StepModel(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=0.005, per_context_token_s=1e-6)
    models = {"prefill": profile_of(model), "decode": profile_of(model)}
    records = []
    for prompt, extra_first, extra_token in ((100, 0.003, 0.001), (200, 0.004, 0.002), (300, 0.005, 0.003)):
        ttft = model.prefill_s(prompt) + extra_first
        gap = model.decode_step_s(1, prompt + 8.5) + extra_token  # 16 tokens: contexts prompt + 2 .. prompt + 15
        times = [ttft, ttft + 0.05] + [ttft + 0.05 + gap * i for i in range(1, 15)]
        records.append(ServedRecord(prompt, ttft, times, 0.04, "prefill", "decode"))
    over = served_overhead(records, models)
    assert over.samples == 3
    assert over.first_token_s == pytest.approx(0.004)
    assert over.per_token_s == pytest.approx(0.002)
    fast = [ServedRecord(100, 0.0, [0.0, 0.001, 0.002, 0.003], 0.0, "decode", "decode")]
    assert served_overhead(fast, models).first_token_s == 0.0  # clamped: never negative


def test_co_run_ratios_pair_the_same_steps_of_the_same_sweep():
    """contention: how much slower beside a busy neighbour; widening: how much faster on more threads; both the
    median step-by-step ratio over steps of the same shape, after the warm-up."""
    from deploy.profiling import contention, widening

    alone = [(256, 0.0, 0, 0, 9.0), (256, 0.0, 0, 0, 0.40), (512, 0.0, 0, 0, 0.80), (512, 0.0, 0, 0, 0.84)]
    wide = [(256, 0.0, 0, 0, 1.0), (256, 0.0, 0, 0, 0.25), (512, 0.0, 0, 0, 0.50), (512, 0.0, 0, 0, 0.50)]
    assert widening(alone, wide, warmup=1) == pytest.approx(1.6)  # ratios 1.6, 1.6, 1.68
    beside = [(s[0], s[1], s[2], s[3], s[4] * 1.25) for s in alone]
    assert contention(alone, beside, warmup=1) == pytest.approx(0.25)
    other = [(128, 0.0, 0, 0, 0.1)] * 4  # different steps: nothing pairs up
    assert widening(alone, other, warmup=0) == 0.0 and contention(alone, other, warmup=0) == 0.0
