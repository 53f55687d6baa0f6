"""The Ray-facing methods both worker roles answer the same way, by asking their WorkerHost.

`PrefillWorker` and `DecodeWorker` subclass this (one level, no mixins) and add their
role's request life cycle; deploy wraps them with `ray.remote`.
"""

from __future__ import annotations

from common.wire import ModelInfo
from worker_core.host import WorkerHost


class WorkerActor:
    host: WorkerHost

    async def model_info(self) -> ModelInfo:
        return self.host.model_info()

    async def get_tokenizer(self):
        """The engine's tokenizer, pickled to the router (same vocabulary and chat template as the workers)."""
        return self.host.core.tokenizer

    async def handshake_payload(self) -> bytes:
        return await self.host.handshake_payload()

    async def add_peer(self, payload: bytes) -> str:
        """Every rank of a peer worker; refuses an impossible pair, naming both sides and the field."""
        return await self.host.add_peer(payload)

    async def check_integrity(self) -> None:
        await self.host.check_integrity()

    async def leak_check(self) -> None:
        await self.host.leak_check()
