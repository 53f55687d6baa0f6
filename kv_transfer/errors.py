"""Typed errors of the KV transfer layer.

All derive from `TransferError`, so a worker can catch the layer's failures without
catching unrelated ones. Each message says what was found and what to change.
They live in their own module so that `layout`, `plan` and `transport` can all raise
them without importing each other; `kv_transfer.transport` re-exports them.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base class of every error the KV transfer layer raises on purpose."""


class InvalidLayoutError(TransferError, ValueError):
    """A KVLayout is malformed (negative sizes, a layer or head range outside the model)."""


class IncompatiblePeerError(TransferError):
    """Two peers can never exchange KV: different model, dtype, head_dim, block size, ...

    Raised at handshake time, before any traffic, with every mismatching field named.
    """


class TransportVersionError(TransferError):
    """The peer speaks another version of the handshake protocol."""


class UnknownPeerError(TransferError, KeyError):
    """A transfer names a peer that was never added (or was removed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TransportUnavailableError(TransferError):
    """The transport cannot be used here (library not installed, backend not loadable)."""


class InvalidPlanError(TransferError, ValueError):
    """A transfer plan is malformed: lengths differ, block ids out of range, duplicate targets."""


class UnsupportedConversionError(TransferError):
    """Source and destination layouts differ in shape; copying needs a layout conversion."""
