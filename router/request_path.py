"""One request's way through the router, whichever front door it came in by (gRPC, HTTP).

A door hands `RequestPath.run` a `tandem.v1.GenerateRequest` (the HTTP door translates the OpenAI
body into one), a function that delivers each response, its deadline and its trace headers; `run`
returns how the request ended (`Ended`: an `Outcome` and a one-line message). The door maps that
through router/errors.py's OUTCOMES table and does nothing else: validation, routing, retries,
deadlines, cleanup and metrics all live here.

    1. admission     not serving yet -> UNAVAILABLE; `max_inflight` requests already
                     in flight -> RESOURCE_EXHAUSTED ("... retry later")
    2. validation    RequestValidator: prompt ids + SamplingParams + request id
                     (INVALID_ARGUMENT with a message that says what to change)
    3. routing       router/routing.py picks D, and P or "local" (conditional
                     disaggregation); the first response says which and why (`route`)
       remote        P.prefill -> first chunk, delivered at once (prefill_worker and
                     decode_worker set on it); unless it finished the request,
                     D.decode streams the rest, from token 2.
       local         D.generate streams every chunk (aggregated mode: always)
    4. last chunk    carries usage and timings (TTFT, total, queue, prefill, KV pull)

Routing books what it routes until the request's first decode chunk; `close` clears it on every path.

Every wait runs under one asyncio timeout: the door's deadline capped by `request_timeout_s`.
Expiry ends the request with DEADLINE_EXCEEDED and a message naming the stage it was in. A client
that goes away cancels the task running `run`: cleanup runs and CancelledError is re-raised.

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
table). Restarted workers rejoin through Membership.

Other worker-side failures: a chunk with `error` set ends the request with INTERNAL and the
worker's one-line message; retries used up end it with the last failure's outcome (UNAVAILABLE
for a dead worker). FINISH_REASON_ERROR is never sent: a client learns of failure from the
status, which every client checks. Tokens already sent stay valid output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing

from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import telemetry as tm
from common.contract import KVTransferFailedError, StreamChunk
from common.telemetry import Tracing, TracingConfig, setup_tracing
from router.attempts import Attempt, Run, retry_reason
from router.cleanup import Cleanups
from router.config import RequestPathConfig
from router.delivery import GRPC_DOOR, Door, Emit, Ended, send_chunk
from router.errors import (
    AdmissionError,
    NoHealthyWorkerError,
    NotServingError,
    Outcome,
    RequestValidationError,
    WorkerFailedError,
    WorkerStalledError,
    one_line,
    outcome_for,
)
from router.membership import Membership
from router.metrics import RouterMetrics
from router.responses import RequestTrace
from router.routing import Route
from router.validation import RETRY_ID_MARKER, RequestValidator
from router.workers import WorkerClient
from tandem_api.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)
# ending P's lease once D streams: behind a long engine step under load this can take seconds, and
# nothing waits for it (the lease itself is the backstop), so it gets longer than other cleanup calls
RELEASE_TIMEOUT_S = 60.0


class RequestPath:
    """Validate, route, run attempts with failover, deliver responses: for every front door."""

    def __init__(
        self,
        membership: Membership,
        validator: RequestValidator | None,
        config: RequestPathConfig | None = None,
        *,
        metrics: RouterMetrics | None = None,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.membership, self.validator = membership, validator
        self.config = config = config or RequestPathConfig()
        self.router = membership.router
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.metrics.in_flight.set_function(lambda: len(self._active))
        self.metrics.workers_source = membership.worker_states
        self.tracing = tracing if tracing is not None else setup_tracing(TracingConfig())  # off: a no-op tracer
        self.tracer = self.tracing.tracer
        self._clock = clock
        self._active: dict[str, Run] = {}
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self.cleanups = Cleanups(config.cleanup_timeout_s)
        membership.attempts_source = self._attempts

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def _attempts(self) -> list[Attempt]:
        return [run.attempt for run in self._active.values() if run.attempt is not None]

    def _pool_of(self, worker_id: str):
        return self.membership.pool_of(worker_id)

    # -- one request ------------------------------------------------------------------------------

    async def run(
        self,
        request,
        emit: Emit,
        *,
        deadline_s: float | None = None,
        carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        door: Door = GRPC_DOOR,
        fill_max_tokens: bool = False,
        on_routed: Callable[[], None] | None = None,
    ) -> Ended:
        """Serve `request` (a GenerateRequest, or an object with `.message` for bytes that did not decode),
        delivering each response with `emit`; `deadline_s`: seconds the client allows (None: none);
        `carrier`: headers that may hold a traceparent; `fill_max_tokens`: see RequestValidator.validate;
        `on_routed()`: called once the request passed admission and validation and has its first route
        (what can still fail from then on is a worker, the deadline or the client). Re-raises
        CancelledError after cleanup."""
        parent = tm.extract(carrier)  # one trace per request, continued from the gateway's traceparent
        with self.tracer.start_as_current_span(
            door.span_name,
            context=parent,
            kind=SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
            attributes={**door.span_attributes, tm.ATTR_OPERATION: "text_completion"},
        ) as span:
            ended = await self._run(request, emit, deadline_s, door, span, fill_max_tokens, on_routed)
            span.set_attribute(tm.ATTR_RPC_STATUS, ended.outcome.value)
            if not ended.ok:
                span.set_status(Status(StatusCode.ERROR, ended.outcome.value))
            return ended

    def _refused(self, exc: BaseException, door: Door) -> Ended:
        outcome, message = outcome_for(exc)
        if outcome is Outcome.INTERNAL:
            log.exception("request refused by an unexpected error")
        self.metrics.requests.labels("none", outcome.value, door.name).inc()
        return self._ended(outcome, message)

    def _ended(self, outcome: Outcome, message: str = "") -> Ended:
        if outcome is Outcome.RESOURCE_EXHAUSTED:
            return Ended(
                outcome, f"{message} (retry after {self.config.retry_after_ms} ms)", self.config.retry_after_ms
            )
        return Ended(outcome, message)

    async def _run(
        self,
        request,
        emit: Emit,
        deadline_s: float | None,
        door: Door,
        span,
        fill_max_tokens: bool,
        on_routed: Callable[[], None] | None,
    ) -> Ended:
        received = self._clock()
        try:
            with self.tracer.start_as_current_span(tm.SPAN_VALIDATE):
                if not isinstance(request, pb.GenerateRequest):
                    raise RequestValidationError(getattr(request, "message", "the request is not a GenerateRequest"))
                if not self.membership.serving:
                    raise NotServingError(
                        "the server is not serving yet (workers starting) or is draining; retry later"
                    )
                if len(self._active) >= self.config.max_inflight:
                    raise AdmissionError(
                        f"server is at its limit of {self.config.max_inflight} in-flight requests; retry later"
                    )
                if self.validator is None:
                    raise AdmissionError("the server is starting: no model facts yet; retry later")
                req = self.validator.validate(request, self._active, fill_max_tokens)
        except Exception as exc:  # noqa: BLE001 - typed errors become outcomes; others INTERNAL
            return self._refused(exc, door)
        span.set_attributes(
            {
                tm.ATTR_REQUEST_ID: req.request_id,
                tm.ATTR_INPUT_TOKENS: len(req.prompt_token_ids),
                tm.ATTR_MAX_TOKENS: req.params.max_tokens,
            }
        )
        run = Run(req, RequestTrace(received=received, prompt_tokens=len(req.prompt_token_ids)), span=span)
        self.metrics.window.arrived(received)
        self._active[req.request_id] = run
        self._idle.clear()
        limit = self.config.request_timeout_s if deadline_s is None else min(deadline_s, self.config.request_timeout_s)
        timeout = asyncio.timeout(limit)
        failure: Ended | None = None
        try:
            async with timeout:
                await self._routed(run, emit, on_routed)
        except TimeoutError as exc:
            if not timeout.expired():
                failure = self._failed(run, exc)
            else:
                elapsed = self._clock() - received
                failure = Ended(
                    Outcome.DEADLINE_EXCEEDED,
                    f"deadline of {limit:.3f} s exceeded after {elapsed:.3f} s while {run.stage}; "
                    "allow a longer deadline or lower max_tokens",
                )
                log.info("request %s: %s", req.request_id, failure.message)
        except asyncio.CancelledError:
            log.info("request %s cancelled by the client while %s", req.request_id, run.stage)
            self._observe(run, Outcome.CANCELLED, door)
            span.set_attribute(tm.ATTR_RPC_STATUS, Outcome.CANCELLED.value)
            raise
        except Exception as exc:  # noqa: BLE001
            failure = self._failed(run, exc)
        finally:
            try:
                if run.attempt is not None:
                    self.router.close(run.attempt.rid)
                    if not run.finished:
                        await self.cleanups.undo_now(run.attempt)
                if run.undos:  # failed attempts' cleanups (each bounded): done before the id can be reused
                    await asyncio.shield(asyncio.gather(*run.undos, return_exceptions=True))
            finally:
                del self._active[req.request_id]
                if not self._active:
                    self._idle.set()
        ended = failure if failure is not None else Ended(Outcome.OK)
        self._observe(run, ended.outcome, door)
        t = run.trace
        span.set_attributes({tm.ATTR_OUTPUT_TOKENS: t.completion_tokens, tm.ATTR_CACHED_INPUT_TOKENS: t.cached_tokens})
        if t.finish_reason:
            span.set_attribute(tm.ATTR_FINISH_REASONS, [t.finish_reason])
        return ended

    def _failed(self, run: Run, exc: BaseException) -> Ended:
        outcome, message = outcome_for(exc)
        rid = run.request.request_id
        if isinstance(exc, KVTransferFailedError):
            self.metrics.transfer_failures.inc()
        self.membership.mark_down_for(exc, message)
        if outcome is Outcome.INTERNAL and not isinstance(exc, WorkerFailedError):
            log.error("request %s failed while %s", rid, run.stage, exc_info=exc)
        else:
            log.info("request %s failed while %s: %s %s", rid, run.stage, outcome.value, message)
        return self._ended(outcome, message)

    # -- failover ---------------------------------------------------------------------------------

    async def _routed(self, run: Run, emit: Emit, on_routed: Callable[[], None] | None = None) -> None:
        """Attempts until one finishes the request. A worker that dies, or a KV transfer that fails,
        costs a retry: the attempt is undone (in the background, bounded) and the request resumes on
        other workers after the tokens already sent (prefilled again as prompt + those tokens), so the
        client's stream goes on with nothing duplicated or missing. At most `max_retries` retries; with
        no worker to take it, a retry waits up to `failover_wait_s` for one to come back."""
        req = run.request
        avoid: set[str] = set()
        failed_at = self._clock()  # set again by every failed attempt; read only from the second on
        max_retries = self.config.max_retries
        for n in range(max_retries + 1):
            rid = req.request_id if n == 0 else f"{req.request_id}{RETRY_ID_MARKER}{n}"  # clients cannot send it
            attempt = run.attempt = Attempt(rid, list(run.output_ids))
            try:
                if n == 0:
                    route = self._route(run, attempt, avoid)
                    if on_routed is not None:
                        on_routed()
                else:
                    route = await self._route_retry(run, attempt, avoid, failed_at)
                await self._attempt(run, attempt, route, emit)
                return
            except Exception as exc:  # noqa: BLE001 - classified below; anything not retryable is re-raised
                why = retry_reason(attempt, exc)
                if why is None or n == max_retries or run.finished:
                    raise
                reason, avoid_worker = why
                self.membership.mark_down_for(exc, str(exc))
                if isinstance(exc, KVTransferFailedError):
                    self.metrics.transfer_failures.inc()
                if avoid_worker:
                    avoid.add(avoid_worker)
                failed_at = self._clock()
                self.router.close(attempt.rid)
                if attempt.prefill_sent or attempt.stream_sent:
                    run.undos.append(self.cleanups.background(self.cleanups.undo(attempt)))
                run.trace.retries += 1
                self.metrics.retries.labels(reason).inc()
                (run.span or trace_api.get_current_span()).add_event(
                    tm.EVENT_RETRY, {tm.ATTR_RETRY_REASON: reason, tm.ATTR_RETRY_AFTER_TOKENS: len(run.output_ids)}
                )
                log.warning(
                    "request %s: %s while %s (%s); resuming after %d token(s) sent, retry %d of %d",
                    req.request_id,
                    reason,
                    run.stage,
                    one_line(str(exc), 200),
                    len(run.output_ids),
                    n + 1,
                    max_retries,
                )

    def _route(self, run: Run, attempt: Attempt, avoid: set[str]) -> Route:
        req = run.request
        tokens = req.prompt_token_ids + attempt.prior  # a resumed request is prefilled with what was sent
        started = self._clock()
        if run.trace.routing_started is None:
            run.trace.routing_started = started
        with self.tracer.start_as_current_span(tm.SPAN_ROUTE) as span:
            route = attempt.route = self.router.route(attempt.rid, tokens, avoid, retry=attempt.rid != req.request_id)
            span.set_attributes(
                {
                    tm.ATTR_ROUTE_REASON: route.reason,
                    tm.ATTR_ROUTE_KIND: route.kind,
                    tm.ATTR_DECODE_WORKER: route.decode.worker_id,
                    tm.ATTR_PREFILL_WORKER: route.prefill.worker_id if route.prefill else "",
                    tm.ATTR_DECODE_CACHED_BLOCKS: route.decode_cached_blocks,
                    tm.ATTR_PREFILL_CACHED_BLOCKS: route.prefill_cached_blocks,
                }
            )
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
            changed = self.membership.workers_changed
            try:
                return self._route(run, attempt, avoid)
            except NoHealthyWorkerError as exc:
                left = failed_at + self.config.failover_wait_s - self._clock()
                if left <= 0:
                    raise
                run.stage = "waiting for a healthy worker to resume on"
                try:
                    async with asyncio.timeout(left):
                        await changed.wait()
                except TimeoutError:
                    raise exc from None

    async def _attempt(self, run: Run, attempt: Attempt, route: Route, emit: Emit) -> None:
        req = run.request
        attempt.d = d = route.decode
        # D counts the request from routing on: a drain waits for it and its decode cost sees it (a prefill
        # worker running a whole request by SLO placement counts it in its own pool)
        with self._pool_of(d.worker_id).track(d.worker_id):
            if route.local:
                run.stage = f"generating on {d.worker_id}"
                attempt.stream_sent = True
                with self._client_span(tm.SPAN_DECODE, d.worker_id):
                    await self._stream(
                        emit,
                        run,
                        d.generate(attempt.rid, req.prompt_token_ids, req.params, tm.inject(), attempt.prior),
                        d,
                    )
            else:
                await self._remote(run, attempt, route, emit)

    async def _remote(self, run: Run, attempt: Attempt, route: Route, emit: Emit) -> None:
        req, d = run.request, route.decode
        prefill = self.membership.prefill
        assert prefill is not None and route.prefill is not None  # remote routes exist only then
        attempt.p = p = route.prefill
        run.stage = f"prefilling on {p.worker_id}"
        with prefill.track(p.worker_id), self._client_span(tm.SPAN_PREFILL, p.worker_id):
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
        await send_chunk(
            self._clock(),
            emit,
            run,
            result.first,
            p.worker_id,
            prefill_worker=p.worker_id,
            decode_worker="" if done else d.worker_id,
        )
        if done:
            return
        run.stage = f"decoding on {d.worker_id}"
        attempt.stream_sent = True
        with self._client_span(tm.SPAN_DECODE, d.worker_id):
            # D replays what was sent before P's token (the prior output) and token 1, then decodes on
            await self._stream(
                emit,
                run,
                d.decode(attempt.rid, req.prompt_token_ids, req.params, result, tm.inject(), attempt.prior),
                d,
                release_lease=True,
            )

    def _client_span(self, name: str, worker_id: str):
        """A CLIENT span around a worker call; its context goes to the worker as the call's trace_ctx."""
        return self.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes={tm.ATTR_WORKER_ID: worker_id})

    async def _stream(
        self,
        emit: Emit,
        run: Run,
        chunks: AsyncGenerator[StreamChunk, None],
        worker: WorkerClient,
        release_lease: bool = False,
    ) -> None:
        attempt = run.attempt
        assert attempt is not None
        idle_s = self.config.stream_idle_timeout_s
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
                    raise WorkerStalledError(
                        f"worker {worker.worker_id} sent nothing for {idle_s:g} s (router.stream_idle_timeout_s)",
                        worker.worker_id,
                    ) from None
                if not attempt.first_chunk_seen:  # D pulled (or prefilled locally): real KV events take over
                    attempt.first_chunk_seen = True
                    if run.trace.first_arrived is None:
                        run.trace.first_arrived = self._clock()
                    self.router.first_token(attempt.rid)
                if release_lease and attempt.kv_leased:
                    # D streams only after every rank pulled the prompt's KV: P may free it now
                    attempt.kv_leased = False
                    if attempt.p is not None:
                        self.cleanups.background(
                            self.cleanups.call(
                                attempt.p.release, attempt.p.worker_id, "release", attempt.rid, RELEASE_TIMEOUT_S
                            )
                        )
                await send_chunk(self._clock(), emit, run, chunk, worker.worker_id, decode_worker=worker.worker_id)
                if run.finished:
                    return
        raise WorkerFailedError(
            f"worker {worker.worker_id} ended the stream before the request finished", worker.worker_id
        )

    def _observe(self, run: Run, outcome: Outcome, door: Door) -> None:
        """One request's metrics, once, when it ends (any way)."""
        if not run.observed:
            run.observed = True
            local = run.route is not None and run.route.local
            self.metrics.observe_request(run.trace, local, outcome.value, door.name)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight here and every cleanup has run; False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
                await self.cleanups.wait()
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Waits for the cleanups still running (each bounded by `cleanup_timeout_s`)."""
        await self.cleanups.wait()
