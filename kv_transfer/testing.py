"""Helpers for tests and benchmarks of transports: waiting with a deadline, a peer that
lives in another process, and the rank layouts of a TP x PP worker (`worker_layouts`).

`RemotePeer` spawns a process that owns a NixlTransport and its own KV tensor, and
answers commands over a pipe; between commands it keeps calling `progress()`, which a
NIXL target without a progress thread needs (see transport.py's liveness rule):

    with RemotePeer(PeerSpec("P", layout, seed=1)) as p:
        local.add_peer(p.call("handshake"))
        p.call("add_peer", local.handshake_payload())
        h = local.submit(plan, TransferOp.READ, "P", b"req-1")
        wait_done(local, h, 5.0)
        p.call("notifications")      -> [(local.agent_name, b"req-1")]
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.layout import KVLayout
from kv_transfer.nixl_settings import NixlSettings
from kv_transfer.nixl_transport import NixlTransport
from kv_transfer.transport import TransferHandle, TransferState, Transport


def wait_done(
    transport: Transport,
    handle: TransferHandle,
    timeout_s: float,
    pump: Iterable[Transport] = (),
    clock: Callable[[], float] = time.monotonic,
) -> TransferState:
    """Poll until the transfer leaves PENDING; `pump` peers (same process) get progress().

    Raises TimeoutError at the deadline (the handle stays owned by the caller).
    """
    pump = tuple(pump)
    deadline = clock() + timeout_s
    while True:
        state = transport.poll(handle)
        if state is not TransferState.PENDING:
            return state
        for p in pump:
            p.progress()
        if clock() > deadline:
            raise TimeoutError(f"transfer {handle.transfer_id} to {handle.peer!r} still PENDING after {timeout_s} s")


def torch_dtype(layout: KVLayout) -> torch.dtype:
    return getattr(torch, layout.dtype)


def make_cache(layout: KVLayout, seed: int | None = None) -> torch.Tensor:
    """A cache tensor for `layout`: zeros, or seeded random bytes when `seed` is given."""
    t = torch.zeros(layout.shape, dtype=torch_dtype(layout), device=layout.device)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 256, (layout.region_bytes,), dtype=torch.uint8, generator=g)
        t.reshape(-1).view(torch.uint8).copy_(noise)
    return t


def worker_layouts(
    model_fingerprint: str,
    total_layers: int,
    total_kv_heads: int,
    head_dim: int,
    *,
    tp: int,
    pp: int,
    block_size: int,
    num_blocks: int,
    dtype: str = "bfloat16",
    order: str = "NHD",
    device: str = "cpu",
) -> list[KVLayout]:
    """The layouts of a TP x PP worker's ranks, rank = stage * tp + tp_rank.

    Layers split evenly over the pp stages, the remainder going to the first stages.
    KV heads split evenly over the tp ranks (tp divides total_kv_heads), or are
    replicated when tp > total_kv_heads with tp % total_kv_heads == 0: rank r holds the
    single head r * total_kv_heads // tp. All ranks share one block pool.
    """
    if not 1 <= pp <= total_layers:
        raise ValueError(f"pp must be in [1, {total_layers}], got {pp}")
    if tp < 1 or (total_kv_heads % tp and tp % total_kv_heads):
        raise ValueError(f"tp {tp} neither divides nor is a multiple of {total_kv_heads} KV heads")
    base, extra = divmod(total_layers, pp)
    stages, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        stages.append((start, n))
        start += n
    if tp <= total_kv_heads:
        heads = [(r * (total_kv_heads // tp), total_kv_heads // tp) for r in range(tp)]
    else:
        heads = [(r * total_kv_heads // tp, 1) for r in range(tp)]
    return [
        KVLayout(model_fingerprint=model_fingerprint, total_layers=total_layers, layer_start=l0, num_layers=nl,
                 total_kv_heads=total_kv_heads, head_start=h0, num_kv_heads=nh, head_dim=head_dim,
                 block_size=block_size, num_blocks=num_blocks, dtype=dtype, order=order, device=device)
        for l0, nl in stages
        for h0, nh in heads
    ]  # fmt: skip


@dataclass(frozen=True)
class PeerSpec:
    agent_name: str
    layout: KVLayout
    seed: int | None = None  # None: a cheap constant fill (benchmarks of big caches)
    settings: NixlSettings = field(default_factory=NixlSettings)


def _serve(conn, spec: PeerSpec) -> None:
    torch.set_num_threads(1)
    kv = make_cache(spec.layout, spec.seed)
    if spec.seed is None:
        kv.reshape(-1).view(torch.uint8).fill_(0x5A)
    transport = NixlTransport(spec.agent_name, spec.settings)
    transport.register(kv, spec.layout)
    flat = kv.reshape(-1).view(torch.uint8)
    commands: dict[str, Callable[..., Any]] = {
        "handshake": transport.handshake_payload,
        "add_peer": transport.add_peer,
        "remove_peer": transport.remove_peer,
        "notifications": transport.notifications,
        "bytes": lambda off, n: flat[off : off + n].cpu().numpy().tobytes(),
    }
    try:
        while True:
            if not conn.poll(0.0005):  # a bounded wait for the next command
                transport.progress()
                continue
            cmd, *args = conn.recv()
            if cmd == "stop":
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", commands[cmd](*args)))
            except Exception as e:  # the parent re-raises it with the child's text
                conn.send(("err", f"{type(e).__name__}: {e}"))
    finally:
        transport.close()


class RemotePeer:
    """A NixlTransport peer in a spawned process (its own address space)."""

    def __init__(self, spec: PeerSpec, start_timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, spec), daemon=True, name=f"kv-peer-{spec.agent_name}")
        self._proc.start()
        child.close()
        self._start_timeout_s = start_timeout_s
        self.agent_name = spec.agent_name

    def call(self, cmd: str, *args, timeout_s: float | None = None):
        self._conn.send((cmd, *args))
        if not self._conn.poll(self._start_timeout_s if timeout_s is None else timeout_s):
            raise TimeoutError(f"peer process {self.agent_name!r} did not answer {cmd!r}")
        status, value = self._conn.recv()
        if status == "err":
            raise RuntimeError(f"peer {self.agent_name!r}: {value}")
        return value

    def kill(self, timeout_s: float = 10.0) -> None:
        """End the process abruptly (a crashed worker), without closing its transport."""
        self._proc.kill()
        self._proc.join(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._proc.is_alive():
            try:
                self.call("stop", timeout_s=timeout_s)
            except (OSError, EOFError, TimeoutError):
                pass
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout_s)
        self._conn.close()

    def __enter__(self) -> RemotePeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
