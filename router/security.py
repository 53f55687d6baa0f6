"""The front door's transport security and authentication.

- TLS: `TlsFiles(cert, key)` makes the gRPC port TLS-only; with `client_ca` it also
  requires a client certificate signed by that CA (mutual TLS). Files are read once,
  at start-up; a missing or unreadable file is a clear `ValueError` before anything binds.
- Bearer tokens: `BearerAuth(tokens)` is a grpc.aio server interceptor. Every call must
  carry `authorization: Bearer <token>` metadata with one of the tokens (compared in
  constant time), else it ends with UNAUTHENTICATED and a message saying what to send.
  grpc.health.v1 stays open: load balancers and Kubernetes probes cannot send tokens,
  and health reveals nothing but SERVING / NOT_SERVING.
Tokens and certificates are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tandem_api.connection import token_lines

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
AUTH_HINT = "send gRPC metadata 'authorization: Bearer <token>' with a token the server was given"


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # PEM certificate chain of the server
    key: str  # PEM private key
    client_ca: str | None = None  # PEM CA bundle: when set, clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        cert, key = _read(self.cert, "TLS certificate"), _read(self.key, "TLS key")
        ca = _read(self.client_ca, "TLS client CA") if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not data.strip():
        raise ValueError(f"the {what} file {path} is empty")
    return data


def read_tokens(path: str) -> list[str]:
    """Bearer tokens from a file: one per line, blank lines and # comments ignored."""
    tokens = token_lines(_read(path, "auth token"))
    if not tokens:
        raise ValueError(f"the auth token file {path} holds no token")
    return tokens


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("bearer authentication needs at least one non-empty token")

    def allowed(self, metadata) -> bool:
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            if scheme.lower() != "bearer":
                return False
            given = token.strip().encode()
            # compare against every token, always, so timing does not tell which one nearly matched
            return any([hmac.compare_digest(given, t) for t in self._tokens])
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        if self.allowed(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""
    message = f"missing or invalid bearer token: {AUTH_HINT}"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises; this makes it an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: stream(None, ctx), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: unary(None, ctx), **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
