"""A worker's OpenTelemetry spans: one helper for the server span around each request, in every role.

Each request a worker answers gets one SERVER span, continued from the router's trace
context (`trace_ctx`, a W3C carrier) and named by the role's entry point:

    span                     opened by                          ends
    tandem.prefill.worker    PrefillWorker.prefill              once token 1 and the KV handle are ready
    tandem.decode.worker     DecodeWorker.decode                on the last chunk, before it is yielded
    tandem.generate.local    WorkerHost.generate (both roles)   on the last chunk, before it is yielded

`RequestSpan` opens it with the same attributes everywhere (request id, worker id, input
tokens). A stream uses it as a context manager: `count(chunk)` adds each chunk's tokens and
ends the span on the last one (so it has ended before the router sees the end of the
stream); a stream that stops early (an error, a cancel, a return before any chunk) ends it on
the way out, with the error recorded. The first chunk adds a `first_token` event.

`engine_children` adds the engine's own figures for a request's first token as child spans
(queue: arrival -> first schedule, compute: first schedule -> first token). The engine reads
`time.monotonic()` (engine/request.py, engine/scheduler.py, engine/engine_core.py), so
`wall_ns` converts those readings with this process's monotonic and wall clocks.

Imports no ray.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Literal

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from common import telemetry as tm
from common.contract import StreamChunk
from engine.outputs import StepOutput


class RequestSpan:
    """The SERVER span of one request on one worker, and its context for child spans.

    `tokens`: output tokens the request had before this stream's first chunk (a decode worker
    starts at 1: token 1 came from the prefill worker)."""

    def __init__(
        self,
        tracer,
        name: str,
        request_id: str,
        worker_id: str,
        input_tokens: int,
        trace_ctx: dict[str, str] | None,
        tokens: int = 0,
    ) -> None:
        self.tracer = tracer
        self.span = tracer.start_span(
            name,
            context=tm.extract(trace_ctx),
            kind=SpanKind.SERVER,
            attributes={
                tm.ATTR_REQUEST_ID: request_id,
                tm.ATTR_WORKER_ID: worker_id,
                tm.ATTR_INPUT_TOKENS: input_tokens,
            },
        )
        self.context = trace.set_span_in_context(self.span)  # the parent of this request's child spans
        self.tokens = tokens  # output tokens so far
        self._tokens_before = tokens
        self.is_open = True

    def set_attribute(self, key: str, value) -> None:
        self.span.set_attribute(key, value)

    def engine_children(self, out: StepOutput) -> None:
        """Children for the request's first token from the engine's clock readings: queue (arrival ->
        first schedule) and compute (first schedule -> first token). Nothing if `out` lacks them."""
        if out.arrival_time is None or out.first_scheduled_time is None or out.first_token_time is None:
            return
        for name, start, end in (
            (tm.SPAN_ENGINE_QUEUE, out.arrival_time, out.first_scheduled_time),
            (tm.SPAN_ENGINE_COMPUTE, out.first_scheduled_time, out.first_token_time),
        ):
            self.tracer.start_span(name, context=self.context, start_time=wall_ns(start)).end(end_time=wall_ns(end))

    # ---- one-shot use (prefill: no stream) ------------------------------------------------------------------------

    def end(self) -> None:
        self.span.end()
        self.is_open = False

    def fail(self, exc: BaseException) -> None:
        """Record `exc` on the span and end it."""
        tm.record_error(self.span, exc)
        self.end()

    # ---- streams ----------------------------------------------------------------------------------------------------

    def first_token(self) -> bool:
        """Call for each chunk before `count`: True for the chunk that carries the stream's first tokens,
        after adding the `first_token` event; the caller then sets what it knows of them while the span
        is still open."""
        if self.tokens != self._tokens_before:
            return False
        self.span.add_event(tm.EVENT_FIRST_TOKEN)
        return True

    def count(self, chunk: StreamChunk) -> None:
        """A chunk about to be yielded: its tokens counted; the last one ends the span (output tokens,
        finish reason) before the router can see it."""
        self.tokens += len(chunk.token_ids)
        if chunk.finished:
            tm.end_stream_span(self.span, self.tokens, chunk.finish_reason)
            self.is_open = False

    def __enter__(self) -> RequestSpan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        """A stream that stopped before its last chunk: the error recorded (any BaseException: a
        cancel too), the span ended with the tokens so far. A GeneratorExit after the last chunk is
        the consumer closing the stream, not a failure: the span has ended already."""
        if self.is_open:
            if exc is not None:
                tm.record_error(self.span, exc)
            tm.end_stream_span(self.span, self.tokens, None)
            self.is_open = False
        return False


def wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds OpenTelemetry spans use."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def span_dicts(spans) -> list[dict]:
    """Finished SDK spans as plain dicts (tests read a worker's spans over Ray)."""
    return [
        {
            "name": s.name,
            "trace_id": f"{s.context.trace_id:032x}",
            "span_id": f"{s.context.span_id:016x}",
            "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
            "attributes": dict(s.attributes),
            "start": s.start_time,
            "end": s.end_time,
            "links": [f"{link.context.span_id:016x}" for link in s.links],
            "events": [e.name for e in s.events],
        }
        for s in spans
    ]
