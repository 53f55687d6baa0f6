"""The `Transport` protocol, its enums and handle, and the versioned handshake payload.

Every implementation (InProcessTransport, NixlTransport, FaultyTransport) passes one
conformance suite (tests/component/test_transport_conformance.py); callers depend on
this protocol only, never on an implementation's name.

A transfer's life:

    submit(plan, READ|WRITE, peer, notify) -> handle     (PENDING, or DONE at once)
    poll(handle) ... PENDING ... -> DONE | FAILED        (the caller owns the deadline)
    release(handle)                                      (always, also after FAILED)
    peer: notifications() -> [(initiator agent name, notify)]   after the bytes landed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import msgspec

from kv_transfer.errors import (
    IncompatiblePeerError,
    InvalidPlanError,
    TransferError,
    TransportUnavailableError,
    TransportVersionError,
    UnknownPeerError,
    UnsupportedConversionError,
)
from kv_transfer.layout import KVLayout, check_compatible

if TYPE_CHECKING:
    import torch

    from kv_transfer.plan import TransferPlan

__all__ = [
    "PROTOCOL_VERSION",
    "Handshake",
    "IncompatiblePeerError",
    "InvalidPlanError",
    "TransferError",
    "TransferHandle",
    "TransferOp",
    "TransferState",
    "Transport",
    "TransportUnavailableError",
    "TransportVersionError",
    "UnknownPeerError",
    "UnsupportedConversionError",
    "decode_handshake",
    "encode_handshake",
]

# Version of the handshake payload. Bump on any change to `Handshake` or to what a
# field means; peers of different versions refuse each other before any traffic.
# History:
#   1: first version (transport, agent_name, layout, base_addr, device_id, agent_metadata).
#   2: compat_hash no longer covers block_size and order (a layout conversion bridges them).
PROTOCOL_VERSION = 2


class TransferOp(enum.Enum):
    READ = "READ"  # remote (src) -> local (dst): the decode side pulls
    WRITE = "WRITE"  # local (src) -> remote (dst): the prefill side pushes


class TransferState(enum.Enum):
    PENDING = "PENDING"  # bytes may still be moving
    DONE = "DONE"  # every byte landed; the notification was sent
    FAILED = "FAILED"  # nothing can be assumed about the destination blocks' content


@dataclass(frozen=True)
class TransferHandle:
    """Opaque ticket of one submitted transfer; only its issuing transport can poll it."""

    transfer_id: int
    owner: str  # agent name of the transport that issued it
    peer: str
    op: TransferOp
    nbytes: int


@runtime_checkable
class Transport(Protocol):
    """Moves planned byte regions between this agent's registered KV tensor and a peer's.

    Safety rules (every implementation and every caller):
    - Registered memory must stay alive (and never be reallocated) until `close()`:
      peers address it by raw address. The transport keeps a reference to the tensor.
    - A handle must be released, also after FAILED; `release` is idempotent. Releasing
      a PENDING transfer asks the backend to cancel it.
    - Blocks being written (the destination of a READ or WRITE) must not be reused or
      freed until `poll` has left PENDING (a FAILED transfer's blocks hold garbage).
    - The source blocks must not be overwritten while the transfer is PENDING (the
      prefill side keeps them under a lease until the notification arrives).
    - Liveness: a backend without a progress thread (NIXL's default here) only makes
      progress inside calls into it, so BOTH agents must call in regularly. The target
      (`notifications()` or `progress()`): until it does, an initiator's transfer can
      stay PENDING (measured with NIXL: the first transfer of a connection, and every
      transfer that carries a notification). The initiator (`poll()` or `progress()`):
      a notification without bytes (empty plan) is queued at submit and leaves on a
      later call. Callers put a deadline on every wait.
    - One transport object is used by one thread at a time, or its calls are serialised
      by the implementation (NixlTransport holds a lock).

    Staging (layout conversion, kv_transfer/conversion_plan.py): `register` may take a second,
    local-only buffer on the cache's device. Only the LOCAL side of a READ may address
    it: a destination offset >= layout.region_bytes means staging at offset -
    region_bytes, and a region lies wholly in the cache or wholly in staging. Peers never
    see it (it is not in the handshake), and a WRITE never reads from it.

    Errors: `submit` raises UnknownPeerError for a peer never added (or removed),
    InvalidPlanError for regions outside either registered tensor, TransferError when
    closed or when the backend refuses the request. `add_peer` raises
    TransportVersionError or IncompatiblePeerError before touching the backend.
    """

    @property
    def name(self) -> str:
        """Implementation name ("inproc", "nixl"): travels in the handshake."""
        ...

    @property
    def agent_name(self) -> str:
        """Unique name of this endpoint."""
        ...

    def register(self, kv_cache: torch.Tensor, layout: KVLayout, staging: torch.Tensor | None = None) -> None: ...

    def handshake_payload(self) -> bytes: ...

    def add_peer(self, payload: bytes) -> str: ...

    def submit(self, plan: TransferPlan, op: TransferOp, peer: str, notify: bytes = b"") -> TransferHandle: ...

    def poll(self, handle: TransferHandle) -> TransferState: ...

    def release(self, handle: TransferHandle) -> None: ...

    def progress(self) -> None:
        """Drive the backend without consuming anything (notifications are kept)."""
        ...

    def notifications(self) -> list[tuple[str, bytes]]: ...

    def peer_layout(self, peer: str) -> KVLayout: ...  # from its handshake; UnknownPeerError if not added

    def remove_peer(self, peer: str) -> None: ...

    def close(self) -> None: ...


class Handshake(msgspec.Struct, frozen=True, tag="tandem.kv.handshake"):
    """What one endpoint tells a peer before any transfer (msgpack on the wire)."""

    version: int
    compat_hash: str
    transport: str
    agent_name: str
    layout: KVLayout
    base_addr: int  # address of the registered tensor in its owner's address space
    device_id: int  # CUDA device index, 0 for host memory
    agent_metadata: bytes = b""  # backend connection info (NIXL's get_agent_metadata())


class _VersionProbe(msgspec.Struct):
    """Reads only `version`, so a payload of another version is never decoded further."""

    version: int


_ENCODER = msgspec.msgpack.Encoder()
_PROBE = msgspec.msgpack.Decoder(_VersionProbe)
_DECODER = msgspec.msgpack.Decoder(Handshake)


def encode_handshake(hs: Handshake) -> bytes:
    return _ENCODER.encode(hs)


def decode_handshake(payload: bytes, local: KVLayout, transport: str) -> Handshake:
    """Decode a peer's handshake, refusing it unless it can ever work with `local`.

    Order: version first (a newer peer may have changed every other field), then the
    transport kind, then the compatibility hash; on a hash mismatch the layouts are
    compared field by field so the error names what differs.
    """
    try:
        version = _PROBE.decode(payload).version
    except msgspec.DecodeError as e:
        raise TransportVersionError(f"peer payload is not a Tandem KV handshake: {e}") from None
    if version != PROTOCOL_VERSION:
        raise TransportVersionError(
            f"peer speaks KV handshake version {version}, this build speaks {PROTOCOL_VERSION}; "
            "run the same Tandem version on both sides"
        )
    try:
        hs = _DECODER.decode(payload)
    except msgspec.DecodeError as e:  # includes InvalidLayoutError raised by KVLayout validation
        raise IncompatiblePeerError(f"malformed KV handshake from peer: {e}") from None
    if hs.transport != transport:
        raise IncompatiblePeerError(f"transport: local {transport!r} vs remote {hs.transport!r}")
    if hs.compat_hash != hs.layout.compat_hash():
        raise IncompatiblePeerError(
            f"peer {hs.agent_name!r} sent compat_hash {hs.compat_hash!r} that does not match its own layout"
        )
    if hs.compat_hash != local.compat_hash():
        check_compatible(local, hs.layout)  # raises, naming the fields
        raise IncompatiblePeerError(f"compat_hash: local {local.compat_hash()!r} vs remote {hs.compat_hash!r}")
    return hs
