"""Worker pools: which prefill / decode / aggregated worker gets the next request.

A `WorkerPool` holds the clients of one role, an in-flight counter and a health
flag per worker. `choose()` picks among the healthy workers with one policy and
returns a `Decision` that explains itself (policy, every candidate with its load,
the pick), logged at DEBUG on the `router.decisions` logger:

    decode least_loaded: d0=3 d1=1 d2=1 (d3 down) -> d1

Policies (`Policy`):
- `round_robin`: a cursor walks the worker list; unhealthy workers are skipped.
- `least_loaded`: the fewest requests in flight through this router; ties go to
  the lowest index, so a choice is a pure function of the loads (no randomness,
  hence no RNG to inject).

In-flight counting is the caller's: wrap the worker's part of a request in
`with pool.track(worker_id):`. Counting is separate from choosing so that a
decision has no side effect and a test can ask for one without "using" a worker.
Both run on the event loop thread; nothing awaits between `choose` and `track`,
so no lock is needed.

Health: `set_health(worker_id, healthy)` is called by the server when a call
fails with `WorkerUnavailableError` (down) and by whoever watches workers
(deploy) to bring one back. A pool whose workers are all down raises
`NoHealthyWorkerError` (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from common.wire import WorkerStatus
from router.errors import NoHealthyWorkerError
from router.workers import WorkerClient

decision_log = logging.getLogger("router.decisions")
log = logging.getLogger(__name__)


class Policy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"


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


class WorkerPool:
    """The workers of one role and how to choose among them."""

    def __init__(self, role: str, clients: Sequence[WorkerClient], policy: Policy | str = Policy.LEAST_LOADED):
        if not clients:
            raise ValueError(f"a {role} pool needs at least one worker")
        ids = [c.worker_id for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids in the {role} pool must be distinct, got {ids}")
        try:
            self.policy = Policy(policy)
        except ValueError:
            allowed = ", ".join(p.value for p in Policy)
            raise ValueError(f"unknown selection policy {policy!r} (allowed: {allowed})") from None
        self.role = role
        self.clients: tuple[WorkerClient, ...] = tuple(clients)
        self._index = {wid: i for i, wid in enumerate(ids)}
        self._in_flight = [0] * len(ids)
        self._healthy = [True] * len(ids)
        self._cursor = 0

    # -- state -------------------------------------------------------------------------------

    def client(self, worker_id: str) -> WorkerClient:
        return self.clients[self._position(worker_id)]

    def in_flight(self, worker_id: str) -> int:
        return self._in_flight[self._position(worker_id)]

    def healthy(self, worker_id: str) -> bool:
        return self._healthy[self._position(worker_id)]

    def set_health(self, worker_id: str, healthy: bool, reason: str = "") -> None:
        i = self._position(worker_id)
        if self._healthy[i] != healthy:
            log.warning("%s worker %s is now %s%s", self.role, worker_id, "healthy" if healthy else "down",
                        f": {reason}" if reason else "")
        self._healthy[i] = healthy

    def _position(self, worker_id: str) -> int:
        try:
            return self._index[worker_id]
        except KeyError:
            raise KeyError(f"no worker {worker_id!r} in the {self.role} pool") from None

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(Candidate(c.worker_id, n, h) for c, n, h in zip(self.clients, self._in_flight, self._healthy))

    # -- choosing ------------------------------------------------------------------------------

    def choose(self) -> tuple[WorkerClient, Decision]:
        """A healthy worker by this pool's policy, with the decision that picked it."""
        healthy = [i for i, ok in enumerate(self._healthy) if ok]
        if not healthy:
            raise NoHealthyWorkerError(
                f"no healthy {self.role} worker ({len(self.clients)} of {len(self.clients)} are down); retry later"
            )
        if self.policy is Policy.ROUND_ROBIN:
            n = len(self.clients)
            pick = next(i for i in ((self._cursor + k) % n for k in range(n)) if self._healthy[i])
            self._cursor = (pick + 1) % n
        else:
            pick = min(healthy, key=lambda i: (self._in_flight[i], i))
        decision = Decision(self.role, self.policy, self.candidates(), self.clients[pick].worker_id)
        if decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug(decision.describe())
        return self.clients[pick], decision

    @contextmanager
    def track(self, worker_id: str) -> Iterator[None]:
        """Counts one request in flight on `worker_id` for the duration of the block."""
        i = self._position(worker_id)
        self._in_flight[i] += 1
        try:
            yield
        finally:
            self._in_flight[i] -= 1


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
