"""Worker pools: the workers of one role, their health, drain state and load.

A `WorkerPool` holds one `WorkerSlot` per worker: the client, whether it is healthy,
whether it is draining (removed from service: no new requests, running ones finish),
the last status it reported (its KV and queue figures) and what this router has
sent it and not yet seen finish:

    in_flight        requests of this router on the worker (calls open)
    prefill_tokens   prompt tokens routed to it that it has not finished prefilling
    kv_blocks_in     KV blocks routed to it (decode) that it has not finished pulling

Those router-side figures move the moment a request is routed, so a burst does not
wait for the workers' reports to spread out.

Choosing: the KV-aware policy lives in router/routing.py and only asks the pool for
its `eligible()` slots. The pool itself implements the two load-blind policies:

- `round_robin`: a cursor walks the worker list; ineligible workers are skipped.
- `least_loaded`: the fewest requests in flight through this router; ties go to the
  lowest index, so a choice is a pure function of the loads.

Both return a `Decision` that explains itself, logged at DEBUG on `router.decisions`:

    decode least_loaded: d0=3 d1=1 d2=1 (d3 down) -> d1

Workers join (`add`) and leave (`drain`, then `remove` once idle) while serving.
Everything runs on the event loop thread; nothing awaits inside a choice, so no lock
is needed. A pool starts with at least one worker (the admin refuses to remove the
last); choosing from a pool with no eligible worker raises `NoHealthyWorkerError`
(UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.contract import WorkerStatus
from router.errors import NoHealthyWorkerError
from router.workers import WorkerClient

decision_log = logging.getLogger("router.decisions")
log = logging.getLogger(__name__)


class Policy(enum.Enum):
    KV = "kv"
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"

    @classmethod
    def parse(cls, value: Policy | str) -> Policy:
        """A policy from its name; `round-robin` and `round_robin` are the same policy."""
        if isinstance(value, Policy):
            return value
        try:
            return cls(str(value).strip().lower().replace("-", "_"))
        except ValueError:
            allowed = ", ".join(p.value.replace("_", "-") for p in cls)
            raise ValueError(f"unknown router policy {value!r} (allowed: {allowed})") from None


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    in_flight: int
    healthy: bool


@dataclass(frozen=True)
class Decision:
    role: str
    policy: Policy
    candidates: tuple[Candidate, ...]
    chosen: str

    def describe(self) -> str:
        up = " ".join(f"{c.worker_id}={c.in_flight}" for c in self.candidates if c.healthy)
        down = " ".join(c.worker_id for c in self.candidates if not c.healthy)
        return f"{self.role} {self.policy.value}: {up}{f' ({down} down)' if down else ''} -> {self.chosen}"


@dataclass
class WorkerSlot:
    """One worker as its pool tracks it."""

    client: WorkerClient
    healthy: bool = True
    draining: bool = False
    status: WorkerStatus | None = None  # last report (status poll or KV event reply)
    in_flight: int = 0
    prefill_tokens: int = 0
    kv_blocks_in: int = 0
    incarnation: str = ""  # the worker process last taken into service (WorkerStatus.incarnation; "" unknown)
    idle: asyncio.Event | None = field(default=None, repr=False)  # set when in_flight drops to 0 while draining

    @property
    def worker_id(self) -> str:
        return self.client.worker_id

    @property
    def eligible(self) -> bool:
        return self.healthy and not self.draining


class WorkerPool:
    """The workers of one role and how to choose among them (load-blind policies)."""

    def __init__(
        self,
        role: str,
        clients: Sequence[WorkerClient],
        policy: Policy | str = Policy.LEAST_LOADED,
        block_size: int = 16,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.policy = Policy.parse(policy)
        self.role = role
        self.block_size = block_size
        if not clients:
            raise ValueError(f"a {role} pool needs at least one worker")
        self._slots: dict[str, WorkerSlot] = {}
        self._cursor = 0
        for c in clients:
            self.add(c)

    # -- membership ---------------------------------------------------------------------------

    def add(self, client: WorkerClient) -> WorkerSlot:
        if client.worker_id in self._slots:
            raise ValueError(f"worker ids in the {self.role} pool must be distinct: {client.worker_id!r} is there")
        slot = WorkerSlot(client)
        self._slots[client.worker_id] = slot
        return slot

    def drain(self, worker_id: str) -> WorkerSlot:
        """Stop choosing `worker_id`; requests already on it carry on."""
        slot = self.slot(worker_id)
        slot.draining = True
        log.info("%s worker %s is draining (%d request(s) in flight)", self.role, worker_id, slot.in_flight)
        return slot

    async def wait_drained(self, worker_id: str, timeout_s: float) -> bool:
        """True once no request of this router is in flight on the (draining) worker; False on timeout."""
        slot = self.slot(worker_id)
        if slot.in_flight == 0:
            return True
        slot.idle = slot.idle or asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await slot.idle.wait()
            return True
        except TimeoutError:
            return False

    def remove(self, worker_id: str) -> WorkerSlot:
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            raise KeyError(f"no worker {worker_id!r} in the {self.role} pool")
        return slot

    # -- state ---------------------------------------------------------------------------------

    @property
    def clients(self) -> tuple[WorkerClient, ...]:
        return tuple(s.client for s in self._slots.values())

    @property
    def slots(self) -> tuple[WorkerSlot, ...]:
        return tuple(self._slots.values())

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._slots

    def slot(self, worker_id: str) -> WorkerSlot:
        try:
            return self._slots[worker_id]
        except KeyError:
            raise KeyError(f"no worker {worker_id!r} in the {self.role} pool") from None

    def client(self, worker_id: str) -> WorkerClient:
        return self.slot(worker_id).client

    def in_flight(self, worker_id: str) -> int:
        return self.slot(worker_id).in_flight

    def healthy(self, worker_id: str) -> bool:
        return self.slot(worker_id).healthy

    def set_health(self, worker_id: str, healthy: bool, reason: str = "") -> bool:
        """Mark a worker up or down; returns True if that changed its state."""
        slot = self._slots.get(worker_id)
        if slot is None or slot.healthy == healthy:
            return False
        log.warning(
            "%s worker %s is now %s%s",
            self.role,
            worker_id,
            "healthy" if healthy else "down",
            f": {reason}" if reason else "",
        )
        slot.healthy = healthy
        return True

    def set_status(self, worker_id: str, status: WorkerStatus) -> None:
        slot = self._slots.get(worker_id)
        if slot is not None:
            slot.status = status

    def eligible(self, exclude: Collection[str] = ()) -> list[WorkerSlot]:
        """Workers a new request may go to: healthy, not draining and not in `exclude` (workers that
        already failed this request), in pool order."""
        return [s for s in self._slots.values() if s.eligible and s.worker_id not in exclude]

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(Candidate(s.worker_id, s.in_flight, s.eligible) for s in self._slots.values())

    def no_worker_error(self, exclude: Collection[str] = ()) -> NoHealthyWorkerError:
        slots = self._slots.values()
        down = sum(not s.healthy for s in slots)
        draining = sum(s.draining and s.healthy for s in slots)
        failed = sum(s.eligible and s.worker_id in exclude for s in slots)
        also = f", {failed} already failed this request" if failed else ""
        return NoHealthyWorkerError(
            f"no healthy {self.role} worker ({down} of {len(slots)} down, {draining} draining{also}); retry later"
        )

    # -- choosing (load-blind policies) -----------------------------------------------------------

    def choose(self, policy: Policy | None = None, exclude: Collection[str] = ()) -> tuple[WorkerClient, Decision]:
        """An eligible worker (not in `exclude`) by round_robin or least_loaded: `policy`, else the pool's
        own (the KV policy, which router/routing.py implements, counts as least_loaded here)."""
        policy = self.policy if policy is None else policy
        slots = list(self._slots.values())
        ok = [s.eligible and s.worker_id not in exclude for s in slots]
        eligible = [i for i, good in enumerate(ok) if good]
        if not eligible:
            raise self.no_worker_error(exclude)
        if policy is Policy.ROUND_ROBIN:
            n = len(slots)
            start = self._cursor % n
            pick = next(i for i in ((start + k) % n for k in range(n)) if ok[i])
            self._cursor = (pick + 1) % n
        else:
            pick = min(eligible, key=lambda i: (slots[i].in_flight, i))
        policy = Policy.LEAST_LOADED if policy is Policy.KV else policy
        decision = Decision(self.role, policy, self.candidates(), slots[pick].worker_id)
        if decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug(decision.describe())
        return slots[pick].client, decision

    @contextmanager
    def track(self, worker_id: str) -> Iterator[None]:
        """Counts one request in flight on `worker_id` for the duration of the block."""
        slot = self.slot(worker_id)
        slot.in_flight += 1
        try:
            yield
        finally:
            slot.in_flight -= 1
            if slot.in_flight == 0 and slot.idle is not None:
                slot.idle.set()


@dataclass(frozen=True)
class WorkerReport:
    """One worker's `status()`, or None when it did not answer in time (GetServerInfo shows UNKNOWN)."""

    role: str
    worker_id: str
    status: WorkerStatus | None


async def worker_reports(pools: Sequence[WorkerPool], timeout_s: float) -> list[WorkerReport]:
    """Every worker's status, asked concurrently; failures are logged and reported as None."""

    async def one(role: str, client: WorkerClient) -> WorkerReport:
        try:
            async with asyncio.timeout(timeout_s):
                return WorkerReport(role, client.worker_id, await client.status())
        except Exception as exc:  # noqa: BLE001 - a worker that cannot answer is reported, not raised
            log.warning("status of %s worker %s failed: %s: %s", role, client.worker_id, type(exc).__name__, exc)
            return WorkerReport(role, client.worker_id, None)

    return list(await asyncio.gather(*(one(p.role, c) for p in pools for c in p.clients)))
