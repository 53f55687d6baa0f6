"""The engine reads one injected clock for every timestamp it takes (arrival, first schedule, first token)."""

from __future__ import annotations

import itertools

from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig
from engine.engine_core import EngineCore
from tests.helpers.tiny_models import make_tiny_hf_model


def test_engine_timestamps_come_from_the_injected_clock(tmp_path):
    ticks = itertools.count(100)
    core = EngineCore(
        EngineConfig(model=str(make_tiny_hf_model(tmp_path, "llama", vocab_size=512)), dtype="float32",
                     cache=CacheConfig(block_size=4, num_blocks=16)),
        clock=lambda: float(next(ticks)),
    )  # fmt: skip
    core.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), "r")
    first = core.step()[0]
    # 101: the step's start (its duration is the SLO triage's prefill speed), then first schedule, first token
    assert (first.arrival_time, first.first_scheduled_time, first.first_token_time) == (100.0, 102.0, 103.0)
    while core.has_unfinished_requests():
        core.step()
    core.leak_check()
