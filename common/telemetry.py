"""OpenTelemetry tracing for Tandem: configuration, setup, W3C propagation, shared names.

One trace per request, continued from the gateway's W3C `traceparent` when it sends one:

    gateway --traceparent in gRPC metadata--> router: SPAN_GENERATE (SERVER)
                                                ├── SPAN_ROUTE
                                                ├── SPAN_PREFILL       prefill actor: carrier dict argument
                                                ├── SPAN_KV_TRANSFER   decode actor: carrier in KV transfer params
                                                └── SPAN_DECODE        decode actor: carrier dict argument

Context crosses a process boundary as a carrier, a plain `dict[str, str]` holding
`traceparent` (and `tracestate` when there is one): `inject()` on the sending side,
`extract(carrier)` on the receiving side, whose result goes to `start_span(context=...)`.
Both use a private TraceContextTextMapPropagator, never the global propagator, and
Tandem never sets the global tracer provider: each process (and each test) owns the
`Tracing` that `setup_tracing` returns.

Off by default. With exporter "none" the tracer is the API's `NoOpTracer`: no SDK object
exists and a span costs a no-op call. A no-op span inside an extracted context carries
that context, so `inject()` still passes the gateway's traceparent on unchanged.

Spans carry lengths, counts, ids and timings only. Prompt text, output text and token ids
never go into a span (CONTENT_ATTRIBUTES lists the semconv names Tandem never sets).

This module imports neither grpc, ray, torch nor the router; the OTLP exporters (which
import grpc or requests) and the SDK are imported inside `setup_tracing`.
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from opentelemetry.context import Context
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.attributes import rpc_attributes as rpc
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import NoOpTracer, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# Span names.
SPAN_GENERATE = "tandem.v1.Generation/Generate"  # router, SERVER kind (gRPC semconv: package.Service/Method)
SPAN_ROUTE = "tandem.route"
SPAN_PREFILL = "tandem.prefill"
SPAN_KV_TRANSFER = "tandem.kv_transfer"
SPAN_DECODE = "tandem.decode"
SPAN_VALIDATE = "tandem.validate"  # router: request checks and tokenization
SPAN_PREFILL_WORKER = "tandem.prefill.worker"  # prefill actor, child of SPAN_PREFILL
SPAN_DECODE_WORKER = "tandem.decode.worker"  # decode actor, child of SPAN_DECODE
SPAN_DECODE_ADMISSION = "tandem.decode.admission"  # decode: waiting for KV blocks
SPAN_DECODE_FIRST_STEP = "tandem.decode.first_step"  # decode: KV in -> token 2 (queueing in the batch + a step)
SPAN_GENERATE_LOCAL = "tandem.generate.local"  # a worker prefilling and decoding itself (local / aggregated)
SPAN_ENGINE_QUEUE = "tandem.engine.queue"  # arrival -> first schedule (engine clock)
SPAN_ENGINE_COMPUTE = "tandem.engine.compute"  # first schedule -> first token (engine clock)
EVENT_FIRST_TOKEN = "first_token"
EVENT_RETRY = "retry"  # on the request's span: a worker failed it and the router resumed it elsewhere
ATTR_RETRY_REASON = (
    "tandem.retry.reason"  # worker_unavailable | worker_stalled | kv_transfer_failed | aborted_on_worker
)
ATTR_RETRY_AFTER_TOKENS = "tandem.retry.after_tokens"  # output tokens already sent when it failed

# Attribute names: semconv names where one exists, "tandem.*" otherwise.
ATTR_REQUEST_ID = "tandem.request.id"
ATTR_WORKER_ID = "tandem.worker.id"
ATTR_ROUTE_REASON = "tandem.route.reason"
ATTR_ROUTE_KIND = "tandem.route.kind"  # local short|no_prefill_worker|saturated|aggregated, remote long|disabled
ATTR_PREFILL_WORKER = "tandem.route.prefill_worker"
ATTR_DECODE_WORKER = "tandem.route.decode_worker"
ATTR_PREFILL_CACHED_BLOCKS = "tandem.route.prefill_cached_blocks"  # matched prompt blocks on the chosen P
ATTR_DECODE_CACHED_BLOCKS = "tandem.route.decode_cached_blocks"
ATTR_KV_BYTES = "tandem.kv.bytes"
ATTR_KV_BLOCKS = "tandem.kv.blocks"
ATTR_KV_GBPS = "tandem.kv.gbps"
ATTR_KV_TRANSPORT = "tandem.kv.transport"
ATTR_MODEL = gen_ai.GEN_AI_REQUEST_MODEL  # "gen_ai.request.model"
ATTR_OPERATION = gen_ai.GEN_AI_OPERATION_NAME  # "gen_ai.operation.name"
ATTR_MAX_TOKENS = gen_ai.GEN_AI_REQUEST_MAX_TOKENS
ATTR_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
ATTR_CACHED_INPUT_TOKENS = gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS  # prefix-cache hits
ATTR_OUTPUT_TOKENS = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
ATTR_FINISH_REASONS = gen_ai.GEN_AI_RESPONSE_FINISH_REASONS  # a list of strings
ATTR_TIME_TO_FIRST_CHUNK = gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK  # seconds
ATTR_RPC_SYSTEM = rpc.RPC_SYSTEM_NAME  # "grpc"
ATTR_RPC_METHOD = rpc.RPC_METHOD
ATTR_RPC_STATUS = rpc.RPC_RESPONSE_STATUS_CODE  # status code name, e.g. "UNAVAILABLE"
ATTR_ERROR_TYPE = ERROR_TYPE

ATTRIBUTE_NAMES = tuple(value for name, value in sorted(globals().items()) if name.startswith("ATTR_"))

# Message content: the semconv names Tandem never sets on a span.
CONTENT_ATTRIBUTES = frozenset(
    {
        gen_ai.GEN_AI_PROMPT,
        gen_ai.GEN_AI_COMPLETION,
        gen_ai.GEN_AI_INPUT_MESSAGES,
        gen_ai.GEN_AI_OUTPUT_MESSAGES,
        gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS,
    }
)

_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = frozenset(_PROPAGATOR.fields)


class TracingConfigError(ValueError):
    """A tracing setting (given or read from OTEL_* variables) is invalid."""


class Exporter(str, enum.Enum):
    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"
    MEMORY = "memory"  # tests: spans stay in this process, see Tracing.finished_spans


class OtlpProtocol(str, enum.Enum):
    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


_DEFAULT_ENDPOINTS = {
    OtlpProtocol.GRPC: "http://localhost:4317",
    OtlpProtocol.HTTP_PROTOBUF: "http://localhost:4318/v1/traces",
}
_SAMPLERS = {"always_on": 1.0, "parentbased_always_on": 1.0, "always_off": 0.0, "parentbased_always_off": 0.0}


@dataclass(frozen=True)
class TracingConfig:
    """How spans leave the process.

    endpoint: the traces endpoint, used as given (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT semantics):
      grpc "http://host:4317" or "host:4317"; http/protobuf "http://host:4318/v1/traces".
      None: the OTLP default of the protocol.
    insecure: gRPC only. None lets the endpoint decide ("http://" plaintext, "https://" TLS, and,
      as opentelemetry-python does, a bare "host:port" TLS).
    sample_ratio: of root traces; always parent-based, so a sampled gateway trace stays sampled.
    Headers, timeout, compression and certificates are read by the OTLP exporters from the
    process's OTEL_EXPORTER_OTLP_(TRACES_)* variables; resource attributes from OTEL_RESOURCE_ATTRIBUTES.
    """

    exporter: Exporter = Exporter.NONE
    protocol: OtlpProtocol = OtlpProtocol.GRPC  # opentelemetry-python's default for "otlp"
    endpoint: str | None = None
    insecure: bool | None = None
    service_name: str = "tandem"
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name, kind in (("exporter", Exporter), ("protocol", OtlpProtocol)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(member.value for member in kind)
                raise TracingConfigError(f"tracing {name} must be one of {choices}; got {value!r}") from None
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise TracingConfigError(f"sample_ratio must be in [0, 1], got {self.sample_ratio}")
        if not self.service_name:
            raise TracingConfigError("service_name must not be empty")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TracingConfig:
        """Explicit values win; a field not given (or given as None) comes from OTEL_*; defaults last.

        Reads OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL,
        OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, OTEL_EXPORTER_OTLP_(TRACES_)INSECURE, OTEL_SERVICE_NAME
        (then service.name in OTEL_RESOURCE_ATTRIBUTES), OTEL_TRACES_SAMPLER(_ARG). The signal-specific
        TRACES_ variable wins over the general one. A general OTEL_EXPORTER_OTLP_ENDPOINT is a base URL:
        http/protobuf appends "/v1/traces" to it, grpc uses it as is.
        """
        env = os.environ if environ is None else environ
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown tracing settings: {sorted(unknown)}")
        given = {key: value for key, value in overrides.items() if value is not None}

        def read(*names: str) -> str | None:
            for name in names:
                if value := env.get(name, "").strip():
                    return value
            return None

        found: dict[str, Any] = {}
        exporters = [part.strip().lower() for part in (read("OTEL_TRACES_EXPORTER") or "").split(",") if part.strip()]
        if len(exporters) > 1:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER: one exporter at a time, got {exporters}")
        if exporters:
            found["exporter"] = exporters[0]
        if (read("OTEL_SDK_DISABLED") or "").lower() == "true":
            found["exporter"] = Exporter.NONE
        if protocol := read("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            found["protocol"] = protocol
        protocol = given.get("protocol", found.get("protocol", OtlpProtocol.GRPC))
        if endpoint := read("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            found["endpoint"] = endpoint
        elif base := read("OTEL_EXPORTER_OTLP_ENDPOINT"):
            found["endpoint"] = f"{base.rstrip('/')}/v1/traces" if protocol == OtlpProtocol.HTTP_PROTOBUF else base
        if insecure := read("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
            found["insecure"] = insecure.lower() == "true"
        resource_service_name = _resource_attribute(read("OTEL_RESOURCE_ATTRIBUTES"), "service.name")
        if service_name := read("OTEL_SERVICE_NAME") or resource_service_name:
            found["service_name"] = service_name
        if sampler := read("OTEL_TRACES_SAMPLER"):
            found["sample_ratio"] = _sample_ratio(sampler.lower(), read("OTEL_TRACES_SAMPLER_ARG"))
        return cls(**{**found, **given})


def _resource_attribute(spec: str | None, key: str) -> str | None:
    for item in (spec or "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip() == key and value.strip():
            return unquote(value.strip())
    return None


def _sample_ratio(sampler: str, arg: str | None) -> float:
    if sampler in _SAMPLERS:
        return _SAMPLERS[sampler]
    if sampler not in ("traceidratio", "parentbased_traceidratio"):
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER {sampler!r} is not supported (ratio-based samplers only)")
    try:
        return float(arg) if arg is not None else 1.0
    except ValueError:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG must be a number, got {arg!r}") from None


@dataclass(eq=False)
class Tracing:
    """What `setup_tracing` built. `provider` is None when tracing is off."""

    config: TracingConfig
    tracer: Tracer
    provider: TracerProvider | None = None
    _memory: InMemorySpanExporter | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def finished_spans(self) -> tuple[ReadableSpan, ...]:
        """Spans ended so far, oldest first (exporter "memory" only)."""
        if self._memory is None:
            raise RuntimeError(f"finished_spans needs exporter 'memory', not {self.config.exporter.value!r}")
        return tuple(self._memory.get_finished_spans())

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter. Idempotent."""
        if self.provider is not None and not self._closed:
            self._closed = True
            self.provider.force_flush()
            self.provider.shutdown()


def tandem_version() -> str:
    try:
        return importlib.metadata.version("tandem-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def setup_tracing(config: TracingConfig) -> Tracing:
    """Build a tracer for `config`. The caller owns the result and calls `shutdown()` at exit."""
    if config.exporter is Exporter.NONE:
        return Tracing(config, NoOpTracer())
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    version = tandem_version()
    resource = Resource.create({SERVICE_NAME: config.service_name, SERVICE_VERSION: version})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    memory = None
    if config.exporter is Exporter.MEMORY:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))  # synchronous: tests read spans at once
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(config)))  # off the request path
    return Tracing(config, provider.get_tracer("tandem", version), provider, memory)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter is Exporter.CONSOLE:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # `out` given explicitly: the exporter's default is the sys.stdout of when the SDK was first imported
        return ConsoleSpanExporter(service_name=config.service_name, out=sys.stdout)
    endpoint = config.endpoint or _DEFAULT_ENDPOINTS[config.protocol]
    if config.protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=config.insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def record_error(span, exc: BaseException) -> None:
    """Mark a span failed: error.type and an ERROR status with the exception's one-line message."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(ATTR_ERROR_TYPE, type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def end_stream_span(span, output_tokens: int, finish_reason: str | None) -> None:
    """End a worker's streaming span with the output token count and the finish reason. Call it on the
    last chunk, before yielding it (so the span has ended before the router sees the end), or in the
    stream's `finally` if it stopped early."""
    span.set_attribute(ATTR_OUTPUT_TOKENS, output_tokens)
    if finish_reason:
        span.set_attribute(ATTR_FINISH_REASONS, [finish_reason])
    span.end()


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C carrier of `context` (default: the current one); {} when it holds no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Context:
    """The context a carrier describes: a dict, or gRPC metadata ((key, value) pairs, any key case).

    Missing or malformed traceparent: an empty Context, so a span started with it is a new root.
    Binary ("-bin") metadata values are bytes and are ignored.
    """
    headers: dict[str, list[str]] = {}
    items = carrier.items() if isinstance(carrier, Mapping) else (carrier or ())
    for key, value in items:
        if isinstance(key, str) and isinstance(value, str) and key.lower() in _FIELDS:
            headers.setdefault(key.lower(), []).append(value)
    return _PROPAGATOR.extract(headers, context=Context()) if headers else Context()
