"""The Ray-facing methods both worker roles answer the same way, by asking their WorkerHost.

`PrefillWorker` and `DecodeWorker` subclass this (one level, no mixins) and add their
role's request life cycle; deploy wraps them with `ray.remote`. Imports no ray itself
(WorkerHost does).
"""

from __future__ import annotations

from common.contract import KVEventsReply, ModelInfo, ProfilePlan, StepTiming, WorkerStatus
from common.kv_events import KVSnapshot
from worker_core.faults import FaultPoint
from worker_core.host import WorkerHost
from worker_core.spans import span_dicts

MAX_POLL_S = 10.0  # a long poll never holds an actor slot longer than this


class WorkerActor:
    host: WorkerHost

    async def status(self) -> WorkerStatus:  # each role adds its own figures
        raise NotImplementedError

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply:
        """KV events with seq >= after_seq, waiting up to timeout_s for one; with this worker's load."""
        await self.host.start()
        publisher = self.host.publisher
        events = await publisher.poll(after_seq, min(max(timeout_s, 0.0), MAX_POLL_S))
        return KVEventsReply(publisher.epoch, publisher.encode(events), await self.status())

    async def kv_snapshot(self) -> KVSnapshot:
        """What this worker caches, for a router that lost events (see worker_core/kv_publisher.py)."""
        return await self.host.kv_snapshot()

    async def model_info(self) -> ModelInfo:
        return self.host.model_info()

    async def get_tokenizer(self):
        """The engine's tokenizer, pickled to the router (same vocabulary and chat template as the workers)."""
        return self.host.core.tokenizer

    async def handshake_payload(self) -> bytes:
        return await self.host.handshake_payload()

    async def transport_info(self):
        """The UCX devices and transports this worker's KV agent started with (deploy's start-up check)."""
        return await self.host.transport_info()

    async def add_peer(self, payload: bytes) -> str:
        """Every rank of a peer worker; refuses an impossible pair, naming both sides and the field."""
        return await self.host.add_peer(payload)

    async def finished_spans(self) -> list[dict]:
        """This worker's ended spans (tracing exporter "memory": tests)."""
        return span_dicts(self.host.tracing.finished_spans())

    async def remove_peer(self, leader_agent: str) -> bool:
        """Forget a peer worker that left the cluster; False if it was not known."""
        return await self.host.remove_peer(leader_agent)

    # ---- fault injection (worker_core/faults.py; refused unless the cluster enables it) ------------------------

    async def set_fault_plan(self, plan) -> None:
        """Arm a WorkerFaultPlan (holds at chosen points, a faulty transport); an empty plan disarms."""
        await self.host.start()
        self.host.faults.set_plan(plan, self.host.kv)

    async def fault_reached(self, point: str, timeout_s: float = 30.0) -> bool:
        """True once a request is held at `point` (a FaultPoint value); False after timeout_s."""
        return await self.host.faults.wait_reached(FaultPoint(point), timeout_s)

    async def release_faults(self) -> None:
        """Held requests go on."""
        self.host.faults.release()

    async def check_integrity(self) -> None:
        await self.host.check_integrity()

    async def profile(self, plan: ProfilePlan) -> list[StepTiming]:
        """`tandem profile`: time synthetic engine steps over `plan` (worker_core/profiling.py). The worker
        must be idle (ProfileBusyError otherwise); it serves nothing until the measurement ends."""
        return await self.host.profile(plan)

    async def leak_check(self) -> None:
        await self.host.leak_check()
