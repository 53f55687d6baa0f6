"""The gRPC port: GenerationService's handlers with lenient request parsing, health checking,
reflection, TLS and bearer tokens, bound to host:port (`build_server`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.errors import one_line
from router.security import BearerAuth, TlsFiles
from tandem_api.v1 import generation_pb2 as pb


class GenerationDoor(Protocol):
    """What the port serves (router/server.py's GenerationService; named here so the two modules do not
    import each other)."""

    health: Any  # a grpc.health.v1 HealthServicer

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> None: ...

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any: ...


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "tandem.v1.Generation"


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not a valid message (bad wire format, invalid UTF-8 in a string)."""

    message: str


def _lenient(cls):
    """A request deserializer that hands the handler an `Undecodable` instead of failing: grpc.aio would
    answer a DecodeError with UNKNOWN and its exception text; the handler says INVALID_ARGUMENT."""

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"the request is not a valid {cls.DESCRIPTOR.full_name}: {one_line(str(exc))}")

    return parse


def _add_generation(service: GenerationDoor, server: grpc.aio.Server) -> None:
    """tandem.v1.Generation as the generated add_GenerationServicer_to_server, with lenient request parsing."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo,
            request_deserializer=_lenient(pb.GetServerInfoRequest),
            response_serializer=pb.ServerInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_server(
    service: GenerationDoor,
    host: str = "127.0.0.1",
    port: int = 0,
    extra: Sequence[tuple[Callable[[grpc.aio.Server], None], str]] = (),
    tls: TlsFiles | None = None,
    auth_tokens: Sequence[str] = (),
    max_message_bytes: int = 16 << 20,
) -> grpc.aio.Server:
    """A grpc.aio server with Generation, health checking and reflection, bound to host:port (not started).

    `extra`: (add_to_server, full service name) of more services on the same port (deploy's Admin).
    `tls`: TLS-only port (mutual TLS with a client CA); `auth_tokens`: every call but health needs
    `authorization: Bearer <one of them>` (router/security.py).

    Port 0 picks a free port; the bound one is `server.tandem_port`. SO_REUSEPORT is off,
    so a second server cannot silently share a port with the first. Call inside the event
    loop that will run it; then `await server.start()`.
    """
    interceptors = [BearerAuth(auth_tokens)] if auth_tokens else []
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_message_bytes)],
        interceptors=interceptors,
    )
    _add_generation(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    for add, _ in extra:
        add(server)
    names = (SERVICE_NAME, *(name for _, name in extra), health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port} (address in use or not available)")
    server.tandem_port = bound  # type: ignore[attr-defined]
    return server
