"""`NixlTransport`: KV transfer over NVIDIA NIXL (UCX backend), host or GPU memory.

How a READ flows (decode agent D pulls blocks from prefill agent P):

    P: register(kv)           nixl register_memory(one region: the whole tensor)
    P: handshake_payload()    Handshake{version, compat hash, layout, base address,
                                        get_agent_metadata()}      -> sent to D (Ray call)
    D: add_peer(payload)      version + compatibility checked, then add_remote_agent
    D: submit(plan, READ, "P", notify=request id)
         local descs  = D.base + region.dst_offset   (D's registered memory)
         remote descs = P.base + region.src_offset   (from P's handshake)
         initialize_xfer("READ", local, remote, "P", notify) + transfer()
         (a local offset >= region_bytes addresses D's staging buffer instead, a second
          registration made by register(kv, layout, staging): layout conversion, conversion_plan.py)
    D: poll() -> check_xfer_state: PROC -> PENDING, DONE -> DONE, ERR -> FAILED
    D: release()              release_xfer_handle
    P: notifications()        get_new_notifs() -> [("D", request id)] -> P drops its lease

Decisions (measured on a 2-core host; ../shared/PLATFORM.md has the platform facts):
- The UCX progress thread is off by default: with it on, NIXL reached ~1.6 GB/s, with
  it off 4.5-5.4 GB/s (../shared/PLATFORM.md, "NIXL on CPU"). The price: an agent makes
  progress only inside its own calls, so the TARGET side must call `notifications()`/`progress()` regularly. Until a
  connection is warm, and whenever a notification is attached, the initiator's
  transfer stays "PROC" for as long as the target never calls into NIXL.
- UCX environment defaults and their reasons: nixl_settings.py.
- One lock serialises every agent call: NIXL agents without a listener thread are
  created thread-unsafe (NIXL_THREAD_SYNC_NONE), and workers call from two threads.
- An empty plan with a notification sends the notification alone (send_notif), and
  the handle is DONE at once: NIXL cannot build an empty descriptor list, and does not
  report when a lone notification has left (it leaves on a later call, liveness rule).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.errors import TransferError, TransportUnavailableError, UnknownPeerError
from kv_transfer.layout import KVLayout, check_registrable, check_staging
from kv_transfer.nixl_settings import NixlSettings, load_nixl
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

log = logging.getLogger(__name__)

_STATES = {"DONE": TransferState.DONE, "PROC": TransferState.PENDING, "ERR": TransferState.FAILED}


def _mem_type(device: str) -> str:
    return "DRAM" if device == "cpu" else "VRAM"


@dataclass(frozen=True)
class _Peer:
    layout: KVLayout
    base_addr: int
    device_id: int


@dataclass
class _Xfer:
    nixl: object | None  # nixl_xfer_handle; None when nothing was posted (empty plan)
    state: TransferState


class NixlTransport:
    name = "nixl"

    def __init__(self, agent_name: str, settings: NixlSettings | None = None) -> None:
        self.agent_name = agent_name
        self.settings = settings or NixlSettings()
        nixl_agent, nixl_agent_config = load_nixl()
        self.settings.apply_env(cuda=torch.cuda.is_available())
        config = nixl_agent_config(
            enable_prog_thread=self.settings.enable_prog_thread,
            backends=[self.settings.backend],
            num_threads=self.settings.num_threads,
        )
        try:
            self._agent = nixl_agent(agent_name, config)
        except Exception as e:  # RuntimeError (no plugins), nixlBackendError (UCX could not start)
            raise TransportUnavailableError(
                f"NIXL agent {agent_name!r} could not start backend {self.settings.backend}: {type(e).__name__}: {e} "
                f"(UCX_TLS={os.environ.get('UCX_TLS')!r}, UCX_NET_DEVICES={os.environ.get('UCX_NET_DEVICES')!r})"
            ) from e
        if self.settings.backend not in self._agent.backends:
            raise TransportUnavailableError(
                f"NIXL backend {self.settings.backend!r} is not available; plugins: {self._agent.get_plugin_list()}"
            )
        self._lock = threading.Lock()
        self._tensor: torch.Tensor | None = None
        self._layout: KVLayout | None = None
        self._reg = None
        self._base = 0
        self._staging: torch.Tensor | None = None
        self._staging_reg = None
        self._staging_base = 0
        self._staging_bytes = 0
        self._device_id = 0
        self._peers: dict[str, _Peer] = {}
        self._xfers: dict[int, _Xfer] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self._ids = itertools.count(1)
        self._closed = False

    # ---- memory and peers -------------------------------------------------------------
    def register(self, kv_cache: torch.Tensor, layout: KVLayout, staging: torch.Tensor | None = None) -> None:
        check_registrable(kv_cache, layout)
        staging_bytes = check_staging(staging, layout) if staging is not None else 0
        with self._lock:
            self._check_open()
            if self._tensor is not None:
                raise TransferError(f"{self.agent_name}: a KV cache is already registered")
            dev = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
            addr, nbytes = kv_cache.data_ptr(), layout.region_bytes
            mem = _mem_type(layout.device)
            try:
                self._reg = self._agent.register_memory([(addr, nbytes, dev, "")], mem)
            except Exception as e:
                raise TransferError(f"NIXL could not register {nbytes} bytes of {layout.device} memory: {e}") from e
            if staging is not None:
                try:
                    self._staging_reg = self._agent.register_memory([(staging.data_ptr(), staging_bytes, dev, "")], mem)
                except Exception as e:
                    self._agent.deregister_memory(self._reg)
                    self._reg = None
                    raise TransferError(
                        f"NIXL could not register the {staging_bytes}-byte staging buffer on {layout.device}: {e}"
                    ) from e
                self._staging, self._staging_base, self._staging_bytes = staging, staging.data_ptr(), staging_bytes
            self._tensor, self._layout, self._base, self._device_id = kv_cache, layout, addr, dev

    def handshake_payload(self) -> bytes:
        with self._lock:
            layout = self._registered()
            return encode_handshake(
                Handshake(
                    version=PROTOCOL_VERSION,
                    compat_hash=layout.compat_hash(),
                    transport=self.name,
                    agent_name=self.agent_name,
                    layout=layout,
                    base_addr=self._base,
                    device_id=self._device_id,
                    agent_metadata=self._agent.get_agent_metadata(),
                )
            )

    def add_peer(self, payload: bytes) -> str:
        with self._lock:
            hs = decode_handshake(payload, self._registered(), self.name)  # before touching NIXL
            if hs.agent_name == self.agent_name:
                raise TransferError(f"peer handshake carries this agent's own name {self.agent_name!r}")
            try:
                loaded = self._agent.add_remote_agent(hs.agent_metadata)
            except Exception as e:
                raise TransferError(f"NIXL could not load peer {hs.agent_name!r}'s metadata: {e}") from e
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != hs.agent_name:
                raise TransferError(f"peer metadata names agent {loaded!r}, its handshake {hs.agent_name!r}")
            self._peers[hs.agent_name] = _Peer(hs.layout, hs.base_addr, hs.device_id)
            return hs.agent_name

    def peer_layout(self, peer: str) -> KVLayout:
        with self._lock:
            p = self._peers.get(peer)
        if p is None:
            raise UnknownPeerError(f"no peer {peer!r}: add_peer its handshake first")
        return p.layout

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            if self._peers.pop(peer, None) is not None and not self._closed:
                self._forget(peer)

    def _forget(self, peer: str) -> None:
        # Progress on both sides of the removal: after a transfer to a dead peer failed,
        # removing it and then destroying the agent without one progress call in between
        # aborts the process inside UCX ("arbiter.c:36 Assertion
        # `ucs_arbiter_group_is_empty(group)' failed"); one get_new_notifs() avoids it.
        self._pump()
        try:
            self._agent.remove_remote_agent(peer)
        except Exception as e:  # already gone on NIXL's side: nothing left to undo
            log.warning("NIXL remove_remote_agent(%r) failed: %s", peer, e)
        self._pump()

    # ---- transfers ----------------------------------------------------------------------
    def submit(self, plan: TransferPlan, op: TransferOp, peer: str, notify: bytes = b"") -> TransferHandle:
        with self._lock:
            layout = self._registered()
            p = self._peers.get(peer)
            if p is None:
                raise UnknownPeerError(f"{self.agent_name}: unknown peer {peer!r}; add_peer() its handshake first")
            read = op is TransferOp.READ
            local_size, remote_size = layout.region_bytes, p.layout.region_bytes
            if read:  # only the local side of a READ may land in staging
                plan.check_bounds(remote_size, local_size, self._staging_bytes)
            else:
                plan.check_bounds(local_size, remote_size)
            if len(plan):
                xfer = self._post(plan, read, p, peer, bytes(notify))
            else:
                xfer = _Xfer(None, TransferState.DONE)
                try:
                    if notify:
                        self._agent.send_notif(peer, bytes(notify))
                except Exception as e:  # e.g. the peer disconnected
                    log.warning("NIXL send_notif to %r failed: %s", peer, e)
                    xfer.state = TransferState.FAILED
            handle = TransferHandle(next(self._ids), self.agent_name, peer, op, plan.total_bytes)
            self._xfers[handle.transfer_id] = xfer
            return handle

    def _post(self, plan: TransferPlan, read: bool, p: _Peer, peer: str, notify: bytes) -> _Xfer:
        layout = self._layout
        if layout is None:
            raise TransferError("submit before register(): this agent has no KV cache registered")
        arr = plan.as_array()  # int64 offsets; addresses fit in int64 on every supported host
        local_off, remote_off = (arr[:, 1], arr[:, 0]) if read else (arr[:, 0], arr[:, 1])
        n = len(arr)
        local_addr = local_off + self._base
        if read and self._staging_bytes:  # check_bounds kept these regions wholly inside staging
            cache = layout.region_bytes
            local_addr = np.where(local_off >= cache, local_off - cache + self._staging_base, local_addr)
        nbytes = arr[:, 2].astype(np.uint64)
        local = np.stack([local_addr.astype(np.uint64), nbytes, np.full(n, self._device_id, np.uint64)], 1)
        remote = np.stack([(remote_off + p.base_addr).astype(np.uint64), nbytes, np.full(n, p.device_id, np.uint64)], 1)
        try:
            ldescs = self._agent.get_xfer_descs(local, _mem_type(layout.device))
            rdescs = self._agent.get_xfer_descs(remote, _mem_type(p.layout.device))
            handle = self._agent.initialize_xfer("READ" if read else "WRITE", ldescs, rdescs, peer, notify)
        except Exception as e:  # nixlNotFoundError, nixlBackendError, ...
            raise TransferError(f"NIXL refused the transfer with {peer!r}: {type(e).__name__}: {e}") from e
        try:
            status = self._agent.transfer(handle)
        except Exception as e:
            log.warning("NIXL transfer post to %r failed: %s", peer, e)
            status = "ERR"
        return _Xfer(handle, _STATES.get(status, TransferState.FAILED))

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            x = self._xfers.get(handle.transfer_id) if handle.owner == self.agent_name else None
            if x is None:
                raise TransferError(f"{self.agent_name}: unknown or released transfer handle {handle.transfer_id}")
            if x.state is TransferState.PENDING:
                try:
                    x.state = _STATES.get(self._agent.check_xfer_state(x.nixl), TransferState.FAILED)
                except Exception as e:
                    log.warning("NIXL check_xfer_state failed: %s", e)
                    x.state = TransferState.FAILED
            return x.state

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            if handle.owner == self.agent_name:
                x = self._xfers.pop(handle.transfer_id, None)
                if x is not None:
                    self._release_nixl(x)

    def _release_nixl(self, x: _Xfer) -> None:
        if x.nixl is None:
            return
        try:
            self._agent.release_xfer_handle(x.nixl)
        except Exception as e:  # NIXL could not cancel an active transfer; it keeps it in its leak list
            log.warning("NIXL release_xfer_handle failed (%s); the handle is left to the agent's cleanup", e)
        x.nixl = None

    def progress(self) -> None:
        with self._lock:
            self._pump()

    def notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            self._pump()
            out, self._inbox = self._inbox, []
            return out

    def _pump(self) -> None:
        if self._agent is None:
            return
        for agent, msgs in self._agent.get_new_notifs().items():
            name = agent.decode() if isinstance(agent, bytes) else str(agent)
            self._inbox.extend((name, bytes(m)) for m in msgs)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for x in self._xfers.values():
                self._release_nixl(x)
            self._xfers.clear()
            for peer in list(self._peers):
                self._forget(peer)
            self._peers.clear()
            self._pump()
            for reg in (self._reg, self._staging_reg):
                if reg is not None:
                    try:
                        self._agent.deregister_memory(reg)
                    except Exception as e:
                        log.warning("NIXL deregister_memory at close failed: %s", e)
            self._reg = self._staging_reg = None
            self._tensor = self._staging = None
            self._agent = None  # the agent (and its UCX worker) goes with its last reference

    # ---- helpers --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"{self.agent_name}: transport is closed")

    def _registered(self) -> KVLayout:
        self._check_open()
        if self._layout is None:
            raise TransferError(f"{self.agent_name}: register() a KV cache first")
        return self._layout
