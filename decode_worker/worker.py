"""DecodeWorker: the Ray actor around an EngineCore in the decode role.

Life cycle of a request inside a decode worker (`decode()` is a Ray streaming
generator; the router iterates it):

1. Replay. `add_remote_request` registers the request (WAITING_FOR_REMOTE_KV) and
   runs token 1, sampled by the prefill worker, through the same detokenizer and
   stop checks, so state and text equal a single-engine run. Token 1 is not
   streamed again (the router already sent it).
2. Admission. `allocate_remote_kv` takes blocks for the prompt, minus what this
   worker's own prefix cache already holds. Blocks are taken from the pool at
   once, so KV in flight is counted against admission. If the pool cannot hold
   them, the request waits for a finish, up to `admission_timeout_s`.
3. Pull. Every rank of this worker reads its layers and heads of the prompt's
   tokens from the prefill ranks that hold them (worker_core/rank_kv.py: a plan per
   (P worker, rank), bound to the block tables, converting TP / PP / block size /
   NHD-HND on the way), polled until DONE (at most `transfer_timeout_s`). The
   router ends P's lease once this worker streams.
   Admission and pull together end before P's lease does (the handle's `issued_at` +
   `lease_s`, less the transit so far and a margin): past it P may have handed the
   blocks to another request, so a late pull would read someone else's KV. Running
   out of lease while waiting for blocks is an AdmissionTimeoutError (a full decode
   pool: RESOURCE_EXHAUSTED); during the pull, a KVTransferFailedError, which the
   router retries elsewhere.
4. Join. `finish_remote_kv` counts the prompt as computed; the request joins the
   running batch at token 2 and its chunks stream back to the router.
5. Cancel or failure at any point: a transfer in flight is waited out of PENDING
   (or times out) and released BEFORE the blocks are freed, so memory NIXL may
   still write into is never handed to another request. Errors are typed
   (`common.errors`); the router turns them into gRPC statuses.

Time comes from the two clocks injected in the constructor only: `clock` (monotonic:
admission and lease deadlines, transfer timings, the first step's span) and `wall_clock`
(epoch seconds: what is left of P's lease, whose `issued_at` is P's wall clock; span
timestamps). The engine is driven through AsyncEngine's named methods
(worker_core/engine_loop.py); the request's span through worker_core/spans.py.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from opentelemetry import trace

from common import telemetry as tm
from common.contract import KVHandle, PrefillResult, StreamChunk, WorkerStatus
from common.errors import AdmissionTimeoutError, KVTransferFailedError
from common.sampling_params import SamplingParams
from worker_core.actor import WorkerActor
from worker_core.faults import FaultPoint
from worker_core.host import WorkerHost
from worker_core.settings import WorkerSettings
from worker_core.spans import RequestSpan

log = logging.getLogger(__name__)

MAX_REMEMBERED_ABORTS = 4096
LEASE_MARGIN_S = 1.0  # the pull ends this long before P's lease (or 10% of it, if shorter): clock skew, slack


def lease_left_s(kv: KVHandle, now_wall: float) -> float:
    """Seconds of P's lease on `kv` that this worker may still use (can be <= 0)."""
    transit = max(0.0, now_wall - kv.issued_at) if kv.issued_at else 0.0
    return kv.lease_s - transit - min(LEASE_MARGIN_S, 0.1 * kv.lease_s)


class DecodeWorker(WorkerActor):
    def __init__(
        self,
        settings: WorkerSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: monotonic seconds (deadlines, timings); `wall_clock`: epoch seconds (P's lease, span
        timestamps). Every time this worker reads comes from one of them."""
        if settings.role not in ("decode", "aggregated"):
            raise ValueError(f"DecodeWorker needs role 'decode' or 'aggregated', got {settings.role!r}")
        self.host = WorkerHost(settings)
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self._pulling: set[str] = set()  # request ids with a transfer in flight
        self._aborted: OrderedDict[str, None] = OrderedDict()  # aborted while pulling or before arriving
        # ran here and ended (finished, failed, cancelled): the router's cleanup abort that follows is not an
        # abort "before arriving", and must not refuse a later request that reuses the id
        self._ended: OrderedDict[str, None] = OrderedDict()

    # ---- requests -----------------------------------------------------------------------------------------------

    async def decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prefill: PrefillResult,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: list[int] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        await self.host.start()
        engine = self.host.engine
        if prefill.kv is None or prefill.first.finished:
            return  # token 1 ended it on P: nothing to decode
        if self._aborted.pop(request_id, 0) is None:
            return  # the router gave up on it before this call arrived
        stream = engine.open_stream(request_id)
        try:
            with RequestSpan(
                self.host.tracer,
                tm.SPAN_DECODE_WORKER,
                request_id,
                self.host.worker_id,
                len(prompt_ids),
                trace_ctx,
                tokens=1,
            ) as span:  # token 1 came from P
                first = prefill.first.token_ids[0]
                replay = await engine.add_remote_request(prompt_ids, params, request_id, first, prior_ids or ())
                if replay.finished:
                    return
                t0 = self.clock()
                pulled = await self._admit_and_pull(request_id, prefill, span.context)
                if self._aborted.pop(request_id, 0) is None:
                    return  # aborted mid-pull: the finally frees the blocks now that the transfer is released
                extra = {
                    "kv_transfer_s": self.clock() - t0,
                    "kv_transfer_bytes": pulled,
                    "cached_tokens": prefill.cached_tokens,
                }
                await engine.finish_remote_kv(request_id)
                joined_ns = self._wall_ns()
                async for chunk in self.host.chunks(stream, len(prompt_ids), extra):
                    if span.first_token():  # token 2, the first this worker computed: its wait in the batch + a step
                        self.host.tracer.start_span(
                            tm.SPAN_DECODE_FIRST_STEP, context=span.context, start_time=joined_ns
                        ).end(end_time=self._wall_ns())
                    span.count(chunk)
                    yield chunk
                    await self.host.faults.at(FaultPoint.STREAM)
        finally:
            await self.host.finish_stream(request_id)
            self._remember(self._ended, request_id)

    def _wall_ns(self) -> int:
        """Now on the wall clock, as the epoch nanoseconds OpenTelemetry spans use."""
        return int(self.wall_clock() * 1e9)

    async def _admit_and_pull(self, request_id: str, prefill: PrefillResult, context) -> int:
        """Blocks for the prompt, then its KV pulled into them; returns the bytes read."""
        engine = self.host.engine
        if prefill.kv is None:
            raise KVTransferFailedError(f"{request_id}: the prefill result carries no KV handle (token 1 ended it)")
        now = self.clock()
        lease_end = now + lease_left_s(prefill.kv, self.wall_clock())
        deadline = min(now + self.settings.admission_timeout_s, lease_end)
        admission = self.host.tracer.start_span(tm.SPAN_DECODE_ADMISSION, context=context)
        try:
            while True:
                slots = await engine.allocate_remote_kv(request_id)
                if slots is not None:
                    break
                left = deadline - self.clock()
                if left <= 0 or not await engine.wait_capacity(left):
                    if self.clock() >= lease_end:  # a full decode pool, like the admission timeout: not retried
                        raise AdmissionTimeoutError(
                            f"decode worker {self.host.worker_id} had no free KV blocks for {request_id} before "
                            f"the prefill worker's {prefill.kv.lease_s:.0f} s lease on its KV ran out; add decode "
                            "capacity, lower max_tokens or raise transport.lease_s"
                        )
                    raise AdmissionTimeoutError(
                        f"decode worker {self.host.worker_id} could not free KV blocks for {request_id} within "
                        f"{self.settings.admission_timeout_s:.0f} s; add decode capacity or lower max_tokens"
                    )
        except BaseException as exc:
            tm.record_error(admission, exc)
            raise
        finally:
            admission.end()
        dst_blocks, start = slots
        self._pulling.add(request_id)  # from here an abort lets the pull end first: the blocks stay this request's
        try:
            await self.host.faults.at(FaultPoint.BEFORE_PULL)
            return await self._pull(request_id, prefill, start, dst_blocks, lease_end - self.clock(), context)
        finally:
            self._pulling.discard(request_id)

    async def _pull(
        self,
        request_id: str,
        prefill: PrefillResult,
        first_block: int,
        dst_blocks: list[int],
        lease_left: float,
        context=None,
    ) -> int:
        if not dst_blocks:
            return 0  # the local prefix cache held the whole prompt
        if lease_left <= 0:
            raise KVTransferFailedError(
                f"the prefill worker's lease on the KV of {request_id} ran out before "
                f"decode worker {self.host.worker_id} could pull it"
            )
        kv = prefill.kv
        if kv is None:
            raise KVTransferFailedError(f"{request_id}: the prefill result carries no KV handle (token 1 ended it)")
        first_token = first_block * self.host.core.kv_spec.block_size
        peer = trace.get_current_span(tm.extract(kv.trace_context)).get_span_context()
        span = self.host.tracer.start_span(
            tm.SPAN_KV_TRANSFER,
            context=context,
            links=[trace.Link(peer)] if peer.is_valid else None,
            attributes={
                tm.ATTR_KV_BLOCKS: len(dst_blocks),
                tm.ATTR_KV_TRANSPORT: f"{self.settings.transport}/{self.settings.nixl_backend}",
                tm.ATTR_WORKER_ID: self.host.worker_id,
            },
        )
        t0 = self.clock()
        try:
            pulled = await self.host.pull(
                kv.agent_name,
                kv.block_ids,
                dst_blocks,
                kv.num_tokens,
                first_token,
                min(self.settings.transfer_timeout_s, lease_left),
            )
            seconds = self.clock() - t0
            span.set_attribute(tm.ATTR_KV_BYTES, pulled)
            span.set_attribute(tm.ATTR_KV_GBPS, pulled / seconds / 1e9 if seconds > 0 else 0.0)
            return pulled
        except BaseException as exc:
            tm.record_error(span, exc)
            raise
        finally:
            span.end()

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: list[int] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Aggregated mode, or a local prefill (conditional disaggregation, a resumed request): prefill
        and decode here. `prior_ids`: output already streamed elsewhere (see EngineCore.resume)."""
        try:
            async for chunk in self.host.generate(request_id, prompt_ids, params, trace_ctx, prior_ids):
                yield chunk
        finally:
            self._remember(self._ended, request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort in any state. A request mid-pull is aborted by cancelling its `decode` stream instead."""
        await self.host.start()
        if request_id in self._pulling:
            self._aborted[request_id] = None  # the stream frees it once the transfer is out of PENDING
            return True
        aborted = await self.host.engine.abort(request_id)
        if not aborted and self._ended.pop(request_id, 0) is not None:  # not here yet (not ended here):
            self._remember(self._aborted, request_id)  # refuse it if its decode call arrives later
        return aborted

    @staticmethod
    def _remember(ids: OrderedDict[str, None], request_id: str) -> None:
        ids[request_id] = None
        ids.move_to_end(request_id)
        while len(ids) > MAX_REMEMBERED_ABORTS:
            ids.popitem(last=False)

    # ---- facts, peers, checks -----------------------------------------------------------------------------------

    async def ready(self) -> WorkerStatus:
        await self.host.start()
        return await self.status()

    async def status(self) -> WorkerStatus:
        return await self.host.status(transfers_in_flight=len(self._pulling))

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self.host.wait_idle(timeout_s, extra_busy=lambda: bool(self._pulling))

    async def shutdown(self) -> None:
        self.host.close()
