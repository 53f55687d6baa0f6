"""The engine thread widens its steps onto an idle peer's core and narrows back once the peer works, and a
decode engine pauses between its steps while a peer wants its core (worker_core/core_share.py through
worker_core/engine_loop.py), with tokens unchanged."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig
from engine.engine_core import EngineCore
from tests.helpers.fake_time import FakeTime
from tests.helpers.tiny_models import make_tiny_hf_model
from worker_core.core_share import CoreShare, LendBudget
from worker_core.engine_loop import AsyncEngine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), "llama", vocab_size=512))


@pytest.fixture
def peer():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _core(model: str) -> EngineCore:
    return EngineCore(EngineConfig(model=model, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=256)))


async def generate(engine: AsyncEngine, rid: str) -> list[int]:
    stream = engine.open_stream(rid)
    await engine.call(lambda c: c.add_request(list(range(3, 300)), PARAMS, rid))  # a long prompt
    tokens: list[int] = []
    while True:
        out = await stream.get()
        if isinstance(out, BaseException):  # the engine failed the request
            raise out
        tokens += out.new_token_ids
        if out.finished:
            engine.close_stream(rid)
            return tokens


def test_steps_widen_onto_an_idle_peer_and_narrow_when_it_works(tiny, tmp_path, peer):
    table = tmp_path / "cores"
    other = CoreShare(1, table, cpus=2, pid=peer)  # another worker on the host, idle

    def core() -> EngineCore:
        return _core(tiny)

    async def scenario():
        shared = AsyncEngine(core(), "shared", core_share=CoreShare(1, table, cpus=2))
        alone = AsyncEngine(core(), "alone")
        shared.start()
        alone.start()
        try:
            widened = await generate(shared, "a")
            steps_idle_peer = shared.widened_steps
            assert shared.threads == 1  # its decode steps ran at the base
            other.threads(busy=True)  # the peer has work now
            narrowed = await generate(shared, "b")
            steps_busy_peer = shared.widened_steps - steps_idle_peer
            reference = await generate(alone, "c")
        finally:
            shared.stop()
            alone.stop()
        return widened, steps_idle_peer, narrowed, steps_busy_peer, reference

    widened, n_idle, narrowed, n_busy, reference = asyncio.run(scenario())
    assert n_idle >= 1 and n_busy == 0  # the prefill borrowed the idle core; not once the peer worked
    assert widened == narrowed == reference  # two threads or one: the same tokens
    other.close()


def test_a_decode_engine_pauses_for_a_peer_that_wants_its_core(tiny, tmp_path, peer):
    table = tmp_path / "cores"
    prefill = CoreShare(1, table, cpus=2, pid=peer)  # a prefill worker on the host
    t = FakeTime()  # the pauses run on a fake clock: each lasts its whole budget, instantly
    share = CoreShare(1, table, cpus=2, clock=t.clock, sleep=t.sleep)

    async def scenario():
        lender = AsyncEngine(_core(tiny), "decode", core_share=share, borrow=False, lend=LendBudget(1.0, min_s=0.0))
        alone = AsyncEngine(_core(tiny), "alone")
        lender.start()
        alone.start()
        try:
            quiet = await generate(lender, "a")  # nobody wants its core
            lends_quiet, paused_quiet = lender.lends, share.lent_s
            assert lender.threads == 1  # borrow=False: its own prompt's steps never widen
            # the decode engine is idle, or finishing its last step and willing to lend: either way its core is
            # free within the bound (a bound, not a sleep: widen polls the table), and WANT stays up
            assert prefill.widen(wait_s=30.0) == 2
            paused = await generate(lender, "b")
            lends = lender.lends
            reference = await generate(alone, "c")
        finally:
            lender.stop()
            alone.stop()
        return quiet, lends_quiet, paused_quiet, paused, lends, reference

    quiet, lends_quiet, paused_quiet, paused, lends, reference = asyncio.run(scenario())
    assert lends_quiet == 0 and paused_quiet == 0.0
    # no pause before the prompt's own step (a request waiting for its first token), one before each later step
    assert 1 <= lends <= PARAMS.max_tokens - 1
    assert share.lent_s > 0
    assert quiet == paused == reference
    prefill.close()


def test_a_profile_sweep_runs_on_the_workers_own_threads_after_a_widened_step(tiny, tmp_path, monkeypatch):
    """`tandem profile` measures a worker's own speed: a sweep after a widened step (the engine thread then
    still holds the borrowed threads) runs on the base, and `ProfilePlan.threads` asks for more explicitly."""
    import torch

    from common.contract import ProfilePlan
    from worker_core import engine_loop

    seen: list[int] = []
    monkeypatch.setattr(engine_loop, "profile_steps", lambda core, plan: seen.append(torch.get_num_threads()) or [])
    engine = AsyncEngine(_core(tiny), "p", core_share=CoreShare(1, tmp_path / "cores", cpus=2))

    async def scenario():
        engine.start()
        try:
            await generate(engine, "a")  # a 297-token prompt on an idle host: widened onto the free core
            widened = engine.widened_steps
            await engine.call(lambda core: torch.set_num_threads(2))  # as a widened step leaves the thread
            engine._threads = 2
            await engine.profile(ProfilePlan.quick())
            await engine.profile(ProfilePlan(threads=2))
            after = await engine.call(lambda core: torch.get_num_threads())
        finally:
            engine.stop()
        return widened, after

    widened, after = asyncio.run(scenario())
    assert widened >= 1
    assert seen == [1, 2]  # the base, then the threads the plan asked for
    assert after == 2  # the engine's own count is put back
