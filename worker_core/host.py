"""WorkerHost: what both worker roles share.

One host = one EngineCore (on an AsyncEngine thread) + optionally a KV transport
endpoint per rank. With tp = pp = 1 everything is in this process (tests build a
host in-process, with no Ray cluster); with tp x pp > 1 the host starts the other
ranks as Ray actors (worker_core/ranks.py) and the engine drives them through a
DistributedExecutor. The Ray actors in `prefill_worker/` and `decode_worker/`
compose a host and add their role's request life cycle.

Imports ray (through ranks.py, and for the node id); never imported by ranks.py.

A worker's handshake is the list of its ranks' handshakes (rank order); a peer adds
every one of them, so each decode rank can read from each prefill rank.

Everything here is called from the actor's asyncio loop. The engine is started
lazily by the first async call (a Ray async actor runs `__init__` outside its loop).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import msgspec
import ray
import torch

from common import telemetry as tm
from common.contract import (
    WIRE_VERSION,
    Health,
    LogprobEntry,
    ModelInfo,
    ProfilePlan,
    Role,
    StepTiming,
    StreamChunk,
    WorkerStatus,
)
from common.kv_events import KVSnapshot
from common.sampling_params import SamplingParams
from common.telemetry import setup_tracing
from engine.device import resolve_device, resolve_dtype
from engine.engine_core import EngineCore
from engine.loader import load_model_source
from engine.outputs import StepOutput
from kv_transfer import TransportVersionError, check_pair
from worker_core.core_share import CoreShare, LendBudget
from worker_core.engine_loop import AsyncEngine, EngineDeadError, EngineStats
from worker_core.faults import FaultPoint, WorkerFaults
from worker_core.kv_publisher import KVEventPublisher
from worker_core.rank_kv import RankKV
from worker_core.ranks import (
    RankGroup,
    add_peer_worker,
    handshake_payloads,
    pull_on_ranks,
    rank_layouts,
    remove_peer_worker,
)
from worker_core.settings import WorkerSettings, apply_process_settings
from worker_core.spans import RequestSpan

log = logging.getLogger(__name__)

_HANDSHAKES = msgspec.msgpack.Encoder()
_HANDSHAKE_DECODER = msgspec.msgpack.Decoder(list[bytes])


def to_chunk(out: StepOutput) -> StreamChunk:
    """An engine output as the chunk a worker streams (`cached_tokens`: the engine's prefix hit)."""
    return StreamChunk(
        request_id=out.request_id,
        token_ids=list(out.new_token_ids),
        text=out.new_text,
        finished=out.finished,
        finish_reason=out.finish_reason,
        stop_reason=None if out.stop_reason is None else str(out.stop_reason),
        logprobs=[LogprobEntry(lp.token_id, lp.logprob, [(t, p) for t, p in lp.top]) for lp in out.new_logprobs],
        cached_tokens=out.num_cached_tokens,
        spec_steps=out.spec_steps,
        spec_proposed=out.spec_proposed,
        spec_accepted=out.spec_accepted,
    )


class WorkerHost:
    def __init__(self, settings: WorkerSettings) -> None:
        apply_process_settings(settings)
        self.settings = settings
        self.worker_id = settings.worker_id
        self.role = settings.role
        self.ranks = None  # RankGroup when tp x pp > 1
        self.kv: RankKV | None = None  # rank 0's transport endpoint
        if settings.engine.parallel.world_size > 1:
            cfg = settings.engine
            source = load_model_source(cfg.model)
            device = resolve_device(cfg.device)
            dtype = resolve_dtype(cfg.dtype, device, source.config.hidden_size, source.config.intermediate_size)
            self.ranks = RankGroup.start(settings, source, dtype)
            self.core = EngineCore(cfg, source, executor=self.ranks.executor)
            self.kv = self.ranks.member.kv
        else:
            self.core = EngineCore(settings.engine)
            if settings.transport == "nixl":
                self.kv = RankKV(
                    settings.worker_id,
                    self.core.kv_cache,
                    self.core.kv_spec,
                    self.core.source.fingerprint,
                    backend=settings.nixl_backend,
                    progress_thread=settings.nixl_progress_thread,
                    staging_bytes=settings.kv_staging_bytes if settings.role == Role.DECODE else 0,
                )
        self.tracing = setup_tracing(settings.tracing)
        self.tracer = self.tracing.tracer
        self.publisher = KVEventPublisher(settings.worker_id)
        self.faults = WorkerFaults(settings.fault_injection)
        share, lend = None, None
        if settings.engine.parallel.world_size == 1 and self.core.device.type == "cpu":
            # a slot in the host's table even where this worker neither borrows nor lends: it says when this
            # worker is stepping (a borrowing peer leaves its core alone then) and how often its neighbours
            # were, which the planner needs to tell this worker's speed from the host's load
            share = CoreShare(settings.num_threads or torch.get_num_threads())
            if settings.lend_core_tpot_ms > 0:
                lend = LendBudget(settings.lend_core_tpot_ms / 1000)
        self.engine = AsyncEngine(
            self.core,
            settings.worker_id,
            on_kv_events=self.publisher.publish,
            core_share=share,
            borrow=settings.borrow_idle_cores,
            lend=lend,
        )
        self.node_id = _node_id()
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.engine.start()

    def close(self) -> None:
        self.tracing.shutdown()
        self.engine.stop()
        if self.ranks is not None:
            self.ranks.close()
        elif self.kv is not None:
            self.kv.close()

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
            speculative=c.speculative_description(),
            wire_version=WIRE_VERSION,
        )

    async def status(self, transfers_in_flight: int = 0) -> WorkerStatus:
        await self.start()
        spec = self.core.kv_spec
        # the engine thread's last published figures: a status never waits behind a long step
        st = self.engine.stats if self.engine.healthy else EngineStats()
        return WorkerStatus(
            worker_id=self.worker_id,
            role=self.role,
            health=Health.SERVING if self.engine.healthy else Health.NOT_SERVING,
            kv_blocks_total=spec.num_blocks,
            kv_blocks_free=st.free_blocks,
            running=st.running,
            waiting=st.waiting,
            leased=st.leased,
            prefill_tokens=st.prefill_tokens,
            max_num_seqs=self.core.config.scheduler.max_num_seqs,
            prefix_query_tokens=st.prefix_query_tokens,
            prefix_hit_tokens=st.prefix_hit_tokens,
            spec_steps=st.spec_steps,
            spec_proposed=st.spec_proposed,
            spec_accepted=st.spec_accepted,
            widened_steps=self.engine.widened_steps,
            lent_s=self.engine.core_share.lent_s if self.engine.core_share is not None else 0.0,
            tpot_slack_s=self.engine.tpot_slack_s,
            node_id=self.node_id,
            device=str(self.core.device),
            block_size=spec.block_size,
            dtype=str(self.core.dtype).removeprefix("torch."),
            transfers_in_flight=transfers_in_flight,
            incarnation=self.publisher.epoch,
            perf=self.engine.step_times.estimate(self.core.clock()),
            live_step=live.coefficients() if (live := self.engine.live_fit.model()) is not None else (),
            live_steps=live.samples if live is not None else 0,
            live_busy=self.engine.live_fit.busy_neighbours(),
            live_decode=served if (served := self.engine.live_fit.served_decode()) is not None else (),
        )

    async def kv_snapshot(self) -> KVSnapshot:
        """Every cached block hash and the event seq to go on from (taken between two steps)."""
        await self.start()
        next_seq, hashes = await self.engine.kv_snapshot()
        return KVSnapshot(self.worker_id, self.publisher.epoch, self.core.kv_spec.block_size, next_seq, hashes)

    # ---- transport ------------------------------------------------------------------------------------------------

    def _need_kv(self) -> RankKV:
        if self.kv is None:
            raise RuntimeError(f"worker {self.worker_id} ({self.role}) has no KV transport")
        return self.kv

    @property
    def _rank_actors(self) -> list:
        return self.ranks.actors if self.ranks else []

    async def handshake_payload(self) -> bytes:
        """This worker's handshake: every rank's, in rank order."""
        return _HANDSHAKES.encode(await handshake_payloads(self._need_kv(), self._rank_actors))

    async def layouts(self) -> list:
        return await rank_layouts(self._need_kv(), self._rank_actors)

    async def transport_info(self):
        """Rank 0's KV transport as its agent started (kv_transfer/ucx_net.py TransportInfo): the start-up check."""
        node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return self._need_kv().transport_info(self.worker_id, node_ip)

    async def add_peer(self, payload: bytes) -> str:
        """Add every rank of a peer worker to every rank of ours; returns the peer's leader agent.

        A decode worker also checks the pair as a whole (heads, layers, block sizes) and
        refuses, naming both sides and the field, what no conversion can bridge.
        """
        kv = self._need_kv()
        try:
            payloads = _HANDSHAKE_DECODER.decode(payload)
        except msgspec.DecodeError as e:
            raise TransportVersionError(f"peer payload is not a Tandem worker handshake: {e}") from None
        leader = await add_peer_worker(kv, self._rank_actors, payloads)
        if self.role == Role.DECODE:
            check_pair(kv.peer_layouts(leader), await self.layouts())
        return leader

    async def remove_peer(self, leader_agent: str) -> bool:
        """Forget a peer worker that left the cluster (its NIXL agents on every rank)."""
        return await remove_peer_worker(self._need_kv(), self._rank_actors, leader_agent)

    async def pull(
        self,
        leader_agent: str,
        src_blocks: list[int],
        dst_blocks: list[int],
        num_tokens: int,
        first_token: int,
        timeout_s: float,
    ) -> int:
        """Every rank brings its part of tokens [first_token, num_tokens) into dst_blocks; bytes read."""
        return await pull_on_ranks(
            self._need_kv(),
            self._rank_actors,
            (leader_agent, src_blocks, dst_blocks, num_tokens, first_token, timeout_s),
        )

    # ---- checks (tests and admin) -----------------------------------------------------------------------------------

    async def check_integrity(self) -> None:
        await self.start()
        await self.engine.check_integrity()

    async def leak_check(self) -> None:
        await self.start()
        await self.engine.leak_check()

    async def profile(self, plan: ProfilePlan) -> list[StepTiming]:
        """AsyncEngine.profile: this engine's step times over `plan` (refused while it holds work)."""
        await self.start()
        return await self.engine.profile(plan)

    async def wait_idle(self, timeout_s: float, extra_busy: Callable[[], bool] = lambda: False) -> bool:
        """True once the engine holds no request and no lease (and extra_busy() is False)."""
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            busy = await self.engine.holds_work()
            if not busy and not extra_busy():
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.engine.wait_capacity(min(left, 0.05))

    # ---- aggregated generation ---------------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: list[int] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Run a request start to finish on this engine, yielding coalesced chunks."""
        await self.start()
        stream = self.engine.open_stream(request_id)
        try:
            with RequestSpan(
                self.tracer, tm.SPAN_GENERATE_LOCAL, request_id, self.worker_id, len(prompt_ids), trace_ctx
            ) as span:
                await self.engine.add_request(prompt_ids, params, request_id, prior_output_ids=prior_ids or ())
                async for chunk in self.chunks(stream, len(prompt_ids), on_first=span.engine_children):
                    if span.first_token():
                        span.set_attribute(tm.ATTR_CACHED_INPUT_TOKENS, chunk.cached_tokens)
                    span.count(chunk)
                    yield chunk
                    await self.faults.at(FaultPoint.STREAM)
        finally:
            await self.finish_stream(request_id)

    async def chunks(
        self,
        stream: asyncio.Queue,
        prompt_tokens: int,
        extra: dict | None = None,
        on_first: Callable[[StepOutput], None] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """StepOutputs of one request as chunks; everything already queued is merged into one chunk.

        `extra` fields are set on every chunk: a decode worker passes its pull's figures and the
        prefill worker's cache hit as `cached_tokens` (prompt tokens not computed, which on D is
        P's hit, not what D's own cache held of the pulled prompt). `on_first(StepOutput)` sees
        the output that carries the first token's engine timings.
        """

        def convert(item) -> StreamChunk:
            if on_first is not None and isinstance(item, StepOutput) and item.first_token_time is not None:
                on_first(item)
            chunk = self._chunk_of(item)
            for key, value in (extra or {}).items():
                setattr(chunk, key, value)
            return chunk

        while True:
            chunk = convert(await stream.get())
            while not chunk.finished and not stream.empty():
                chunk.merge(convert(stream.get_nowait()))
            if chunk.finished:
                chunk.prompt_tokens = prompt_tokens
            yield chunk
            if chunk.finished:
                return

    @staticmethod
    def _chunk_of(item) -> StreamChunk:
        if isinstance(item, BaseException):
            raise item
        return to_chunk(item)

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
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return socket.gethostname()
