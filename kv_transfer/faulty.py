"""`FaultyTransport(inner, plan)`: a transport that fails or stalls on purpose, for tests.

It wraps any Transport and follows a typed `FaultPlan`:

    fail_submits = {2}     the 2nd submit raises TransferError (nothing is sent)
    fail_polls   = {1, 3}  the 1st and 3rd submitted transfers end FAILED
    stall_polls  = {2}     the 2nd submitted transfer stays PENDING until released (the caller's timeout)
    delay_polls  = 4       every transfer reports PENDING for its first 4 polls (late delivery)
    delay_only   = {3}     ... only the 3rd one (empty: every transfer)

Counting is 1-based over this wrapper's submits. A transfer planned to fail is still
executed by the inner transport and only reported FAILED once the inner transfer has
left PENDING: like a real transport that detects an error at completion, it never
says FAILED while bytes may still be moving into the destination blocks (the safety
rule callers rely on before reusing them). With an empty plan the wrapper is
transparent, which the conformance suite checks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from kv_transfer.errors import TransferError
from kv_transfer.layout import KVLayout
from kv_transfer.plan import TransferPlan
from kv_transfer.transport import TransferHandle, TransferOp, TransferState, Transport


@dataclass(frozen=True)
class FaultPlan:
    fail_submits: frozenset[int] = field(default_factory=frozenset)
    fail_polls: frozenset[int] = field(default_factory=frozenset)
    stall_polls: frozenset[int] = field(default_factory=frozenset)
    delay_polls: int = 0
    delay_only: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in ("fail_submits", "fail_polls", "stall_polls", "delay_only"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        bad = [
            n
            for n in (*self.fail_submits, *self.fail_polls, *self.stall_polls, *self.delay_only)
            if not isinstance(n, int) or n < 1
        ]
        if bad:
            raise ValueError(f"fault plan submit numbers are 1-based positive ints, got {bad}")
        if self.delay_polls < 0:
            raise ValueError(f"delay_polls must be >= 0, got {self.delay_polls}")


@dataclass
class _Tracked:
    inner: TransferHandle
    fail: bool
    stall: bool
    delay_left: int


class FaultyTransport:
    def __init__(self, inner: Transport, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan
        self._submits = 0
        self._ids = itertools.count(1)
        self._tracked: dict[int, _Tracked] = {}

    @property
    def name(self) -> str:  # the wrapper speaks its inner transport's handshake
        return self._inner.name

    @property
    def agent_name(self) -> str:
        return self._inner.agent_name

    def register(self, kv_cache, layout: KVLayout, staging=None) -> None:
        self._inner.register(kv_cache, layout, staging)

    def handshake_payload(self) -> bytes:
        return self._inner.handshake_payload()

    def add_peer(self, payload: bytes) -> str:
        return self._inner.add_peer(payload)

    def peer_layout(self, peer: str) -> KVLayout:
        return self._inner.peer_layout(peer)

    def remove_peer(self, peer: str) -> None:
        self._inner.remove_peer(peer)

    def submit(self, plan: TransferPlan, op: TransferOp, peer: str, notify: bytes = b"") -> TransferHandle:
        self._submits += 1
        n = self._submits
        if n in self._plan.fail_submits:
            raise TransferError(f"injected fault: submit #{n} to {peer!r} refused")
        inner = self._inner.submit(plan, op, peer, notify)
        handle = TransferHandle(next(self._ids), self.agent_name, peer, op, inner.nbytes)
        faults = self._plan
        delay = faults.delay_polls if not faults.delay_only or n in faults.delay_only else 0
        self._tracked[handle.transfer_id] = _Tracked(inner, n in faults.fail_polls, n in faults.stall_polls, delay)
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        t = self._tracked.get(handle.transfer_id)
        if t is None or handle.owner != self.agent_name:
            raise TransferError(f"{self.agent_name}: unknown or released transfer handle {handle.transfer_id}")
        state = self._inner.poll(t.inner)  # always drive the inner transfer
        if t.stall:
            return TransferState.PENDING
        if t.delay_left > 0:
            t.delay_left -= 1
            return TransferState.PENDING
        if state is TransferState.PENDING:
            return state
        return TransferState.FAILED if t.fail else state

    def release(self, handle: TransferHandle) -> None:
        t = self._tracked.pop(handle.transfer_id, None)
        if t is not None:
            self._inner.release(t.inner)

    def progress(self) -> None:
        self._inner.progress()

    def notifications(self) -> list[tuple[str, bytes]]:
        return self._inner.notifications()

    def close(self) -> None:
        for t in self._tracked.values():
            self._inner.release(t.inner)
        self._tracked.clear()
        self._inner.close()
