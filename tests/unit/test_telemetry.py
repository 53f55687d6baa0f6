"""common.telemetry: OTEL_* precedence, the no-op default, W3C propagation over dict and gRPC carriers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.trace import NoOpTracer, SpanKind

from common import telemetry
from common.telemetry import Exporter, OtlpProtocol, TracingConfig, TracingConfigError, extract, inject, setup_tracing

REPO = Path(__file__).resolve().parents[2]
GATEWAY_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
GATEWAY_SPAN = 0x00F067AA0BA902B7
GATEWAY_TRACEPARENT = f"00-{GATEWAY_TRACE:032x}-{GATEWAY_SPAN:016x}-01"


@pytest.fixture
def memory() -> Iterator[telemetry.Tracing]:
    tracing = setup_tracing(TracingConfig(exporter=Exporter.MEMORY, service_name="tandem-test"))
    yield tracing
    tracing.shutdown()


# --- configuration ---------------------------------------------------------------------------


def test_default_is_off() -> None:
    config = TracingConfig.from_env(environ={})
    assert config == TracingConfig()
    assert (config.exporter, config.protocol) == (Exporter.NONE, OtlpProtocol.GRPC)
    assert (config.endpoint, config.insecure) == (None, None)
    assert (config.service_name, config.sample_ratio) == ("tandem", 1.0)


def test_env_is_read() -> None:
    config = TracingConfig.from_env(
        environ={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_SERVICE_NAME": "tandem-router",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert config == TracingConfig(
        exporter=Exporter.OTLP,
        protocol=OtlpProtocol.HTTP_PROTOBUF,
        endpoint="http://collector:4318/v1/traces",
        service_name="tandem-router",
        sample_ratio=0.25,
    )


def test_traces_variables_win_over_general_ones() -> None:
    config = TracingConfig.from_env(
        environ={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
            "OTEL_EXPORTER_OTLP_INSECURE": "false",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        }
    )
    assert (config.protocol, config.endpoint, config.insecure) == (OtlpProtocol.GRPC, "http://traces:4317", True)


def test_general_endpoint_is_a_base_url_for_http_only() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert TracingConfig.from_env(environ=env).endpoint == "http://c:4317"
    assert TracingConfig.from_env(environ=env, protocol="http/protobuf").endpoint == "http://c:4317/v1/traces"
    traces_env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}  # signal-specific: used as is
    assert TracingConfig.from_env(environ=traces_env, protocol="http/protobuf").endpoint == "http://c:4318/custom"


def test_explicit_values_win_and_none_means_unset() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317",
    }
    config = TracingConfig.from_env(environ=env, exporter="otlp", service_name="explicit", endpoint=None)
    assert (config.exporter, config.service_name, config.endpoint) == (Exporter.OTLP, "explicit", "http://env:4317")


def test_sdk_disabled_turns_tracing_off() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert TracingConfig.from_env(environ=env).exporter is Exporter.NONE


def test_service_name_from_resource_attributes() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=tandem%20edge"}
    assert TracingConfig.from_env(environ=env).service_name == "tandem edge"
    assert TracingConfig.from_env(environ={**env, "OTEL_SERVICE_NAME": "wins"}).service_name == "wins"


@pytest.mark.parametrize(
    ("env", "overrides"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, {}),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, {}),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, {}),
        ({"OTEL_TRACES_SAMPLER": "xray"}, {}),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, {}),
        ({}, {"sample_ratio": 1.5}),
        ({}, {"service_name": ""}),
    ],
)
def test_invalid_settings_raise(env: dict[str, str], overrides: dict) -> None:
    with pytest.raises(TracingConfigError):
        TracingConfig.from_env(environ=env, **overrides)


def test_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="exporters"):
        TracingConfig.from_env(environ={}, exporters="otlp")


# --- tracing off ------------------------------------------------------------------------------


def test_none_is_the_api_noop_tracer() -> None:
    tracing = setup_tracing(TracingConfig())
    assert type(tracing.tracer) is NoOpTracer and tracing.provider is None and not tracing.enabled
    with tracing.tracer.start_as_current_span(telemetry.SPAN_GENERATE) as span:
        span.set_attribute(telemetry.ATTR_INPUT_TOKENS, 3)
        assert not span.is_recording()
        assert inject() == {}  # the API injects nothing for an invalid span context
    with pytest.raises(RuntimeError, match="memory"):
        tracing.finished_spans()
    tracing.shutdown()


def test_none_passes_the_gateway_context_on() -> None:
    """The no-op tracer's span holds the parent's context: workers still see the gateway trace."""
    tracing = setup_tracing(TracingConfig())
    with tracing.tracer.start_as_current_span("x", context=extract({"traceparent": GATEWAY_TRACEPARENT})):
        assert inject() == {"traceparent": GATEWAY_TRACEPARENT}


def test_none_loads_no_sdk() -> None:
    code = (
        "import sys\nfrom common.telemetry import TracingConfig, setup_tracing\n"
        "setup_tracing(TracingConfig.from_env(environ={}))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', 'grpc'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_console_exporter_writes_spans(capfd: pytest.CaptureFixture[str]) -> None:
    tracing = setup_tracing(TracingConfig(exporter=Exporter.CONSOLE, service_name="tandem-console"))
    with tracing.tracer.start_as_current_span(telemetry.SPAN_DECODE):
        pass
    tracing.shutdown()
    out = capfd.readouterr().out
    assert f'"name": "{telemetry.SPAN_DECODE}"' in out and "tandem-console" in out


# --- spans and propagation ----------------------------------------------------------------------


def test_parent_and_child_share_a_trace(memory: telemetry.Tracing) -> None:
    with memory.tracer.start_as_current_span(telemetry.SPAN_GENERATE, kind=SpanKind.SERVER) as parent:
        with memory.tracer.start_as_current_span(telemetry.SPAN_ROUTE) as child:
            child.set_attribute(telemetry.ATTR_ROUTE_REASON, "prefix_hit")
    route, generate = memory.finished_spans()  # children end first
    assert route.context.trace_id == generate.context.trace_id == parent.get_span_context().trace_id
    assert route.parent is not None and route.attributes is not None
    assert route.parent.span_id == generate.context.span_id and generate.parent is None
    assert route.attributes[telemetry.ATTR_ROUTE_REASON] == "prefix_hit"
    assert generate.resource.attributes["service.name"] == "tandem-test"
    assert generate.resource.attributes["service.version"] == telemetry.tandem_version() != ""
    assert generate.instrumentation_scope is not None and generate.instrumentation_scope.name == "tandem"


def test_inject_extract_round_trip(memory: telemetry.Tracing) -> None:
    with memory.tracer.start_as_current_span(telemetry.SPAN_GENERATE) as sender:
        carrier = inject()
    assert set(carrier) == {"traceparent"}
    with memory.tracer.start_as_current_span(telemetry.SPAN_PREFILL, context=extract(carrier)):
        pass
    prefill = memory.finished_spans()[-1]
    assert prefill.context.trace_id == sender.get_span_context().trace_id
    assert prefill.parent is not None
    assert prefill.parent.span_id == sender.get_span_context().span_id and prefill.parent.is_remote


def test_tracestate_travels(memory: telemetry.Tracing) -> None:
    carrier = {"traceparent": GATEWAY_TRACEPARENT, "tracestate": "vendor=abc"}
    with memory.tracer.start_as_current_span("x", context=extract(carrier)) as span:
        forwarded = inject()
    assert forwarded == {
        "traceparent": f"00-{GATEWAY_TRACE:032x}-{span.get_span_context().span_id:016x}-01",
        "tracestate": "vendor=abc",
    }


@pytest.mark.parametrize(
    "metadata",
    [
        (("user-agent", "grpc-python"), ("traceparent", GATEWAY_TRACEPARENT), ("x-bin", b"\x00\x01")),
        grpc.aio.Metadata(("traceparent", GATEWAY_TRACEPARENT), ("authorization", "secret")),
        {"Traceparent": GATEWAY_TRACEPARENT},  # an HTTP-style key case
    ],
    ids=["tuples", "aio-metadata", "mixed-case-dict"],
)
def test_extract_from_grpc_metadata(memory: telemetry.Tracing, metadata) -> None:
    with memory.tracer.start_as_current_span(telemetry.SPAN_GENERATE, context=extract(metadata)):
        pass
    (span,) = memory.finished_spans()
    assert span.context.trace_id == GATEWAY_TRACE
    assert span.parent is not None
    assert span.parent.span_id == GATEWAY_SPAN and span.parent.is_remote


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{GATEWAY_TRACE:032x}-0000000000000000-01",  # all-zero span id
        f"ff-{GATEWAY_TRACE:032x}-{GATEWAY_SPAN:016x}-01",  # version ff is invalid
        f"00-{GATEWAY_TRACE:032x}-{GATEWAY_SPAN:016x}-01-extra",  # version 00 allows no extra field
        f"00-{GATEWAY_TRACE:032X}-{GATEWAY_SPAN:016x}-01",  # upper-case hex
    ],
)
def test_malformed_traceparent_starts_a_new_trace(memory: telemetry.Tracing, traceparent: str) -> None:
    context = extract([("traceparent", traceparent)])
    with memory.tracer.start_as_current_span(telemetry.SPAN_GENERATE, context=context):
        pass
    (span,) = memory.finished_spans()
    assert span.parent is None and span.context.trace_id != GATEWAY_TRACE


@pytest.mark.parametrize("carrier", [None, {}, [], {"other": "x"}])
def test_empty_carrier_is_an_empty_context(carrier) -> None:
    assert extract(carrier) == {}


def test_sampling_is_parent_based() -> None:
    tracing = setup_tracing(TracingConfig(exporter=Exporter.MEMORY, sample_ratio=0.0))
    try:
        with tracing.tracer.start_as_current_span("root-dropped"):
            pass
        gateway = extract({"traceparent": GATEWAY_TRACEPARENT})
        with tracing.tracer.start_as_current_span("gateway-sampled", context=gateway):
            pass
        assert [span.name for span in tracing.finished_spans()] == ["gateway-sampled"]
    finally:
        tracing.shutdown()


def test_shutdown_is_idempotent(memory: telemetry.Tracing) -> None:
    memory.shutdown()
    memory.shutdown()


# --- names ------------------------------------------------------------------------------------


def test_attribute_names_never_carry_content() -> None:
    assert len(set(telemetry.ATTRIBUTE_NAMES)) == len(telemetry.ATTRIBUTE_NAMES) >= 19
    assert not set(telemetry.ATTRIBUTE_NAMES) & telemetry.CONTENT_ATTRIBUTES
    for name in telemetry.ATTRIBUTE_NAMES:
        assert not any(word in name for word in ("prompt", "messages", "completion", "text", "token_ids")), name
    assert {
        "tandem.route.reason",
        "tandem.kv.bytes",
        "tandem.kv.blocks",
        "tandem.kv.gbps",
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons",
    } <= set(telemetry.ATTRIBUTE_NAMES)
