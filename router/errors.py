"""The router's typed errors, and the one place that maps errors to gRPC status codes.

    exception                                   status               retry?
    RequestValidationError                      INVALID_ARGUMENT     no: change the request
    engine.errors.InvalidRequestError (worker)  INVALID_ARGUMENT     no
    engine.errors.OutOfKVCacheError (worker)    INVALID_ARGUMENT     no: the request can never fit
    AdmissionError                              RESOURCE_EXHAUSTED   yes, later
    NotServingError                             UNAVAILABLE          yes (server still starting)
    WorkerUnavailableError / NoHealthyWorker    UNAVAILABLE          yes
    WorkerStalledError (stream idle too long)   UNAVAILABLE          yes
    WorkerFailedError (chunk.error, bad stream) INTERNAL             maybe
    TimeoutError (the request's deadline)       DEADLINE_EXCEEDED    with a longer deadline
    anything else                               INTERNAL             one line, never a stack trace

`status_for(exc)` returns (code, one-line message); the server logs the full
exception itself. Messages are single lines because gRPC puts them in a trailer.
"""

from __future__ import annotations

import grpc

from common.errors import AdmissionTimeoutError, KVTransferFailedError, WorkerShuttingDownError
from engine.errors import EngineError, InvalidRequestError, OutOfKVCacheError


class RouterError(Exception):
    """Base of every error the router raises on purpose; `str(e)` is the client-facing message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class RequestValidationError(RouterError, ValueError):
    """The request is malformed or cannot be served as given (bad field, too long, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AdmissionError(RouterError):
    """The router is at its in-flight limit; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotServingError(RouterError):
    """The server is up but its worker pools are not ready (or it is draining)."""

    code = grpc.StatusCode.UNAVAILABLE


class WorkerUnavailableError(RouterError):
    """A worker is gone (actor died, node lost) or unreachable; the request may be retried."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, worker_id: str = "") -> None:
        super().__init__(message)
        self.worker_id = worker_id


class NoHealthyWorkerError(WorkerUnavailableError):
    """Every worker of a pool is marked unhealthy."""


class WorkerStalledError(WorkerUnavailableError):
    """A worker answers calls but sent nothing on a request's stream for `router.stream_idle_timeout_s`."""


class WorkerFailedError(RouterError):
    """A worker failed the request (a chunk with `error` set, a stream that ended early, ...)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, worker_id: str = "") -> None:
        super().__init__(message)
        self.worker_id = worker_id


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line, cut to `limit` characters (status messages travel in a trailer)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and one-line message a client sees for `exc`."""
    if isinstance(exc, RouterError):
        return exc.code, one_line(str(exc))
    if isinstance(exc, AdmissionTimeoutError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, one_line(str(exc))
    if isinstance(exc, (KVTransferFailedError, WorkerShuttingDownError)):
        return grpc.StatusCode.UNAVAILABLE, one_line(str(exc))
    if isinstance(exc, (InvalidRequestError, OutOfKVCacheError)):
        return grpc.StatusCode.INVALID_ARGUMENT, one_line(str(exc))
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INTERNAL, one_line(f"engine error: {type(exc).__name__}: {exc}")
    return grpc.StatusCode.INTERNAL, one_line(f"internal error: {type(exc).__name__}: {exc}")
