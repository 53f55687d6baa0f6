"""Draining a worker out of the router (GenerationService.drain_worker) with real in-process workers.

- a drain that times out aborts, on a prefill worker, only the prompts it is still
  computing: a prompt already leased may be mid-pull on a decode worker, and aborting it
  would free blocks under the READ; the worker then leaves the pool, the index and the feed
- a drain that is cancelled part way puts the worker back in service
"""

from __future__ import annotations

import asyncio

import pytest

from common.sampling_params import SamplingParams
from router.attempts import Attempt, Run
from router.pools import WorkerPool
from router.responses import RequestTrace
from router.server import GenerationService
from router.validation import ValidatedRequest
from tests.helpers.fake_workers import FakeWorker
from tests.helpers.inprocess_workers import InProcessClient, new_worker
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("drain"), "llama", vocab_size=512))


def recording(tiny: str, wid: str) -> FakeWorker:
    """A real in-process prefill worker; the fake in front of it records every call (`request_ids("abort")`)."""
    return FakeWorker(wid, "prefill", inner=InProcessClient(new_worker(tiny, wid)))


def service_with(p0: FakeWorker, p1: FakeWorker) -> GenerationService:
    # d0: a decode worker; these tests make no call to it
    return GenerationService(
        validator=None,
        prefill=WorkerPool("prefill", [p0, p1], "kv", block_size=4),
        decode=WorkerPool("decode", [FakeWorker("d0")], "kv", block_size=4),
        cleanup_timeout_s=0.2,
    )


def run_on(service: GenerationService, rid: str, p, d, prefill_done: bool) -> None:
    attempt = Attempt(rid, [], p=p, d=d, prefill_sent=True, prefill_done=prefill_done, kv_leased=prefill_done)
    run = Run(
        ValidatedRequest(rid, [], SamplingParams(), "token_ids"),
        RequestTrace(received=0.0, prompt_tokens=8),
        attempt=attempt,
    )
    service._active[rid] = run


def test_timed_out_prefill_drain_aborts_only_prompts_still_computing(tiny):
    async def scenario():
        p0, p1 = recording(tiny, "p0"), recording(tiny, "p1")
        service = service_with(p0, p1)
        d0 = service.decode.client("d0")
        run_on(service, "computing", p0, d0, prefill_done=False)
        run_on(service, "leased", p0, d0, prefill_done=True)  # D may be pulling it right now
        run_on(service, "elsewhere", p1, d0, prefill_done=False)
        with service.prefill.track("p0"):  # the computing prompt's call is open: the drain cannot finish
            drained = await service.drain_worker("p0", timeout_s=0.05)
        assert drained is False
        assert p0.request_ids("abort") == ["computing"] and p1.request_ids("abort") == []
        assert "p0" not in service.prefill and "p1" in service.prefill
        assert service.prefill.eligible()[0].worker_id == "p1"
        for w in (p0.inner.worker, p1.inner.worker):
            await w.shutdown()

    asyncio.run(scenario())


def test_cancelled_drain_puts_the_worker_back(tiny):
    async def scenario():
        p0, p1 = recording(tiny, "p0"), recording(tiny, "p1")
        service = service_with(p0, p1)
        with service.prefill.track("p0"):
            task = asyncio.create_task(service.drain_worker("p0", timeout_s=60))
            while not service.prefill.slot("p0").draining:
                await asyncio.sleep(0)  # let the drain start (one loop turn, no wall-clock wait)
            assert [s.worker_id for s in service.prefill.eligible()] == ["p1"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        slot = service.prefill.slot("p0")
        assert not slot.draining and slot.eligible and p0.request_ids("abort") == []
        for w in (p0.inner.worker, p1.inner.worker):
            await w.shutdown()

    asyncio.run(scenario())


def test_an_abort_racing_token_one_hands_off_no_lease(tiny):
    """abort() lands after the step that leased the prompt's blocks but before prefill() read that
    step's output: prefill() must not hand the (already released) blocks to a decode worker. It raises
    WorkerShuttingDownError (the router retries elsewhere), leaves no lease to expire, leaks nothing."""
    from common.errors import WorkerShuttingDownError
    from common.sampling_params import SamplingParams
    from worker_core.faults import FaultPoint, Hold, WorkerFaultPlan

    async def scenario():
        p = new_worker(tiny, "p0", fault_injection=True)
        await p.set_fault_plan(WorkerFaultPlan(holds=(Hold(FaultPoint.PREFILL),)))
        call = asyncio.create_task(p.prefill("r", list(range(5, 25)), SamplingParams(max_tokens=4, ignore_eos=True)))
        assert await p.fault_reached(FaultPoint.PREFILL.value, 10)
        for _ in range(100):  # each call waits for the engine's current step: the prompt's lease appears
            if await p.host.engine.call(lambda c: "r" in c.leases):
                break
        else:
            pytest.fail("the prompt was never leased")
        assert await p.abort("r")
        await p.release_faults()
        with pytest.raises(WorkerShuttingDownError, match="aborted r before handing its KV off"):
            await call
        assert p._leases == {} and await p.reap_expired(float("inf")) == [] and p.expired_leases == 0
        await p.host.leak_check()
        await p.shutdown()

    asyncio.run(scenario())
