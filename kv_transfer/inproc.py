"""`InProcessTransport`: the reference transport, for unit tests and single-process runs.

Peers live in the same process and find each other through an `InProcessRegistry`
that the caller creates and passes in (no module-level global: two tests never share
peers). A transfer is executed at submit time by copying through flat uint8 views of
the two registered tensors (and, for the local side of a READ, the staging buffer
registered after the cache), region by region, then the notification is queued on
the peer; so poll returns DONE at once. It still goes through the same handshake,
version and compatibility checks as any other transport.
"""

from __future__ import annotations

import itertools
from collections import deque

import torch

from kv_transfer.errors import TransferError, UnknownPeerError
from kv_transfer.layout import KVLayout, check_registrable, check_staging
from kv_transfer.plan import TransferPlan
from kv_transfer.transport import (
    PROTOCOL_VERSION,
    Handshake,
    TransferHandle,
    TransferOp,
    TransferState,
    decode_handshake,
    encode_handshake,
)


class InProcessRegistry:
    """Name -> transport map shared by the in-process peers of one test or process."""

    def __init__(self) -> None:
        self._agents: dict[str, InProcessTransport] = {}

    def add(self, transport: InProcessTransport) -> None:
        if transport.agent_name in self._agents:
            raise TransferError(f"an in-process agent named {transport.agent_name!r} already exists")
        self._agents[transport.agent_name] = transport

    def discard(self, name: str) -> None:
        self._agents.pop(name, None)

    def get(self, name: str) -> InProcessTransport | None:
        return self._agents.get(name)


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's storage (shares memory)."""
    return t.reshape(-1).view(torch.uint8)


class InProcessTransport:
    name = "inproc"

    def __init__(self, agent_name: str, registry: InProcessRegistry) -> None:
        self.agent_name = agent_name
        self._registry = registry
        self._bytes: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._layout: KVLayout | None = None
        self._peers: dict[str, Handshake] = {}
        self._transfers: dict[int, TransferState] = {}
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._ids = itertools.count(1)
        self._closed = False
        registry.add(self)

    # ---- memory and peers -------------------------------------------------------------
    def register(self, kv_cache: torch.Tensor, layout: KVLayout, staging: torch.Tensor | None = None) -> None:
        self._check_open()
        if self._bytes is not None:
            raise TransferError(f"{self.agent_name}: a KV cache is already registered")
        check_registrable(kv_cache, layout)
        if staging is not None:
            check_staging(staging, layout)
            self._staging = flat_bytes(staging)
        self._bytes = flat_bytes(kv_cache)  # keeps the tensor alive until close
        self._layout = layout

    def handshake_payload(self) -> bytes:
        layout, data = self._registered()
        dev = data.device.index if data.device.type == "cuda" and data.device.index is not None else 0
        return encode_handshake(
            Handshake(
                version=PROTOCOL_VERSION,
                compat_hash=layout.compat_hash(),
                transport=self.name,
                agent_name=self.agent_name,
                layout=layout,
                base_addr=data.data_ptr(),
                device_id=dev,
            )
        )

    def add_peer(self, payload: bytes) -> str:
        layout, _ = self._registered()
        hs = decode_handshake(payload, layout, self.name)
        if self._registry.get(hs.agent_name) is None:
            raise UnknownPeerError(f"in-process peer {hs.agent_name!r} is not in this registry (closed?)")
        self._peers[hs.agent_name] = hs
        return hs.agent_name

    def peer_layout(self, peer: str) -> KVLayout:
        hs = self._peers.get(peer)
        if hs is None:
            raise UnknownPeerError(f"no peer {peer!r}: add_peer its handshake first")
        return hs.layout

    def remove_peer(self, peer: str) -> None:
        self._peers.pop(peer, None)

    # ---- transfers ----------------------------------------------------------------------
    def submit(self, plan: TransferPlan, op: TransferOp, peer: str, notify: bytes = b"") -> TransferHandle:
        _, local = self._registered()
        remote_t = self._registry.get(peer) if peer in self._peers else None
        if remote_t is None or remote_t._bytes is None:
            raise UnknownPeerError(f"{self.agent_name}: unknown peer {peer!r}; add_peer() its handshake first")
        remote = remote_t._bytes
        read = op is TransferOp.READ
        src, dst = (remote, local) if read else (local, remote)
        staging = self._staging if read else None  # only the local side of a READ may land in staging
        cache_n = dst.numel()
        plan.check_bounds(src.numel(), cache_n, staging.numel() if staging is not None else 0)
        for s, d, n in plan.as_array().tolist():
            if d >= cache_n and staging is not None:  # check_bounds admits offsets past the cache only with staging
                staging[d - cache_n : d - cache_n + n].copy_(src[s : s + n])
            else:
                dst[d : d + n].copy_(src[s : s + n])
        if len(plan) and (src.is_cuda or dst.is_cuda or (staging is not None and staging.is_cuda)):
            torch.cuda.synchronize()  # DONE means the bytes are there for every stream
        if notify:
            remote_t._inbox.append((self.agent_name, bytes(notify)))
        handle = TransferHandle(next(self._ids), self.agent_name, peer, op, plan.total_bytes)
        self._transfers[handle.transfer_id] = TransferState.DONE
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        state = self._transfers.get(handle.transfer_id) if handle.owner == self.agent_name else None
        if state is None:
            raise TransferError(f"{self.agent_name}: unknown or released transfer handle {handle.transfer_id}")
        return state

    def release(self, handle: TransferHandle) -> None:
        if handle.owner == self.agent_name:
            self._transfers.pop(handle.transfer_id, None)

    def progress(self) -> None:
        """Nothing to drive: copies complete inside submit."""

    def notifications(self) -> list[tuple[str, bytes]]:
        out = list(self._inbox)
        self._inbox.clear()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transfers.clear()
        self._peers.clear()
        self._registry.discard(self.agent_name)
        self._bytes = None
        self._staging = None

    # ---- helpers --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"{self.agent_name}: transport is closed")

    def _registered(self) -> tuple[KVLayout, torch.Tensor]:
        self._check_open()
        if self._bytes is None or self._layout is None:
            raise TransferError(f"{self.agent_name}: register() a KV cache first")
        return self._layout, self._bytes
