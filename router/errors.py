"""The router's typed errors, and the one place that maps them to what each front door answers.

The request path (router/request_path.py) ends every request with an `Outcome`; the `OUTCOMES` table
says what each one is on the gRPC door (status code) and on the HTTP door (status and the OpenAI
error object's `type`). Neither door maps errors itself.

    exception                                   status               retry?
    RequestValidationError                      INVALID_ARGUMENT     no: change the request
    common.errors.InvalidRequestError (worker)  INVALID_ARGUMENT     no
    common.errors.OutOfKVCacheError (worker)    INVALID_ARGUMENT     no: the request can never fit
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

import enum
from dataclasses import dataclass

import grpc

from common.contract import (
    AdmissionTimeoutError,
    EngineError,
    InvalidRequestError,
    KVTransferFailedError,
    OutOfKVCacheError,
    WorkerShuttingDownError,
)


class Outcome(enum.Enum):
    """How a request ended, in the request path's words (the names are gRPC's canonical codes)."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # change the request
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no valid bearer token
    NOT_FOUND = "NOT_FOUND"  # no such model (HTTP door)
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # queue full: retry later
    UNAVAILABLE = "UNAVAILABLE"  # no worker can serve, not serving yet, draining
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the request's deadline
    CANCELLED = "CANCELLED"  # the client went away
    INTERNAL = "INTERNAL"  # a worker failed the request, or a bug

    @property
    def door(self) -> DoorStatus:
        return OUTCOMES[self]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return OUTCOMES[self].grpc_code


@dataclass(frozen=True)
class DoorStatus:
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str  # the OpenAI error object's "type"


# The one table: a request path outcome -> what the gRPC door and the HTTP (OpenAI) door answer.
OUTCOMES: dict[Outcome, DoorStatus] = {
    Outcome.OK: DoorStatus(grpc.StatusCode.OK, 200, ""),
    Outcome.INVALID_ARGUMENT: DoorStatus(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    Outcome.UNAUTHENTICATED: DoorStatus(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    Outcome.NOT_FOUND: DoorStatus(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    Outcome.RESOURCE_EXHAUSTED: DoorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    Outcome.UNAVAILABLE: DoorStatus(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    Outcome.DEADLINE_EXCEEDED: DoorStatus(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    Outcome.CANCELLED: DoorStatus(grpc.StatusCode.CANCELLED, 499, "cancelled"),
    Outcome.INTERNAL: DoorStatus(grpc.StatusCode.INTERNAL, 500, "internal_server_error"),
}


class RouterError(Exception):
    """Base of every error the router raises on purpose; `str(e)` is the client-facing message."""

    outcome: Outcome = Outcome.INTERNAL

    @property
    def code(self) -> grpc.StatusCode:
        return self.outcome.grpc_code


class RequestValidationError(RouterError, ValueError):
    """The request is malformed or cannot be served as given (bad field, too long, ...). `param`: the
    request field at fault, where one is (the OpenAI error object's `param`)."""

    outcome = Outcome.INVALID_ARGUMENT

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdmissionError(RouterError):
    """The router is at its in-flight limit; the client should back off and retry."""

    outcome = Outcome.RESOURCE_EXHAUSTED


class NotServingError(RouterError):
    """The server is up but its worker pools are not ready (or it is draining)."""

    outcome = Outcome.UNAVAILABLE


class WorkerUnavailableError(RouterError):
    """A worker is gone (actor died, node lost) or unreachable; the request may be retried."""

    outcome = Outcome.UNAVAILABLE

    def __init__(self, message: str, worker_id: str = "") -> None:
        super().__init__(message)
        self.worker_id = worker_id


class NoHealthyWorkerError(WorkerUnavailableError):
    """Every worker of a pool is marked unhealthy."""


class WorkerStalledError(WorkerUnavailableError):
    """A worker answers calls but sent nothing on a request's stream for `router.stream_idle_timeout_s`."""


class WorkerFailedError(RouterError):
    """A worker failed the request (a chunk with `error` set, a stream that ended early, ...)."""

    outcome = Outcome.INTERNAL

    def __init__(self, message: str, worker_id: str = "") -> None:
        super().__init__(message)
        self.worker_id = worker_id


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line, cut to `limit` characters (status messages travel in a trailer)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def outcome_for(exc: BaseException) -> tuple[Outcome, str]:
    """The outcome and one-line message a client sees for `exc`."""
    if isinstance(exc, RouterError):
        return exc.outcome, one_line(str(exc))
    if isinstance(exc, AdmissionTimeoutError):
        return Outcome.RESOURCE_EXHAUSTED, one_line(str(exc))
    if isinstance(exc, (KVTransferFailedError, WorkerShuttingDownError)):
        return Outcome.UNAVAILABLE, one_line(str(exc))
    if isinstance(exc, (InvalidRequestError, OutOfKVCacheError)):
        return Outcome.INVALID_ARGUMENT, one_line(str(exc))
    if isinstance(exc, EngineError):
        return Outcome.INTERNAL, one_line(f"engine error: {type(exc).__name__}: {exc}")
    return Outcome.INTERNAL, one_line(f"internal error: {type(exc).__name__}: {exc}")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and one-line message a client sees for `exc` (`outcome_for` on the gRPC door)."""
    outcome, message = outcome_for(exc)
    return outcome.grpc_code, message
