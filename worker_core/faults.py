"""Fault injection inside a worker: the fault suite's and chaos drills' way to break a running cluster
at a chosen step, without timing tricks. Off unless the cluster config says `fault_injection: true`.

A `WorkerFaultPlan` says where this worker misbehaves:

    holds       Hold(point, nth): the nth time any request reaches `point` on this worker, it waits
                there until `release()` (or until the worker is killed: that is how a test kills a
                prefill worker "mid-prefill" or a decode worker "mid-stream": hold, see it reached,
                kill). Other requests go on.
    transport   a kv_transfer.faulty.FaultPlan wrapped around this worker's real transport (rank 0):
                chosen transfers refused at submit, reported FAILED, stalled (PENDING until the pull's
                deadline) or delivered late.

    Points      PREFILL      prefill worker: the prompt is queued in the engine, token 1 not returned
                BEFORE_PULL  decode worker: blocks taken for the prompt, its KV not yet pulled
                STREAM       decode / generate stream: a chunk was just handed to the router

The plan is set through the worker actor (`set_fault_plan`), a test waits with `fault_reached(point)`
and ends holds with `release_faults()`. With no plan every point is one attribute check.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass

from kv_transfer.faulty import FaultPlan, FaultyTransport


class FaultInjectionDisabledError(RuntimeError):
    """A fault plan was sent to a worker of a cluster started without `fault_injection: true`."""


class FaultPoint(str, enum.Enum):
    PREFILL = "prefill"
    BEFORE_PULL = "before_pull"
    STREAM = "stream"


@dataclass(frozen=True)
class Hold:
    point: FaultPoint
    nth: int = 1  # 1-based count of arrivals at `point` on this worker since the plan was set

    def __post_init__(self) -> None:
        object.__setattr__(self, "point", FaultPoint(self.point))
        if self.nth < 1:
            raise ValueError(f"Hold.nth is 1-based, got {self.nth}")


@dataclass(frozen=True)
class WorkerFaultPlan:
    holds: tuple[Hold, ...] = ()
    transport: FaultPlan | None = None


class WorkerFaults:
    """One worker's fault state; every method runs on the worker's event loop."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._holds: frozenset[Hold] = frozenset()
        self._arrivals: Counter[FaultPoint] = Counter()
        self._reached: dict[FaultPoint, asyncio.Event] = {}
        self._release = asyncio.Event()

    def set_plan(self, plan: WorkerFaultPlan, kv) -> None:
        """Arm `plan` (replacing the last one: counts restart, held requests are released). `kv` is the
        worker's RankKV (None without a transport): its transport is wrapped or unwrapped to match."""
        if not self.enabled:
            raise FaultInjectionDisabledError(
                "this worker does not accept fault plans: start the cluster with fault_injection: true "
                "(tests and chaos drills only)"
            )
        self.release()
        self._holds = frozenset(plan.holds)
        self._arrivals.clear()
        self._reached = {}
        self._release = asyncio.Event()
        if kv is not None:
            inner = kv.transport._inner if isinstance(kv.transport, FaultyTransport) else kv.transport
            kv.transport = FaultyTransport(inner, plan.transport) if plan.transport is not None else inner
        elif plan.transport is not None:
            raise ValueError("this worker moves no KV (aggregated): a transport fault plan cannot apply")

    async def at(self, point: FaultPoint) -> None:
        """A request reached `point`: hold it here if the plan says so."""
        if not self._holds:
            return
        self._arrivals[point] += 1
        if Hold(point, self._arrivals[point]) in self._holds:
            self._event(point).set()
            await self._release.wait()

    async def wait_reached(self, point: FaultPoint, timeout_s: float) -> bool:
        """True once a request is held at `point`; False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._event(FaultPoint(point)).wait()
            return True
        except TimeoutError:
            return False

    def release(self) -> None:
        """Let every held request go on."""
        self._release.set()

    def _event(self, point: FaultPoint) -> asyncio.Event:
        return self._reached.setdefault(point, asyncio.Event())
