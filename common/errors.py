"""Errors a worker raises to the router (torch-free, so the router can import them).

Ray wraps a worker's exception in RayTaskError; `.cause` is one of these (or an
`engine.errors.EngineError` for bad input). The router maps each to a gRPC status.
"""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A request failed inside a worker for a reason that is not the client's input."""


class KVTransferFailedError(WorkerError):
    """Pulling the prompt's KV from the prefill worker failed or timed out."""


class AdmissionTimeoutError(WorkerError):
    """The decode worker could not free enough KV blocks for the request in time."""


class WorkerShuttingDownError(WorkerError):
    """The worker is draining or its engine stopped."""
