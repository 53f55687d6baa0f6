"""worker_core/faults.py: holds count arrivals per point, release lets them go, the transport is wrapped
and unwrapped with the plan, and a worker not started for fault injection refuses any plan."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kv_transfer.faulty import FaultPlan, FaultyTransport
from worker_core.faults import FaultInjectionDisabledError, FaultPoint, Hold, WorkerFaultPlan, WorkerFaults


class KV:
    def __init__(self) -> None:
        self.transport = object()


def test_disabled_worker_refuses_plans() -> None:
    with pytest.raises(FaultInjectionDisabledError, match="fault_injection: true"):
        WorkerFaults(False).set_plan(WorkerFaultPlan(), None)


def test_nth_arrival_is_held_until_released() -> None:
    async def scenario() -> None:
        faults = WorkerFaults(True)
        faults.set_plan(WorkerFaultPlan(holds=(Hold(FaultPoint.STREAM, nth=2),)), None)
        await faults.at(FaultPoint.STREAM)  # 1st: passes
        await faults.at(FaultPoint.PREFILL)  # other points count apart
        held = asyncio.create_task(faults.at(FaultPoint.STREAM))
        assert await faults.wait_reached(FaultPoint.STREAM, 5)
        assert not held.done()
        assert not await faults.wait_reached(FaultPoint.PREFILL, 0.01)
        faults.release()
        await asyncio.wait_for(held, 5)
        await faults.at(FaultPoint.STREAM)  # 3rd: passes

    asyncio.run(scenario())


def test_a_new_plan_releases_held_requests_and_rewraps_the_transport() -> None:
    async def scenario() -> None:
        faults, kv = WorkerFaults(True), KV()
        real = kv.transport
        faults.set_plan(
            WorkerFaultPlan(holds=(Hold(FaultPoint.PREFILL),), transport=FaultPlan(fail_polls=frozenset({1}))), kv
        )
        assert isinstance(kv.transport, FaultyTransport) and kv.transport._inner is real
        held = asyncio.create_task(faults.at(FaultPoint.PREFILL))
        assert await faults.wait_reached(FaultPoint.PREFILL, 5)
        faults.set_plan(WorkerFaultPlan(transport=FaultPlan(stall_polls=frozenset({1}))), kv)
        await asyncio.wait_for(held, 5)
        assert kv.transport._inner is real  # never a wrapper around a wrapper
        faults.set_plan(WorkerFaultPlan(), kv)
        assert kv.transport is real

    asyncio.run(scenario())


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="1-based"):
        Hold(FaultPoint.STREAM, nth=0)
    nowhere: Any = "nowhere"  # an unchecked name, as a plan sent from outside may carry
    with pytest.raises(ValueError):
        Hold(nowhere)
    with pytest.raises(ValueError, match="aggregated"):
        WorkerFaults(True).set_plan(WorkerFaultPlan(transport=FaultPlan()), None)
