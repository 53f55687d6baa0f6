"""Typed errors raised by the engine for bad input or unusable models.

Every error says what was found and what to change. They all derive from
`EngineError` so callers (the CLI, later the gRPC front door) can map them to a
clear message or status without catching unrelated exceptions.
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
