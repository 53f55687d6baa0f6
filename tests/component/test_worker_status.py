"""A worker's status answers at once, even while its engine thread is inside a long step.

The router's health refresh gives each worker `status_timeout_s` (2 s) to answer; a
status that waited for the step to end would mark a busy worker down in the middle of
a long prefill (seen with 2048-token bf16 prefills on 2 cores).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig
from tests.helpers.tiny_models import make_tiny_hf_model
from worker_core.host import WorkerHost, WorkerSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("status"), "llama", vocab_size=512))


def test_status_does_not_wait_for_a_step(tiny):
    host = WorkerHost(
        WorkerSettings(
            worker_id="w",
            role="aggregated",
            transport="none",
            engine=EngineConfig(model=tiny, dtype="float32", cache=CacheConfig(num_blocks=32)),
        )
    )
    in_step, release = threading.Event(), threading.Event()
    real_step = host.core.step

    def slow_step():
        in_step.set()
        release.wait(30)  # a step that lasts until the test lets it go
        return real_step()

    host.core.step = slow_step

    async def scenario():
        gen = host.generate("r", list(range(5, 25)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.to_thread(in_step.wait, 30)
        status = await asyncio.wait_for(host.status(), 1.0)  # answered from the last published figures
        release.set()
        await first
        async for _ in gen:
            pass
        return status

    try:
        status = asyncio.run(scenario())
    finally:
        release.set()
        host.close()
    assert status.health == "SERVING"
    assert status.running + status.waiting == 1  # as of the last command: the request was added
