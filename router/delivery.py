"""What the request path hands a front door: the `Door` it came by, how a request `Ended`, and the
responses it emits (`send_chunk`: one worker chunk as the door's next response, counted in the
request's trace).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from opentelemetry import trace as trace_api

from common import telemetry as tm
from common.contract import StreamChunk
from router.attempts import Run
from router.errors import Outcome
from router.responses import chunk_response
from tandem_api.v1 import generation_pb2 as pb

Emit = Callable[[pb.GenerateResponse], Awaitable[None]]


@dataclass(frozen=True)
class Door:
    """A front door as the path's spans and metrics name it."""

    name: str  # the `door` label of tandem_requests_total: "grpc" | "http"
    span_name: str
    span_attributes: Mapping[str, str] = field(default_factory=dict)


GRPC_DOOR = Door("grpc", tm.SPAN_GENERATE, {tm.ATTR_RPC_SYSTEM: "grpc", tm.ATTR_RPC_METHOD: "Generate"})


@dataclass(frozen=True)
class Ended:
    """How a request ended: the outcome, a one-line message for the client (empty when OK), and for
    RESOURCE_EXHAUSTED how long to back off."""

    outcome: Outcome
    message: str = ""
    retry_after_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


async def send_chunk(
    now: float,
    emit: Emit,
    run: Run,
    chunk: StreamChunk,
    worker_id: str,
    prefill_worker: str = "",
    decode_worker: str = "",
) -> None:
    response = chunk_response(chunk, worker_id)
    response.request_id = run.request.request_id  # a retry's workers know it as "<id>~retry<n>"
    if run.attempt is not None and run.attempt.prior:
        chunk.cached_tokens = 0  # a resumed attempt's cache hit is over prompt + prior: not the prompt's
    trace = run.trace
    trace.count(chunk)
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
    await emit(response)
