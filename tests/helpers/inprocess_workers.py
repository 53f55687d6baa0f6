"""Real workers in this process behind the router's WorkerClient protocol (no Ray).

`new_worker` builds a PrefillWorker (transport "none": no NIXL; `generate` runs a request
start to finish, as conditional disaggregation does) on a tiny model; `InProcessClient`
is the router's WorkerClient implemented by awaiting that object's methods, with `down`
to fail every call the way a dead Ray actor does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from common.contract import KVEventsReply, PrefillResult, StreamChunk, WorkerStatus
from common.kv_events import KVSnapshot
from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from prefill_worker.worker import PrefillWorker
from router.errors import WorkerUnavailableError
from worker_core.host import WorkerSettings
from worker_core.kv_publisher import KVEventPublisher

BS = 4  # small blocks: short prompts make several events
NUM_BLOCKS = 64


def new_worker(
    tiny: str, wid: str, publisher_capacity: int | None = None, fault_injection: bool = False
) -> PrefillWorker:
    engine = EngineConfig(
        model=tiny,
        dtype="float32",
        cache=CacheConfig(block_size=BS, num_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_batched_tokens=8),
    )  # chunked prefill: an event per chunk
    worker = PrefillWorker(
        WorkerSettings(worker_id=wid, role="prefill", transport="none", engine=engine, fault_injection=fault_injection)
    )
    if publisher_capacity is not None:  # a router that falls behind a small buffer loses events
        worker.host.publisher = KVEventPublisher(wid, capacity=publisher_capacity)
        worker.host.engine.on_kv_events = worker.host.publisher.publish
    return worker


class InProcessClient:
    """The router's WorkerClient over a worker object in this process; `down` makes every call fail
    the way a dead Ray actor does (WorkerUnavailableError). The worker is a prefill worker: `decode`
    is the one call it cannot answer (an AssertionError)."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker
        self.worker_id = worker.host.worker_id
        self.down = False

    async def _check(self) -> None:
        await asyncio.sleep(0)  # a remote call always suspends; without it a feed that spins would starve the loop
        if self.down:
            raise WorkerUnavailableError(f"worker {self.worker_id} is unavailable: actor died (test)", self.worker_id)

    async def prefill(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> PrefillResult:
        await self._check()
        return await self.worker.prefill(request_id, list(prompt_ids), params, trace_ctx, list(prior_ids))

    def decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prefill: PrefillResult,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        raise AssertionError(f"{self.worker_id} is a prefill worker: it has no decode")

    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        await self._check()
        async for chunk in self.worker.generate(request_id, list(prompt_ids), params, trace_ctx, list(prior_ids)):
            yield chunk

    async def abort(self, request_id: str) -> bool:
        await self._check()
        return await self.worker.abort(request_id)

    async def release(self, request_id: str) -> bool:
        await self._check()
        return await self.worker.release(request_id)

    async def status(self) -> WorkerStatus:
        await self._check()
        return await self.worker.status()

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply:
        await self._check()
        return await self.worker.kv_events(after_seq, timeout_s)

    async def kv_snapshot(self) -> KVSnapshot:
        await self._check()
        return await self.worker.kv_snapshot()

    async def wait_idle(self, timeout_s: float) -> bool:
        await self._check()
        return await self.worker.wait_idle(timeout_s)
