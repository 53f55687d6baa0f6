"""The gRPC front door: `GenerationService` (tandem.v1.Generation); router/grpc_port.py binds it to a port.

Life of one Generate call:

    1. admission     not serving yet -> UNAVAILABLE; `max_inflight` requests already
                     in flight -> RESOURCE_EXHAUSTED ("... retry later")
    2. validation    RequestValidator: prompt ids + SamplingParams + request id
                     (INVALID_ARGUMENT with a message that says what to change)
    3. routing       router/routing.py picks D, and P or "local" (conditional
                     disaggregation); the first response says which and why (`route`)
       remote        P.prefill -> first chunk, streamed at once (prefill_worker and
                     decode_worker set on it); unless it finished the request,
                     D.decode streams the rest, from token 2.
       local         D.generate streams every chunk (aggregated mode: always)
    4. last chunk    carries usage and timings (TTFT, total, queue, prefill, KV pull)

The prefix indexes behind routing are fed by the workers' KV events
(router/kv_feed.py, started by `start_feeds`); the router books what it routes
(queued prefill tokens, KV in flight, predicted blocks) until the request's first
decode chunk, and `close` clears a request's booking on every path.

Every wait runs under one asyncio timeout: the client's deadline
(`context.time_remaining()`) capped by `request_timeout_s`. Expiry ends the call
with DEADLINE_EXCEEDED and a message naming the stage it was in. A client that
goes away cancels the handler task: cleanup runs and CancelledError is re-raised.

Cleanup (every non-success path: error, timeout, cancel): D.abort(rid) first, then
P.abort(rid) if prefill had not returned or P.release(rid) if P still holds the
prompt's KV under a lease (D first, so P never frees blocks D is still pulling
for a live request). Each call is bounded by `cleanup_timeout_s`; errors are
logged, never raised; the cleanup runs in its own task, shielded from a second
cancellation. On success, P's lease is released (in the background) as soon as D's
first chunk arrives: D streams only once every one of its ranks has pulled.

Failover: the request runs as attempts. A worker that dies or restarts, a KV pull
that fails or runs out of lease, a stream silent for `stream_idle_timeout_s`: the
attempt is undone and the next one resumes after the tokens already sent (workers
prefill prompt + those tokens), so the client's stream goes on with nothing
repeated or missing; at most `max_retries`, waiting up to `failover_wait_s` for a
worker to resume on, all inside the request's deadline (router/README.md has the
table). Restarted workers rejoin through `refresh_health` and the `rejoin` hook.

Other worker-side failures: a chunk with `error` set (finish_reason "error") ends
the call with INTERNAL and the worker's one-line message; retries used up end it
with the last failure's status (UNAVAILABLE for a dead worker). FINISH_REASON_ERROR
is never sent by this version: a client learns of failure from the status, which
every gRPC client checks, not from a field it might ignore. Tokens already
streamed stay valid output. See router/errors.py for the whole status table.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2

from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import telemetry as tm
from common.errors import KVTransferFailedError
from common.telemetry import Tracing, TracingConfig, setup_tracing
from common.wire import StreamChunk, WorkerStatus
from router.errors import (
    AdmissionError,
    NoHealthyWorkerError,
    NotServingError,
    WorkerStalledError,
    RequestValidationError,
    WorkerFailedError,
    WorkerUnavailableError,
    one_line,
    status_for,
)
from router.attempts import Attempt, Run, retry_reason
from router.grpc_port import SERVICE_NAME, Undecodable
from router.kv_feed import KVEventFeed
from router.metrics import RouterMetrics
from router.pools import WorkerPool, WorkerReport, WorkerSlot, worker_reports
from router.responses import RequestTrace, ServerFacts, chunk_response, server_info
from router.routing import Route, Router, RoutingConfig
from router.validation import RETRY_ID_MARKER, RequestValidator
from router.workers import WorkerClient
from tandem_api.v1 import generation_pb2 as pb
from tandem_api.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# ending P's lease once D streams: behind a long engine step under load this can take seconds, and
# nothing waits for it (the lease itself is the backstop), so it gets longer than other cleanup calls
RELEASE_TIMEOUT_S = 60.0
ServerInfoSource = Callable[[], ServerFacts]


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 that starts NOT_SERVING for "" and tandem.v1.Generation (the stock one starts "" SERVING)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("", SERVICE_NAME):
            self._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING


class GenerationService(pb_grpc.GenerationServicer):
    """tandem.v1.Generation over worker pools. `prefill=None` means aggregated mode (`decode` holds W)."""

    def __init__(self, *, validator: RequestValidator, decode: WorkerPool, prefill: WorkerPool | None = None,
                 info_source: ServerInfoSource, max_inflight: int = 256, request_timeout_s: float = 600.0,
                 cleanup_timeout_s: float = 5.0, status_timeout_s: float = 2.0,
                 routing: RoutingConfig | None = None, rng: random.Random | None = None,
                 metrics: RouterMetrics | None = None, tracing: Tracing | None = None,
                 retry_after_ms: int = 1000, max_retries: int = 3, failover_wait_s: float = 30.0,
                 stream_idle_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.validator, self.prefill, self.decode, self.info_source = validator, prefill, decode, info_source
        self.router = Router(decode, prefill, routing or RoutingConfig(policy=decode.policy), rng)
        self.feed = KVEventFeed(self._on_down)
        self._feeding = False
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.metrics.in_flight.set_function(lambda: len(self._active))
        self.metrics.workers_source = self._worker_states
        self.metrics_port: int | None = None  # set by deploy when it serves /metrics
        self.tracing = tracing if tracing is not None else setup_tracing(TracingConfig())  # off: a no-op tracer
        self.tracer = self.tracing.tracer
        self.retry_after_ms = retry_after_ms  # RESOURCE_EXHAUSTED carries it (grpc-retry-pushback-ms)
        if max_retries < 0 or failover_wait_s < 0:
            raise ValueError(f"max_retries and failover_wait_s must be >= 0, got {max_retries}, {failover_wait_s}")
        self.max_retries, self.failover_wait_s = max_retries, failover_wait_s
        self.stream_idle_timeout_s = stream_idle_timeout_s  # 0: off
        self._workers_changed = asyncio.Event()  # set (and replaced) when a worker comes up or joins
        # deploy sets it: handshakes a worker Ray restarted with its peers (async, raises on failure)
        self.rejoin: Callable[[str], Awaitable[None]] | None = None
        self._rejoining: dict[str, asyncio.Task] = {}  # worker id -> its rejoin under way
        self.max_inflight, self.request_timeout_s = max_inflight, request_timeout_s
        self.cleanup_timeout_s, self.status_timeout_s, self._clock = cleanup_timeout_s, status_timeout_s, clock
        self.health = _Health()
        self.serving = False
        self._active: dict[str, Run] = {}
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self._cleanups: set[asyncio.Task] = set()

    @property
    def mode(self) -> str:
        return "aggregated" if self.prefill is None else "disaggregated"

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        return tuple(p for p in (self.prefill, self.decode) if p is not None)

    def _worker_states(self) -> list[tuple[str, str, object, bool]]:
        """(role, worker id, last status, eligible) of every worker, for the metrics scrape."""
        return [(pool.role, s.worker_id, s.status, s.eligible) for pool in self.pools for s in pool.slots]

    def _on_down(self, pool: WorkerPool, worker_id: str, reason: str) -> None:
        """A worker failed a call or its health check: no request goes there, and its cache is forgotten."""
        pool.set_health(worker_id, False, reason)
        self.router.index_of(pool).forget(worker_id)

    async def start_feeds(self) -> None:
        """Follow every worker's KV events (deploy calls this once serving; tests may leave it off)."""
        self._feeding = True
        for pool in self.pools:
            self.feed.follow_pool(self.router.index_of(pool))

    # -- pools that grow and shrink ----------------------------------------------------------------

    def pool_of(self, worker_id: str) -> WorkerPool:
        for pool in self.pools:
            if worker_id in pool:
                return pool
        raise KeyError(f"no worker {worker_id!r} in the router's pools")

    def add_worker(self, pool: WorkerPool, client: WorkerClient, incarnation: str = "") -> None:
        """A new worker (loaded and handshaken) starts taking requests. `incarnation`: the process that was
        handshaken (its WorkerStatus.incarnation), so that a restart before the first health check is seen."""
        slot = pool.add(client)
        slot.incarnation = incarnation
        if self._feeding:
            self.feed.follow(self.router.index_of(pool), slot)
        self._notify_workers()

    def _notify_workers(self) -> None:
        """Wake retries waiting for a worker to resume on."""
        changed, self._workers_changed = self._workers_changed, asyncio.Event()
        changed.set()

    async def drain_worker(self, worker_id: str, timeout_s: float) -> bool:
        """Take a worker out of service: no new requests; waits up to timeout_s for its running ones
        (then aborts them); its KV leases end; it leaves the pool and the index. True if it drained in time.
        A failure part way puts the worker back in service."""
        pool = self.pool_of(worker_id)
        slot = pool.drain(worker_id)
        try:
            drained = await self._drain(pool, slot, timeout_s)
        except BaseException:
            slot.draining = False
            raise
        pool.remove(worker_id)
        await self.feed.unfollow(worker_id)
        self.router.index_of(pool).forget(worker_id)
        return drained

    async def _drain(self, pool: WorkerPool, slot: WorkerSlot, timeout_s: float) -> bool:
        worker_id = slot.worker_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        drained = await pool.wait_drained(worker_id, timeout_s)
        if not drained:
            # a prefill worker: only prompts it is still computing (a leased one may be mid-pull on D,
            # and aborting it would free blocks under the READ); a decode worker: everything on it
            attempts = [run.attempt for run in self._active.values() if run.attempt is not None]
            stuck = [a.rid for a in attempts
                     if (a.d is not None and a.d.worker_id == worker_id)
                     or (a.p is not None and a.p.worker_id == worker_id and not a.prefill_done)]
            log.warning("drain of %s timed out after %.1f s; aborting %d request(s)", worker_id, timeout_s, len(stuck))
            await asyncio.gather(*(self._quietly(slot.client, "abort", rid) for rid in stuck))
            await pool.wait_drained(worker_id, self.cleanup_timeout_s)
        try:  # a prefill worker's leases: decode may still be pulling a prompt it computed
            wait = max(deadline - loop.time(), self.cleanup_timeout_s)
            async with asyncio.timeout(wait + self.cleanup_timeout_s):
                drained = await slot.client.wait_idle(wait) and drained
        except Exception as exc:  # noqa: BLE001 - the worker is being removed either way
            log.warning("%s did not report idle before removal: %s: %s", worker_id, type(exc).__name__, exc)
        return drained

    async def set_serving(self, serving: bool = True) -> None:
        """Deploy calls this once the pools are ready (and with False to drain)."""
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    # -- Generate ---------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # one trace per request, continued from the gateway's traceparent when it sent one
        parent = tm.extract(context.invocation_metadata())
        with self.tracer.start_as_current_span(
                tm.SPAN_GENERATE, context=parent, kind=SpanKind.SERVER, record_exception=False,
                set_status_on_exception=False,
                attributes={tm.ATTR_RPC_SYSTEM: "grpc", tm.ATTR_RPC_METHOD: "Generate",
                            tm.ATTR_OPERATION: "text_completion"}) as span:
            code = await self._generate(request, context, span)
            span.set_attribute(tm.ATTR_RPC_STATUS, code)
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, code))

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span) -> str:
        """Generate's body; returns the status code name it ended with."""
        received = self._clock()
        try:
            with self.tracer.start_as_current_span(tm.SPAN_VALIDATE):
                if isinstance(request, Undecodable):
                    raise RequestValidationError(request.message)
                if not self.serving:
                    raise NotServingError("the server is not serving yet (workers starting) or is draining; "
                                          "retry later")
                if len(self._active) >= self.max_inflight:
                    raise AdmissionError(f"server is at its limit of {self.max_inflight} in-flight requests; "
                                         "retry later")
                req = self.validator.validate(request, self._active)
        except Exception as exc:  # noqa: BLE001 - typed errors become statuses; others INTERNAL
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request refused by an unexpected error")
            self.metrics.requests.labels("none", code.name).inc()
            self._set_status(context, code, message)
            return code.name
        span.set_attributes({tm.ATTR_REQUEST_ID: req.request_id, tm.ATTR_INPUT_TOKENS: len(req.prompt_token_ids),
                             tm.ATTR_MAX_TOKENS: req.params.max_tokens})
        run = Run(req, RequestTrace(received=received, prompt_tokens=len(req.prompt_token_ids)), span=span)
        self._active[req.request_id] = run
        self._idle.clear()
        limit = self._limit_s(context)
        timeout = asyncio.timeout(limit)
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            async with timeout:
                await self._routed(run, context)
        except TimeoutError as exc:
            if not timeout.expired():
                failure = self._failed(run, exc)
            else:
                elapsed = self._clock() - received
                failure = (grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"deadline of {limit:.3f} s exceeded after {elapsed:.3f} s while {run.stage}; "
                           "allow a longer deadline or lower max_tokens")
                log.info("request %s: %s", req.request_id, failure[1])
        except asyncio.CancelledError:
            log.info("request %s cancelled by the client while %s", req.request_id, run.stage)
            self._observe(run, "CANCELLED")
            span.set_attribute(tm.ATTR_RPC_STATUS, "CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001
            failure = self._failed(run, exc)
        finally:
            try:
                if run.attempt is not None:
                    self.router.close(run.attempt.rid)
                    if not run.finished:
                        await self._cleanup(run.attempt)
                if run.undos:  # failed attempts' cleanups (each bounded): done before the id can be reused
                    await asyncio.shield(asyncio.gather(*run.undos, return_exceptions=True))
            finally:
                del self._active[req.request_id]
                if not self._active:
                    self._idle.set()
        code = failure[0].name if failure is not None else "OK"
        self._observe(run, code)
        t = run.trace
        span.set_attributes({tm.ATTR_OUTPUT_TOKENS: t.completion_tokens, tm.ATTR_CACHED_INPUT_TOKENS: t.cached_tokens})
        if t.finish_reason:
            span.set_attribute(tm.ATTR_FINISH_REASONS, [t.finish_reason])
        if failure is not None:
            self._set_status(context, *failure)
        return code

    def _set_status(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # how long to back off: gRPC's retry pushback trailer
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.retry_after_ms)),))
            message = f"{message} (retry after {self.retry_after_ms} ms)"
        context.set_code(code)
        context.set_details(message)

    def _limit_s(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.request_timeout_s if remaining is None else min(remaining, self.request_timeout_s)

    def _failed(self, run: Run, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc)
        rid = run.request.request_id
        if isinstance(exc, KVTransferFailedError):
            self.metrics.transfer_failures.inc()
        self._mark_down(exc, message)
        if code == grpc.StatusCode.INTERNAL and not isinstance(exc, WorkerFailedError):
            log.error("request %s failed while %s", rid, run.stage, exc_info=exc)
        else:
            log.info("request %s failed while %s: %s %s", rid, run.stage, code.name, message)
        return code, message

    def _mark_down(self, exc: BaseException, message: str) -> None:
        """A worker that is gone gets no new request (its KV feed and the health check bring it back)."""
        if isinstance(exc, WorkerUnavailableError) and not isinstance(exc, WorkerStalledError) and exc.worker_id:
            for pool in self.pools:
                if exc.worker_id in pool:
                    self._on_down(pool, exc.worker_id, message)

    # -- failover ---------------------------------------------------------------------------------

    async def _routed(self, run: Run, context: grpc.aio.ServicerContext) -> None:
        """Attempts until one finishes the request. A worker that dies, or a KV transfer that fails,
        costs a retry: the attempt is undone (in the background, bounded) and the request resumes on
        other workers after the tokens already sent (prefilled again as prompt + those tokens), so the
        client's stream goes on with nothing duplicated or missing. At most `max_retries` retries; with
        no worker to take it, a retry waits up to `failover_wait_s` for one to come back."""
        req = run.request
        avoid: set[str] = set()
        failed_at: float | None = None
        for n in range(self.max_retries + 1):
            rid = req.request_id if n == 0 else f"{req.request_id}{RETRY_ID_MARKER}{n}"  # clients cannot send it
            attempt = run.attempt = Attempt(rid, list(run.output_ids))
            try:
                if n == 0:
                    route = self._route(run, attempt, avoid)
                else:
                    route = await self._route_retry(run, attempt, avoid, failed_at)
                await self._attempt(run, attempt, route, context)
                return
            except Exception as exc:  # noqa: BLE001 - classified below; anything not retryable is re-raised
                why = retry_reason(attempt, exc)
                if why is None or n == self.max_retries or run.finished:
                    raise
                reason, avoid_worker = why
                self._mark_down(exc, str(exc))
                if isinstance(exc, KVTransferFailedError):
                    self.metrics.transfer_failures.inc()
                if avoid_worker:
                    avoid.add(avoid_worker)
                failed_at = self._clock()
                self.router.close(attempt.rid)
                if attempt.prefill_sent or attempt.stream_sent:
                    run.undos.append(self._background(self._undo(attempt)))
                run.trace.retries += 1
                self.metrics.retries.labels(reason).inc()
                (run.span or trace_api.get_current_span()).add_event(tm.EVENT_RETRY, {
                    tm.ATTR_RETRY_REASON: reason, tm.ATTR_RETRY_AFTER_TOKENS: len(run.output_ids)})
                log.warning("request %s: %s while %s (%s); resuming after %d token(s) sent, retry %d of %d",
                            req.request_id, reason, run.stage, one_line(str(exc), 200), len(run.output_ids),
                            n + 1, self.max_retries)

    def _route(self, run: Run, attempt: Attempt, avoid: set[str]) -> Route:
        req = run.request
        tokens = req.prompt_token_ids + attempt.prior  # a resumed request is prefilled with what was sent
        started = self._clock()
        if run.trace.routing_started is None:
            run.trace.routing_started = started
        with self.tracer.start_as_current_span(tm.SPAN_ROUTE) as span:
            route = attempt.route = self.router.route(attempt.rid, tokens, avoid, retry=attempt.rid != req.request_id)
            span.set_attributes({tm.ATTR_ROUTE_REASON: route.reason, tm.ATTR_ROUTE_KIND: route.kind,
                                 tm.ATTR_DECODE_WORKER: route.decode.worker_id,
                                 tm.ATTR_PREFILL_WORKER: route.prefill.worker_id if route.prefill else "",
                                 tm.ATTR_DECODE_CACHED_BLOCKS: route.decode_cached_blocks,
                                 tm.ATTR_PREFILL_CACHED_BLOCKS: route.prefill_cached_blocks})
        now = self._clock()
        if run.trace.dispatched is None:
            run.trace.dispatched = now
            run.route = route
        self.metrics.decision.observe(now - started)
        self.metrics.decisions.labels("local" if route.local else "remote", route.kind).inc()
        return route

    async def _route_retry(self, run: Run, attempt: Attempt, avoid: set[str], failed_at: float) -> Route:
        """A retry's route; while no worker can take it, waits (up to failover_wait_s since the failure)
        for the pools to change: a restarted worker rejoining, one added by an operator."""
        while True:
            changed = self._workers_changed
            try:
                return self._route(run, attempt, avoid)
            except NoHealthyWorkerError as exc:
                left = failed_at + self.failover_wait_s - self._clock()
                if left <= 0:
                    raise
                run.stage = "waiting for a healthy worker to resume on"
                try:
                    async with asyncio.timeout(left):
                        await changed.wait()
                except TimeoutError:
                    raise exc from None

    async def _attempt(self, run: Run, attempt: Attempt, route: Route, context: grpc.aio.ServicerContext) -> None:
        req = run.request
        attempt.d = d = route.decode
        # D counts the request from routing on: a drain waits for it and its decode cost sees it (a prefill
        # worker running a whole request by SLO placement counts it in its own pool)
        with self.pool_of(d.worker_id).track(d.worker_id):
            if route.local:
                run.stage = f"generating on {d.worker_id}"
                attempt.stream_sent = True
                with self._client_span(tm.SPAN_DECODE, d.worker_id):
                    await self._stream(context, run, d.generate(attempt.rid, req.prompt_token_ids, req.params,
                                                                tm.inject(), attempt.prior), d)
            else:
                await self._remote(run, attempt, route, context)

    async def _remote(self, run: Run, attempt: Attempt, route: Route, context: grpc.aio.ServicerContext) -> None:
        req, d = run.request, route.decode
        assert self.prefill is not None and route.prefill is not None  # remote routes exist only then
        attempt.p = p = route.prefill
        run.stage = f"prefilling on {p.worker_id}"
        with self.prefill.track(p.worker_id), self._client_span(tm.SPAN_PREFILL, p.worker_id):
            attempt.prefill_sent = True
            result = await p.prefill(attempt.rid, req.prompt_token_ids, req.params, tm.inject(), attempt.prior)
        if run.trace.first_arrived is None:
            run.trace.first_arrived = self._clock()
        self.router.prefill_done(attempt.rid)
        attempt.prefill_done, attempt.kv_leased = True, result.kv is not None and not result.first.finished
        run.trace.prefill_s += result.prefill_s
        if not attempt.prior:  # a resumed attempt's hit covers tokens that are not the prompt's
            run.trace.cached_tokens = result.cached_tokens
        done = result.first.finished
        await self._send(context, run, result.first, p.worker_id, prefill_worker=p.worker_id,
                         decode_worker="" if done else d.worker_id)
        if done:
            return
        run.stage = f"decoding on {d.worker_id}"
        attempt.stream_sent = True
        with self._client_span(tm.SPAN_DECODE, d.worker_id):
            # D replays what was sent before P's token (the prior output) and token 1, then decodes on
            await self._stream(context, run, d.decode(attempt.rid, req.prompt_token_ids, req.params, result,
                                                      tm.inject(), attempt.prior), d, release_lease=True)

    def _client_span(self, name: str, worker_id: str):
        """A CLIENT span around a worker call; its context goes to the worker as the call's trace_ctx."""
        return self.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes={tm.ATTR_WORKER_ID: worker_id})

    async def _stream(self, context: grpc.aio.ServicerContext, run: Run, chunks: AsyncIterator[StreamChunk],
                      worker: WorkerClient, release_lease: bool = False) -> None:
        attempt = run.attempt
        assert attempt is not None
        idle_s = self.stream_idle_timeout_s
        async with aclosing(chunks) as stream:
            while True:
                try:
                    if attempt.first_chunk_seen and idle_s:  # the first may wait for admission and the pull
                        async with asyncio.timeout(idle_s):
                            chunk = await anext(stream)
                    else:
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise WorkerStalledError(f"worker {worker.worker_id} sent nothing for {idle_s:g} s "
                                             "(router.stream_idle_timeout_s)", worker.worker_id) from None
                if not attempt.first_chunk_seen:  # D pulled (or prefilled locally): real KV events take over
                    attempt.first_chunk_seen = True
                    if run.trace.first_arrived is None:
                        run.trace.first_arrived = self._clock()
                    self.router.first_token(attempt.rid)
                if release_lease and attempt.kv_leased:
                    # D streams only after every rank pulled the prompt's KV: P may free it now
                    attempt.kv_leased = False
                    self._background(self._quietly(attempt.p, "release", attempt.rid, RELEASE_TIMEOUT_S))
                await self._send(context, run, chunk, worker.worker_id, decode_worker=worker.worker_id)
                if run.finished:
                    return
        raise WorkerFailedError(f"worker {worker.worker_id} ended the stream before the request finished",
                                worker.worker_id)

    async def _send(self, context: grpc.aio.ServicerContext, run: Run, chunk: StreamChunk, worker_id: str,
                    prefill_worker: str = "", decode_worker: str = "") -> None:
        response = chunk_response(chunk, worker_id)
        response.request_id = run.request.request_id  # a retry's workers know it as "<id>~retry<n>"
        if run.attempt is not None and run.attempt.prior:
            chunk.cached_tokens = 0  # a resumed attempt's cache hit is over prompt + prior: not the prompt's
        trace = run.trace
        trace.count(chunk)
        now = self._clock()
        if trace.first_sent is None:
            response.prefill_worker, response.decode_worker = prefill_worker, decode_worker
            response.route = run.route.reason if run.route is not None else ""
            (run.span or trace_api.get_current_span()).add_event(tm.EVENT_FIRST_TOKEN)
        trace.sent(now, len(chunk.token_ids))
        if chunk.finished:
            trace.finish_reason = chunk.finish_reason or ""
            trace.finish(response, now)
            run.finished = True
            if run.attempt is not None:
                run.attempt.kv_leased = False
        run.output_ids.extend(chunk.token_ids)
        await context.write(response)

    def _observe(self, run: Run, code: str) -> None:
        """One request's metrics, once, when it ends (any way)."""
        if run.observed:
            return
        run.observed = True
        m, t = self.metrics, run.trace
        m.requests.labels(t.finish_reason or "none", code).inc()
        if t.first_sent is None:
            return  # refused or failed before its first token: counted above, nothing else to time
        kind = "local" if run.route is not None and run.route.local else "remote"
        m.ttft.labels(kind).observe(t.first_sent - t.received)
        m.duration.labels(kind).observe((t.last_sent or t.first_sent) - t.received)
        for part, seconds in (t.ttft_parts() or {}).items():
            m.ttft_part.labels(part).observe(seconds)
        for gap, tokens in t.token_gaps:
            for _ in range(tokens):
                m.itl.observe(gap / tokens)
        if t.completion_tokens > 1 and t.last_sent is not None:
            m.tpot.observe((t.last_sent - t.first_sent) / (t.completion_tokens - 1))
        m.prompt_tokens.inc(t.prompt_tokens)
        m.completion_tokens.inc(t.completion_tokens)
        m.cached_tokens.inc(t.cached_tokens)
        if t.kv_transfer_bytes:
            m.kv_transfer.observe(t.kv_transfer_s)
            m.transfer_bytes.inc(t.kv_transfer_bytes)

    # -- cleanup ----------------------------------------------------------------------------------

    async def _cleanup(self, attempt: Attempt) -> None:
        await asyncio.shield(self._background(self._undo(attempt)))

    def _background(self, coro) -> asyncio.Task:
        """A task that outlives the request's own (cancellation of the RPC must not stop it)."""
        task = asyncio.create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _undo(self, attempt: Attempt) -> None:
        rid = attempt.rid
        if attempt.d is not None and attempt.stream_sent:
            await self._quietly(attempt.d, "abort", rid)
        if attempt.p is not None and attempt.prefill_sent and not attempt.prefill_done:
            await self._quietly(attempt.p, "abort", rid)
        elif attempt.p is not None and attempt.kv_leased:
            await self._quietly(attempt.p, "release", rid)

    async def _quietly(self, worker: WorkerClient, method: str, rid: str, timeout_s: float | None = None) -> None:
        timeout_s = self.cleanup_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await getattr(worker, method)(rid)
        except TimeoutError:  # the call stays queued on the worker (behind an engine step) and lands later:
            # expected under overload (seen in the soak), so not a warning; a worker that never answers
            # is found by the health check
            log.info("cleanup of %s: %s on %s not answered within %g s (a busy worker applies it later; "
                        "a lease ends at expiry anyway)", rid, method, worker.worker_id, timeout_s)
        except Exception as exc:  # noqa: BLE001 - cleanup never raises
            log.warning("cleanup of %s: %s(%s) on %s failed: %s: %s", rid, method, rid, worker.worker_id,
                        type(exc).__name__, exc)

    # -- GetServerInfo ----------------------------------------------------------------------------

    async def worker_reports(self) -> list[WorkerReport]:
        """Every worker's status (None for one that did not answer within `status_timeout_s`)."""
        return await worker_reports(self.pools, self.status_timeout_s)

    async def refresh_health(self) -> None:
        """Marks each worker up or down by whether it answers `status()` with SERVING (deploy polls this,
        every `router.health_check_s`). A worker answering as a new process (Ray restarted it) is kept
        down and rejoins in the background (`rejoin(worker_id)` handshakes it with its peers again, then
        its status is checked once more); one rejoin at a time per worker, a failed one is tried again
        on a later check. `wait_rejoins` waits for those under way."""
        pools = {c.worker_id: pool for pool in self.pools for c in pool.clients}
        for report in await self.worker_reports():
            wid = report.worker_id
            pool = pools[wid]
            if wid not in pool:
                continue  # removed while we asked
            status = report.status
            if status is None or status.health != "SERVING":
                self._on_down(pool, wid, "status check failed")
                continue
            slot = pool.slot(wid)
            if wid in self._rejoining:
                continue  # its rejoin decides
            if slot.incarnation and status.incarnation != slot.incarnation:
                self._on_down(pool, wid, "restarted by Ray; re-handshaking with its peers")
                task = asyncio.create_task(self._rejoin(pool, wid), name=f"rejoin-{wid}")
                self._rejoining[wid] = task
                task.add_done_callback(lambda _t, w=wid: self._rejoining.pop(w, None))
                continue
            self._take_up(pool, wid, status)

    def _take_up(self, pool: WorkerPool, worker_id: str, status: WorkerStatus) -> None:
        pool.slot(worker_id).incarnation = status.incarnation
        pool.set_status(worker_id, status)
        if pool.set_health(worker_id, True):
            self._notify_workers()

    async def _rejoin(self, pool: WorkerPool, worker_id: str) -> None:
        try:
            if self.rejoin is not None:
                await self.rejoin(worker_id)
            async with asyncio.timeout(self.status_timeout_s):  # still the process that rejoined, and well?
                status = await pool.client(worker_id).status()
        except Exception as exc:  # noqa: BLE001 - it stays down and is tried again on a later check
            log.warning("worker %s could not rejoin: %s: %s", worker_id, type(exc).__name__, one_line(str(exc)))
            return
        if worker_id in pool and status.health == "SERVING":
            self._take_up(pool, worker_id, status)

    async def wait_rejoins(self, timeout_s: float) -> bool:
        """True once no rejoin is under way (tests; shutdown); False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._rejoining:
                    await asyncio.gather(*self._rejoining.values(), return_exceptions=True)
            return True
        except TimeoutError:
            return False

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ServerInfo:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return server_info(self.info_source(), await self.worker_reports(), self._worker_extras())
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            log.exception("GetServerInfo failed")
            code, message = status_for(exc)
            context.set_code(code)
            context.set_details(message)
            return pb.ServerInfo()

    def _worker_extras(self) -> dict[str, tuple[bool, int]]:
        """worker -> (draining, blocks the router's index holds for it)."""
        return {s.worker_id: (s.draining, self.router.index_of(pool).indexer.num_blocks(s.worker_id))
                for pool in self.pools for s in pool.slots}

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight here and every cleanup has run; False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
                if self._cleanups:
                    await asyncio.gather(*self._cleanups, return_exceptions=True)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stops the KV event feeds and rejoins under way, and waits for the cleanups still running
        (each bounded by `cleanup_timeout_s`); call after server.stop()."""
        await self.feed.close()
        for task in list(self._rejoining.values()):
            task.cancel()
        await asyncio.gather(*self._rejoining.values(), return_exceptions=True)
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
