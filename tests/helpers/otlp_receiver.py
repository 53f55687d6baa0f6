"""Real OTLP trace receivers on loopback, for tests (no collector is installable here).

`OtlpReceiver` serves OTLP/gRPC (opentelemetry.proto.collector.trace.v1.TraceService/Export);
`OtlpHttpReceiver` serves OTLP/HTTP (POST /v1/traces, protobuf body). Both flatten each
ExportTraceServiceRequest (resource_spans -> scope_spans -> spans) into `ReceivedSpan`s,
each keeping its resource's attributes, and `wait_for_spans(n, timeout)` blocks on a
Condition until n spans have arrived (no polling). Both bind 127.0.0.1:0, so tests never
share a port.

    with OtlpReceiver() as receiver:
        tracing = setup_tracing(TracingConfig(exporter="otlp", endpoint=receiver.url))
        ...
        spans = receiver.wait_for_spans(3, timeout=5)
"""

from __future__ import annotations

import gzip
import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class _SpanSink:
    """Collects spans from any transport; readers wait on a Condition."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._arrived = threading.Condition()

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = [
            ReceivedSpan(
                name=span.name,
                trace_id=int.from_bytes(span.trace_id, "big"),
                span_id=int.from_bytes(span.span_id, "big"),
                parent_span_id=int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None,
                kind=span.kind,
                attributes=_attributes(span.attributes),
                resource=_attributes(resource_spans.resource.attributes),
                scope=scope_spans.scope.name,
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._arrived:
            self._spans.extend(spans)
            self._arrived.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._arrived:
            return list(self._spans)

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """All spans received once there are at least n; TimeoutError if they do not come in time."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._spans) >= n, timeout):
                raise TimeoutError(f"received {len(self._spans)} of {n} spans in {timeout} s")
            return list(self._spans)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: _SpanSink) -> None:
        self._sink = sink

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._sink._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver(_SpanSink):
    """OTLP/gRPC trace receiver (plaintext) on 127.0.0.1, a context manager."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint with an http:// scheme: an OTLP gRPC exporter then connects in plaintext."""
        return f"http://{self.endpoint}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None).wait()


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_POST(self) -> None:  # noqa: N802 (http.server method name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        ok = self.path == "/v1/traces"
        if ok:
            self.server.sink._add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    sink: _SpanSink


class OtlpHttpReceiver(_SpanSink):
    """OTLP/HTTP trace receiver (POST /v1/traces, binary protobuf) on 127.0.0.1, a context manager."""

    def __init__(self) -> None:
        super().__init__()
        self._server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
        self._server.sink = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
