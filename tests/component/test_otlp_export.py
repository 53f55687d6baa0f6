"""Spans leave the process over real OTLP (gRPC and HTTP/protobuf) to receivers on loopback.

`force_flush` exports synchronously, so once it returns the receiver holds the spans;
`wait_for_spans` only guards against a regression with a clear timeout, it never polls.
"""

from __future__ import annotations

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.trace import SpanKind

from common import telemetry
from common.telemetry import Exporter, OtlpProtocol, TracingConfig, extract, setup_tracing
from tests.helpers.otlp_receiver import OtlpHttpReceiver, OtlpReceiver, ReceivedSpan

GATEWAY_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
GATEWAY_SPAN = 0x00F067AA0BA902B7


def emit_request(config: TracingConfig) -> tuple[int, int, int]:
    """One request's spans: router SERVER span under the gateway's, a KV transfer child. Returns ids."""
    tracing = setup_tracing(config)
    try:
        gateway = extract([("traceparent", f"00-{GATEWAY_TRACE:032x}-{GATEWAY_SPAN:016x}-01")])
        tracer = tracing.tracer
        with tracer.start_as_current_span(telemetry.SPAN_GENERATE, context=gateway, kind=SpanKind.SERVER) as root:
            root.set_attributes(
                {
                    telemetry.ATTR_MODEL: "tiny",
                    telemetry.ATTR_INPUT_TOKENS: 12,
                    telemetry.ATTR_FINISH_REASONS: ["stop"],
                    telemetry.ATTR_RPC_SYSTEM: "grpc",
                }
            )
            with tracer.start_as_current_span(telemetry.SPAN_KV_TRANSFER) as kv:
                kv.set_attributes(
                    {telemetry.ATTR_KV_BYTES: 1 << 20, telemetry.ATTR_KV_BLOCKS: 4, telemetry.ATTR_KV_GBPS: 1.5}
                )
        assert tracing.force_flush(5_000)
    finally:
        tracing.shutdown()
    return root.get_span_context().trace_id, root.get_span_context().span_id, kv.get_span_context().span_id


def check_request(spans: list[ReceivedSpan], ids: tuple[int, int, int], service_name: str) -> None:
    trace_id, root_id, kv_id = ids
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == sorted([telemetry.SPAN_GENERATE, telemetry.SPAN_KV_TRANSFER]) and len(spans) == 2
    root, kv = by_name[telemetry.SPAN_GENERATE], by_name[telemetry.SPAN_KV_TRANSFER]
    assert trace_id == GATEWAY_TRACE and {root.trace_id, kv.trace_id} == {GATEWAY_TRACE}
    assert (root.span_id, root.parent_span_id, root.kind) == (root_id, GATEWAY_SPAN, ProtoSpan.SPAN_KIND_SERVER)
    assert (kv.span_id, kv.parent_span_id) == (kv_id, root_id)
    assert root.attributes == {
        "gen_ai.request.model": "tiny",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.response.finish_reasons": ["stop"],
        "rpc.system.name": "grpc",
    }
    assert kv.attributes == {"tandem.kv.bytes": 1 << 20, "tandem.kv.blocks": 4, "tandem.kv.gbps": 1.5}
    for span in spans:
        assert span.resource["service.name"] == service_name
        assert span.resource["service.version"] == telemetry.tandem_version()
        assert span.scope == "tandem"


@pytest.mark.parametrize("endpoint", ["url", "bare"])
def test_otlp_grpc(endpoint: str) -> None:
    with OtlpReceiver() as receiver:
        if endpoint == "url":  # http:// scheme: plaintext
            config = TracingConfig(
                exporter=Exporter.OTLP, protocol=OtlpProtocol.GRPC, endpoint=receiver.url, service_name="tandem-router"
            )
        else:  # a bare host:port is TLS unless told otherwise
            config = TracingConfig(
                exporter=Exporter.OTLP,
                protocol=OtlpProtocol.GRPC,
                endpoint=receiver.endpoint,
                insecure=True,
                service_name="tandem-router",
            )
        ids = emit_request(config)
        check_request(receiver.wait_for_spans(2, timeout=10), ids, "tandem-router")


def test_otlp_grpc_from_env() -> None:
    with OtlpReceiver() as receiver:
        config = TracingConfig.from_env(
            environ={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "OTEL_SERVICE_NAME": "tandem-decode",
            }
        )
        ids = emit_request(config)
        check_request(receiver.wait_for_spans(2, timeout=10), ids, "tandem-decode")


def test_otlp_http_protobuf_from_env() -> None:
    with OtlpHttpReceiver() as receiver:
        base = receiver.url.removesuffix("/v1/traces")  # the general variable is a base URL
        config = TracingConfig.from_env(
            environ={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": base,
                "OTEL_SERVICE_NAME": "tandem-prefill",
            }
        )
        assert config.endpoint == receiver.url
        ids = emit_request(config)
        check_request(receiver.wait_for_spans(2, timeout=10), ids, "tandem-prefill")
