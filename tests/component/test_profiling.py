"""`profile_steps` (worker_core/profiling.py) on a tiny random-weight model.

- With a clock that advances by a known step model at each step, the fit of what the sweep recorded
  gives that model back: the features are what the engine computed and the sweep exercises all five
  terms (prompt tokens, attention with a cached context, decode rows, their context, mixed steps).
- Exactly the plan's warm-up steps are left out; real-clock timings are positive.
- The block pool is intact and empty afterwards; the prefix cache holds nothing of the synthetic prompts.
- A busy engine (a queued request, a KV lease of a prefill-role request) is refused and left as it was;
  once the lease is released, the same core profiles; through a PrefillWorker's actor method too.
"""

from __future__ import annotations

import asyncio
import inspect

import msgspec
import pytest
import torch

from common.contract import ProfilePlan, WorkerAPI
from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine_core import EngineCore
from planner.model import StepSample, StepShape, fit_step_model
from tests.helpers.tiny_models import make_tiny_hf_model
from worker_core.host import WorkerSettings
from worker_core.profiling import ProfileBusyError, profile_steps

BS = 4
NUM_BLOCKS = 256
KNOWN = (0.01, 1e-4, 1e-7, 2e-3, 1e-6)  # base, per prompt token, per attention pair, per decode row, per context


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("profiling"), "llama", vocab_size=512))


def engine_config(tiny: str) -> EngineConfig:
    return EngineConfig(
        model=tiny,
        dtype="float32",
        cache=CacheConfig(block_size=BS, num_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8),
    )


@pytest.fixture
def core(tiny):
    return EngineCore(engine_config(tiny))


class ModelClock:
    """A clock read right before and right after each step: the read after advances it by KNOWN's time of
    the step the engine just ran (its last_step_features)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:
            f = self.core.last_step_features
            self.now += KNOWN[0] + sum(c * x for c, x in zip(KNOWN[1:], f))
        return self.now


def assert_empty(core: EngineCore) -> None:
    core.check_integrity()
    core.leak_check()
    assert core.kv_manager.num_free_blocks == NUM_BLOCKS
    assert core.kv_manager.pool.num_cached_blocks == 0  # the synthetic prompts are forgotten


def test_the_fit_of_the_recorded_steps_gives_the_model_back(core):
    samples = profile_steps(core, ProfilePlan.quick(), clock=ModelClock(core))
    model = fit_step_model([StepSample(StepShape(*s[:4]), s[4]) for s in samples])
    for got, want in zip(model.coefficients(), KNOWN):
        assert got == pytest.approx(want, rel=1e-4)
    assert model.rel_error_p90 < 1e-6
    shapes = [StepShape(*s[:4]) for s in samples]
    assert any(s.prefill_tokens and s.attn_pairs > s.prefill_tokens * (s.prefill_tokens + 1) / 2 for s in shapes)
    assert any(s.prefill_tokens and s.decode_seqs for s in shapes)  # mixed
    assert {s.decode_seqs for s in shapes if not s.prefill_tokens} >= {1, 4, 8}
    assert_empty(core)


def test_warmup_steps_are_left_out_and_real_times_are_positive(core):
    plan = ProfilePlan.quick()
    real_step, steps = core.step, []

    def counting_step():
        steps.append(1)
        return real_step()

    core.step = counting_step
    samples = profile_steps(core, plan)
    assert len(steps) - len(samples) == plan.warmup_steps
    assert all(s[4] > 0 for s in samples)
    assert_empty(core)


def test_points_that_do_not_fit_are_left_out(core):
    plan = ProfilePlan(
        warmup_steps=0,
        prefill_lengths=(16, 512, 4096),  # 512: above the token budget; 4096: above the context (2048)
        prefill_repeats=1,
        cached=((2000, 100),),
        decode_contexts=(960,),  # 8 rows of 960 tokens do not fit 256 blocks of 4: one does
        decode_batches=(1, 8),
        decode_steps=1,
        mixed=(),
    )
    samples = profile_steps(core, plan, clock=ModelClock(core))
    prefills = [s[0] for s in samples if not s[2]]
    assert prefills == [16]  # the decode sweep's rows are admitted with their KV, not prefilled
    assert {s[2] for s in samples if not s[0]} == {1}
    assert_empty(core)


def test_decode_rows_read_blocks_of_their_own(core):
    """Rows sharing one cached prefix would read the same blocks (hot in the CPU's caches): a served decode
    worker's rows each read their own, and so must the sweep's."""
    real_step, checked = core.step, []

    def step():
        running = [r.request_id for r in core.scheduler.running]
        if len(running) > 1:
            blocks = [core.kv_manager.block_ids(rid) for rid in running]
            assert len({b for bl in blocks for b in bl}) == sum(len(bl) for bl in blocks)
            checked.append(len(running))
        return real_step()

    core.step = step
    samples = profile_steps(core, ProfilePlan.quick(), clock=ModelClock(core))
    assert max(checked) == 8
    assert any(32 <= s[3] / s[2] < 48 for s in samples if s[2] == 8 and not s[0])  # 8 rows of 32 tokens and up
    assert_empty(core)


def test_a_busy_engine_is_refused_and_left_as_it_was(core):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    core.add_request(list(range(10, 30)), params, "queued")
    with pytest.raises(ProfileBusyError, match="1 waiting requests"):
        profile_steps(core, ProfilePlan.quick())
    assert core.get_request("queued") is not None
    core.abort_request("queued")

    # a prefill-role request: after token 1 its blocks are leased until released
    core.add_request(list(range(10, 30)), params, "leased", kv_handoff=True)
    while core.has_unfinished_requests():
        core.step()
    assert "leased" in core.leases
    with pytest.raises(ProfileBusyError, match="1 KV leases"):
        profile_steps(core, ProfilePlan.quick())
    assert "leased" in core.leases
    core.release_kv("leased")
    assert profile_steps(core, ProfilePlan.quick(), clock=ModelClock(core))
    assert_empty(core)


def test_a_prefill_worker_profiles_through_its_actor_method(tiny):
    from prefill_worker.worker import PrefillWorker

    worker = PrefillWorker(
        WorkerSettings(worker_id="prefill-0", role="prefill", transport="none", engine=engine_config(tiny))
    )
    engine = worker.host.engine
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def scenario() -> tuple[list, list]:
        try:
            await worker.status()  # starts the engine thread
            stream = engine.open_stream("r")
            await engine.add_request(list(range(10, 30)), params, "r", kv_handoff=True)
            first = await stream.get()
            assert first.kv_block_ids  # leased
            with pytest.raises(ProfileBusyError):
                await worker.profile(ProfilePlan.quick())
            assert await worker.release("r")
            samples = await worker.profile(ProfilePlan.quick())
            await worker.leak_check()
            # a widened sweep (tandem profile measures a prefill on a lent core so): the same steps, on two
            # threads, and the engine thread's own count afterwards
            own = await engine.call(lambda core: torch.get_num_threads())
            wide = await worker.profile(msgspec.structs.replace(ProfilePlan.quick(), threads=own + 1))
            assert await engine.call(lambda core: torch.get_num_threads()) == own
            await worker.leak_check()
            return samples, wide
        finally:
            await worker.shutdown()

    samples, wide = asyncio.run(scenario())
    assert samples and all(len(s) == 5 and s[4] > 0 for s in samples)
    assert [s[:4] for s in wide] == [s[:4] for s in samples]


def test_both_roles_answer_profile_as_the_contract_declares():
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker

    declared = list(inspect.signature(WorkerAPI.profile).parameters)
    for actor in (PrefillWorker, DecodeWorker):
        # Ray adds `_ray_trace_ctx` to actor methods once tracing is set up in this process (an e2e test before)
        params = [n for n in inspect.signature(actor.profile).parameters if n != "_ray_trace_ctx"]
        assert params == declared
