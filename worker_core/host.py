"""WorkerHost: what both worker roles share, without Ray.

One host = one EngineCore (on an AsyncEngine thread) + optionally one KV transport
with the engine's cache registered. The Ray actors in `prefill_worker/` and
`decode_worker/` compose a host and add their role's request life cycle; tests can
build a host in-process.

Everything here is called from the actor's asyncio loop. The engine is started
lazily by the first async call (a Ray async actor runs `__init__` outside its loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from common.wire import LogprobEntry, ModelInfo, StreamChunk, WorkerStatus
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from worker_core.engine_loop import AsyncEngine, EngineDeadError

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "aggregated")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to start; built by deploy from its config."""

    worker_id: str
    role: str  # one of ROLES
    engine: EngineConfig
    transport: str = "nixl"  # "nixl" | "none" (aggregated workers move no KV)
    nixl_backend: str = "UCX"
    nixl_progress_thread: bool = False  # off: ~3x the bandwidth on a 2-core host (PLATFORM.md)
    lease_s: float = 30.0  # prefill: how long leased blocks wait for a pull
    transfer_timeout_s: float = 30.0  # decode: one pull, submit to done
    admission_timeout_s: float = 60.0  # decode: waiting for free blocks before giving up
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    env: dict[str, str] = field(default_factory=dict)  # set before the engine starts (UCX_*, OMP_*)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.transport not in ("nixl", "none"):
            raise ValueError(f"transport must be 'nixl' or 'none', got {self.transport!r}")
        for name in ("lease_s", "transfer_timeout_s", "admission_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def to_chunk(out: StepOutput) -> StreamChunk:
    return StreamChunk(
        request_id=out.request_id,
        token_ids=list(out.new_token_ids),
        text=out.new_text,
        finished=out.finished,
        finish_reason=out.finish_reason,
        stop_reason=None if out.stop_reason is None else str(out.stop_reason),
        logprobs=[LogprobEntry(lp.token_id, lp.logprob, [tuple(t) for t in lp.top]) for lp in out.new_logprobs],
    )


class WorkerHost:
    def __init__(self, settings: WorkerSettings) -> None:
        for key, value in settings.env.items():
            os.environ.setdefault(key, value)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.worker_id = settings.worker_id
        self.role = settings.role
        self.core = EngineCore(settings.engine)
        self.engine = AsyncEngine(self.core, settings.worker_id)
        self.transport = None
        self.layout = None
        if settings.transport == "nixl":
            from kv_transfer import KVLayout, NixlSettings, NixlTransport

            self.layout = KVLayout.from_cache(self.core.kv_cache, self.core.kv_spec, self.core.source.fingerprint)
            self.transport = NixlTransport(
                settings.worker_id, NixlSettings(backend=settings.nixl_backend,
                                                 enable_prog_thread=settings.nixl_progress_thread))
            self.transport.register(self.core.kv_cache, self.layout)
        self.node_id = _node_id()
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.engine.start()

    def close(self) -> None:
        self.engine.stop()
        if self.transport is not None:
            self.transport.close()

    # ---- facts --------------------------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        c = self.core
        return ModelInfo(
            name=c.model_config.name or c.model_config.architecture,
            fingerprint=c.source.fingerprint,
            vocab_size=c.model_config.vocab_size,
            max_model_len=c.max_model_len,
            eos_token_ids=sorted(c.eos_token_ids),
            kv_capacity_tokens=c.kv_spec.num_blocks * c.kv_spec.block_size,
        )

    async def status(self, transfers_in_flight: int = 0) -> WorkerStatus:
        await self.start()
        spec = self.core.kv_spec
        try:
            free, (running, waiting, leased) = await self.engine.call(
                lambda c: (c.kv_manager.num_free_blocks, c.counts()))
        except EngineDeadError:
            free, running, waiting, leased = 0, 0, 0, 0
        return WorkerStatus(
            worker_id=self.worker_id, role=self.role,
            health="SERVING" if self.engine.healthy else "NOT_SERVING",
            kv_blocks_total=spec.num_blocks, kv_blocks_free=free,
            running=running, waiting=waiting, leased=leased,
            node_id=self.node_id, device=str(self.core.device), block_size=spec.block_size,
            dtype=str(self.core.dtype).removeprefix("torch."), transfers_in_flight=transfers_in_flight,
        )

    # ---- transport ------------------------------------------------------------------------------------------------

    def handshake_payload(self) -> bytes:
        if self.transport is None:
            raise RuntimeError(f"worker {self.worker_id} ({self.role}) has no KV transport")
        return self.transport.handshake_payload()

    def add_peer(self, payload: bytes) -> str:
        if self.transport is None:
            raise RuntimeError(f"worker {self.worker_id} ({self.role}) has no KV transport")
        return self.transport.add_peer(payload)

    # ---- checks (tests and admin) -----------------------------------------------------------------------------------

    async def check_integrity(self) -> None:
        await self.start()
        await self.engine.call(lambda c: c.check_integrity())

    async def leak_check(self) -> None:
        await self.start()
        await self.engine.call(lambda c: (c.check_integrity(), c.leak_check()))

    async def wait_idle(self, timeout_s: float, extra_busy=lambda: False) -> bool:
        """True once the engine holds no request and no lease (and extra_busy() is False)."""
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            busy = await self.engine.call(lambda c: bool(c.scheduler.requests or c.leases))
            if not busy and not extra_busy():
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.engine.wait_capacity(min(left, 0.05))

    # ---- aggregated generation ----------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamChunk]:
        """Run a request start to finish on this engine, yielding coalesced chunks."""
        await self.start()
        stream = self.engine.open_stream(request_id)
        try:
            await self.engine.call(lambda c: c.add_request(prompt_ids, params, request_id))
            async for chunk in self.chunks(stream, len(prompt_ids)):
                yield chunk
        finally:
            await self.finish_stream(request_id)

    async def chunks(self, stream: asyncio.Queue, prompt_tokens: int, extra: dict | None = None) -> AsyncIterator[StreamChunk]:
        """StepOutputs of one request as chunks; everything already queued is merged into one chunk."""
        while True:
            item = await stream.get()
            chunk = self._chunk_of(item)
            while not chunk.finished and not stream.empty():
                chunk.merge(self._chunk_of(stream.get_nowait()))
            if chunk.finished:
                chunk.prompt_tokens = prompt_tokens
                for key, value in (extra or {}).items():
                    setattr(chunk, key, value)
            yield chunk
            if chunk.finished:
                return

    @staticmethod
    def _chunk_of(item) -> StreamChunk:
        if isinstance(item, BaseException):
            raise item
        chunk = to_chunk(item)
        chunk.cached_tokens = item.num_cached_tokens
        return chunk

    async def finish_stream(self, request_id: str) -> None:
        """Close a stream; abort the request if it is still live (consumer went away or failed)."""
        self.engine.close_stream(request_id)
        if self.engine.healthy:
            try:
                await self.engine.abort(request_id)
            except EngineDeadError:
                pass


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return socket.gethostname()
