"""PrefillWorker: the Ray actor around an EngineCore in the prefill role.

Life cycle of a request inside a prefill worker:

1. `prefill(id, prompt_ids, params)` adds it with `kv_handoff=True`. It queues with
   every other prompt (token budget, chunked prefill, prefix cache as usual).
2. The step that computes the last prompt token samples token 1, through the usual
   stop checks. If token 1 already ends the request (EOS, max_tokens=1, a stop
   string), its blocks are freed at once and the result carries no KV handle.
3. Otherwise the prompt's blocks become a lease (engine state KV_LEASED, blocks
   untouchable) and `PrefillResult(token 1, KVHandle(block ids))` goes back to
   the router, which streams token 1 to the client without waiting any further.
4. Each rank of the decode worker READs what it needs from the ranks of this
   worker that hold it. Once D streams, the router calls `release(id)`: blocks go
   back to the pool, the full ones stay in the prefix cache. (A NIXL notification
   carrying the request id ends a lease the same way.)
5. A lease nobody pulls ends after `lease_s` (default 30 s): decode died, or the
   client went away. The router also calls `release(id)` on any failure or cancel.
   `abort(id)` frees everything in any state.

Housekeeping (notifications + lease expiry) runs as one asyncio task that polls
only while leases exist. Time comes from the injected clocks only: `clock` (monotonic:
lease expiry, prefill_s), `wall_clock` (the KV handle's `issued_at`, which the decode
worker compares with its own wall clock), so tests drive expiry by calling
`reap_expired()` instead of waiting. The engine is driven through AsyncEngine's named
methods (worker_core/engine_loop.py); spans through worker_core/spans.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from common import telemetry as tm
from common.contract import KVHandle, PrefillResult, Role, StreamChunk, WorkerStatus
from common.errors import WorkerShuttingDownError
from common.sampling_params import SamplingParams
from worker_core.actor import WorkerActor
from worker_core.faults import FaultPoint
from worker_core.host import WorkerHost, to_chunk
from worker_core.settings import WorkerSettings
from worker_core.spans import RequestSpan

log = logging.getLogger(__name__)

NOTIFY_POLL_S = 0.001  # notification poll period while leases are outstanding


class PrefillWorker(WorkerActor):
    def __init__(
        self,
        settings: WorkerSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: monotonic seconds (lease expiry, timings); `wall_clock`: epoch seconds (a KV handle's
        `issued_at`). Every time this worker reads comes from one of them."""
        if settings.role != Role.PREFILL:
            raise ValueError(f"PrefillWorker needs role 'prefill', got {settings.role!r}")
        self.host = WorkerHost(settings)
        self.clock = clock
        self.wall_clock = wall_clock
        self.lease_s = settings.lease_s
        self._leases: dict[str, float] = {}  # request id -> expiry (clock time)
        self._lease_added = asyncio.Event()
        self._housekeeper: asyncio.Task | None = None
        self.expired_leases = 0  # leases ended by expiry, not by a pull (observability)
        self._prefilling: set[str] = set()  # prefill() calls waiting for token 1
        self._aborted_prefills: set[str] = set()  # ... of which aborted meanwhile

    async def _start(self) -> None:
        await self.host.start()
        if self._housekeeper is None:
            self._lease_added = asyncio.Event()
            self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())

    # ---- requests -----------------------------------------------------------------------------------------------

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: list[int] | None = None,
    ) -> PrefillResult:
        """Token 1 and a lease on the prompt's KV. `prior_ids`: output the request already streamed
        (resumed after a failure): prompt + them is prefilled and the token after them is returned."""
        await self._start()
        t0 = self.clock()
        engine = self.host.engine
        span = RequestSpan(
            self.host.tracer, tm.SPAN_PREFILL_WORKER, request_id, self.host.worker_id, len(prompt_ids), trace_ctx
        )
        stream = engine.open_stream(request_id)
        self._prefilling.add(request_id)
        try:
            await engine.add_request(prompt_ids, params, request_id, kv_handoff=True, prior_output_ids=prior_ids or ())
            await self.host.faults.at(FaultPoint.PREFILL)
            out = await stream.get()
            if isinstance(out, BaseException):
                raise out
            # aborted here (a drain that timed out, the router's cleanup): before token 1, the engine sent
            # an "abort" output; after it, the abort already released the lease this output announces
            if request_id in self._aborted_prefills or out.finish_reason == "abort":
                raise WorkerShuttingDownError(
                    f"prefill worker {self.host.worker_id} aborted {request_id} before "
                    "handing its KV off (drained or cancelled); retry elsewhere"
                )
        except BaseException as exc:
            engine.close_stream(request_id)
            span.fail(exc)
            await self._abort_quietly(request_id)
            raise
        finally:
            self._prefilling.discard(request_id)
            self._aborted_prefills.discard(request_id)
        engine.close_stream(request_id)
        first = to_chunk(out)
        first.prompt_tokens = len(prompt_ids)
        span.engine_children(out)
        span.set_attribute(tm.ATTR_CACHED_INPUT_TOKENS, out.num_cached_tokens)
        kv = None
        if out.kv_block_ids is not None:
            self._leases[request_id] = self.clock() + self.lease_s
            self._lease_added.set()
            span.set_attribute(tm.ATTR_KV_BLOCKS, len(out.kv_block_ids))
            kv = KVHandle(
                self.host._need_kv().agent_name,
                list(out.kv_block_ids),
                len(prompt_ids) + len(prior_ids or ()),
                self.lease_s,
                issued_at=self.wall_clock(),
                trace_context=tm.inject(span.context),
            )
        span.end()
        return PrefillResult(
            first=first,
            kv=kv,
            prefill_s=self.clock() - t0,
            worker_id=self.host.worker_id,
            cached_tokens=out.num_cached_tokens,
        )

    async def release(self, request_id: str) -> bool:
        """End a lease (idempotent); False if there was none."""
        await self._start()
        self._leases.pop(request_id, None)
        return await self.host.engine.release_kv(request_id)

    async def abort(self, request_id: str) -> bool:
        await self._start()
        if request_id in self._prefilling:  # its prefill() must not hand off a lease this abort ends
            self._aborted_prefills.add(request_id)
        self._leases.pop(request_id, None)
        return await self.host.engine.abort(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except Exception:  # noqa: BLE001 - cleanup after another failure; the first error is what matters
            log.warning("abort of %s after a failed prefill failed too", request_id, exc_info=True)

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: list[int] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Aggregated use of a prefill worker: the whole request here (conditional disaggregation)."""
        await self._start()
        async for chunk in self.host.generate(request_id, prompt_ids, params, trace_ctx, prior_ids):
            yield chunk

    # ---- leases -------------------------------------------------------------------------------------------------

    async def reap_expired(self, now: float | None = None) -> list[str]:
        """Release every lease past its expiry as of `now` (default: the worker's clock; a test passes a
        later time instead of waiting); returns their ids."""
        now = self.clock() if now is None else now
        expired = [rid for rid, deadline in self._leases.items() if deadline <= now]
        for rid in expired:
            log.warning("KV lease of %s expired after %.1f s without a pull; releasing", rid, self.lease_s)
            self.expired_leases += 1
            await self.release(rid)
        return expired

    async def _handle_notifications(self) -> None:
        if self.host.kv is None:
            return
        for _peer, payload in self.host.kv.transport.notifications():
            rid = payload.decode("utf-8", "replace")
            if rid in self._leases:
                await self.release(rid)

    async def _housekeeping(self) -> None:
        while True:
            try:
                if not self._leases:
                    self._lease_added.clear()
                    await self._lease_added.wait()
                await self._handle_notifications()
                await self.reap_expired()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - housekeeping must outlive one bad notification
                log.exception("prefill housekeeping failed; continuing")
            await asyncio.sleep(NOTIFY_POLL_S)

    # ---- facts, peers, checks -----------------------------------------------------------------------------------

    async def ready(self) -> WorkerStatus:
        await self._start()
        return await self.status()

    async def status(self) -> WorkerStatus:
        await self._start()
        return await self.host.status()

    async def wait_idle(self, timeout_s: float) -> bool:
        await self._start()
        return await self.host.wait_idle(timeout_s)

    async def shutdown(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        self.host.close()
