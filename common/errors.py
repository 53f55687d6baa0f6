"""The errors that cross between processes: the engine's typed errors for bad input or unusable
models, and the errors a worker raises to the router. Torch-free, so the router can import them.

Every error says what was found and what to change. Engine errors derive from `EngineError` (bad
input or configuration: the router maps them to INVALID_ARGUMENT-style statuses); worker errors from
`WorkerError` (the request failed inside a worker for a reason that is not the client's input). Ray
wraps a worker's exception in RayTaskError; `.cause` is one of these.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(EngineError):
    """The model could not be loaded (missing path or file, corrupt file)."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or a feature of it is not supported."""


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) is invalid; nothing was admitted."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt, or prompt plus max_tokens, does not fit the model's context."""


class ConfigError(EngineError, ValueError):
    """An engine configuration value is invalid."""


class OutOfKVCacheError(EngineError):
    """The KV cache cannot hold even one request of this size."""


class WorkerError(RuntimeError):
    """A request failed inside a worker for a reason that is not the client's input."""


class KVTransferFailedError(WorkerError):
    """Pulling the prompt's KV from the prefill worker failed or timed out."""


class AdmissionTimeoutError(WorkerError):
    """The decode worker could not free enough KV blocks for the request in time."""


class WorkerShuttingDownError(WorkerError):
    """The worker is draining or its engine stopped."""
