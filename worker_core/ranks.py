"""The ranks of a tp x pp worker: one Ray actor per rank besides the leader.

A worker presents itself to the router as ONE actor (the leader, global rank 0: it
schedules, samples and answers Ray calls). For tp x pp > 1 the leader starts the
other ranks as `RankActor`s, in the bundles of the placement group deploy placed
it in (bundle 0 is the leader's, bundle i rank i's), so Ray decides where each rank
runs and reserves its CPUs / GPU:

    leader.__init__  -> RankGroup.start(settings)
        1. create RankActor 1..n-1 (placement group bundles 1..n-1, or plain resources)
        2. every rank joins one torch.distributed group (leader's address, a free port)
           and loads its shard of the weights, in parallel
        3. num_blocks = min over ranks (each rank's budget / its bytes per block); every
           rank allocates that many blocks, so a block id means the same on every rank
        4. with a KV transport: every rank registers its cache slice with its own agent
        5. ranks 1..n-1 enter `serve_rank` (a thread) and run what the leader broadcasts

The rank actors are owned by the leader: when it dies, Ray kills them (fate sharing).

Imports ray (the one module of worker_core that creates Ray actors). Depends on
settings.py and rank_kv.py only; host.py uses it, never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.contract import Role
from common.errors import KVTransferFailedError
from engine.config import EngineConfig
from engine.distributed import DistEnv, DistributedExecutor, serve_rank
from engine.loader import load_model_source
from engine.loader.source import ModelSource
from engine.model.parallel import RankPosition
from engine.shard import ModelShard
from worker_core.rank_kv import RankKV
from worker_core.settings import WorkerSettings, apply_process_settings

log = logging.getLogger(__name__)

PROGRESS_S = 0.002  # a prefill rank's NIXL progress period (it is the target of reads it never sees)


def _backend(config: EngineConfig) -> str:
    if config.parallel.backend:
        return config.parallel.backend
    return "nccl" if config.device.startswith("cuda") else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_agent_name(worker_id: str, rank: int) -> str:
    return worker_id if rank == 0 else f"{worker_id}-r{rank}"


class RankMember:
    """What every rank does, in the leader's process (rank 0) or in a RankActor."""

    def __init__(self, settings: WorkerSettings, rank: int, dtype: str) -> None:
        par = settings.engine.parallel
        self.settings = settings
        self.pos = RankPosition.of(rank, par.tensor_parallel_size, par.pipeline_parallel_size)
        self.dtype = getattr(torch, dtype)
        self.env: DistEnv | None = None
        self.shard: ModelShard | None = None
        self.source: ModelSource | None = None
        self.kv: RankKV | None = None

    def join(self, init_method: str, source: ModelSource | None = None) -> int:
        """Join the group, load this rank's shard; returns the blocks its budget holds."""
        cfg = self.settings.engine
        torch.manual_seed(cfg.seed)
        self.env = DistEnv(self.pos, init_method, _backend(cfg), cfg.parallel.collective_timeout_s)
        self.source = source or load_model_source(cfg.model)
        self.shard = ModelShard(cfg, self.source, self.pos, self.env.parallel_context(), dtype=self.dtype)
        return self.shard.max_blocks()

    def joined(self) -> tuple[DistEnv, ModelShard, ModelSource]:
        """The group, shard and model source `join` made (RuntimeError before it)."""
        if self.env is None or self.shard is None or self.source is None:
            raise RuntimeError(f"{self.pos.describe()}: used before join()")
        return self.env, self.shard, self.source

    def need_kv(self) -> RankKV:
        if self.kv is None:
            raise RuntimeError(f"{self.pos.describe()} has no KV transport (transport 'none', or before allocate())")
        return self.kv

    def allocate(self, num_blocks: int) -> None:
        _, shard, source = self.joined()
        shard.allocate(num_blocks)
        s = self.settings
        if s.transport == "nixl":
            staging = s.kv_staging_bytes if s.role == Role.DECODE else 0
            cache = shard.kv_cache
            if cache is None:
                raise RuntimeError(f"{self.pos.describe()}: the KV cache was not allocated")
            self.kv = RankKV(
                rank_agent_name(s.worker_id, self.pos.rank),
                cache,
                shard.kv_spec,
                source.fingerprint,
                backend=s.nixl_backend,
                progress_thread=s.nixl_progress_thread,
                staging_bytes=staging,
            )


class RankActor:
    """Rank 1..n-1 of a worker (a threaded Ray actor: the step loop holds one thread)."""

    def __init__(self, settings: WorkerSettings, rank: int, dtype: str) -> None:
        apply_process_settings(settings)
        self.member = RankMember(settings, rank, dtype)
        self._loop: threading.Thread | None = None
        self._stop = threading.Event()
        self._progress: threading.Thread | None = None

    def join(self, init_method: str) -> int:
        return self.member.join(init_method)

    def allocate(self, num_blocks: int) -> None:
        self.member.allocate(num_blocks)

    def start(self) -> None:
        m = self.member
        self._loop = threading.Thread(target=self._serve, name=f"rank{m.pos.rank}-steps", daemon=True)
        self._loop.start()
        if m.kv is not None and m.settings.role == Role.PREFILL:
            self._progress = threading.Thread(target=self._pump, name=f"rank{m.pos.rank}-nixl", daemon=True)
            self._progress.start()

    def _serve(self) -> None:
        try:
            env, shard, _ = self.member.joined()
            serve_rank(shard, env)
        except BaseException:  # noqa: BLE001 - the leader's next collective fails within its timeout
            log.exception("%s: step loop failed", self.member.pos.describe())
        finally:
            self._stop.set()

    def _pump(self) -> None:
        kv = self.member.need_kv()
        while not self._stop.wait(PROGRESS_S):
            try:
                kv.progress()
            except Exception:  # noqa: BLE001 - closed under us at shutdown
                return

    def alive(self) -> bool:
        return not self._stop.is_set()

    def handshake_payload(self) -> bytes:
        return self.member.need_kv().handshake_payload()

    def layout(self):
        return self.member.need_kv().layout

    def add_peer_worker(self, payloads: list[bytes]) -> list[str]:
        return self.member.need_kv().add_peer_worker(payloads)

    def remove_peer_worker(self, leader_agent: str) -> bool:
        return self.member.need_kv().remove_peer_worker(leader_agent)

    def pull(
        self,
        leader_agent: str,
        src_blocks: list[int],
        dst_blocks: list[int],
        num_tokens: int,
        first_token: int,
        timeout_s: float,
    ) -> int:
        return self.member.need_kv().pull(leader_agent, src_blocks, dst_blocks, num_tokens, first_token, timeout_s)

    def shutdown(self) -> None:
        self._stop.set()
        if self.member.kv is not None:
            self.member.kv.close()


class RankGroup:
    """The leader's handle on its worker's ranks; rank 0 lives in the leader's process."""

    def __init__(self, settings: WorkerSettings, actors: list, member: RankMember) -> None:
        self.settings = settings
        self.actors = actors  # ranks 1..n-1, in rank order
        self.member = member  # rank 0
        self.executor: DistributedExecutor | None = None

    @classmethod
    def start(cls, settings: WorkerSettings, source: ModelSource, dtype: torch.dtype) -> RankGroup:
        cfg = settings.engine
        world = cfg.parallel.world_size
        dtype_name = str(dtype).removeprefix("torch.")
        settings = replace(settings, engine=replace(cfg, dtype=dtype_name))  # every rank: the leader's dtype
        pg = ray.util.get_current_placement_group()
        actor_cls = ray.remote(RankActor)
        actors: list[Any] = []  # Ray actor handles
        for rank in range(1, world):
            opts = dict(settings.rank_options)
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            actors.append(actor_cls.options(max_concurrency=8, name=None, **opts).remote(settings, rank, dtype_name))
        group = cls(settings, actors, RankMember(settings, 0, dtype_name))
        try:
            host = ray.util.get_node_ip_address()
            init_method = f"tcp://{host}:{_free_port()}"
            joins = [a.join.remote(init_method) for a in actors]
            blocks = [group.member.join(init_method, source)] + _get(joins)
            num_blocks = min(blocks)
            _get([a.allocate.remote(num_blocks) for a in actors])
            group.member.allocate(num_blocks)
            _get([a.start.remote() for a in actors])
            env, shard, _ = group.member.joined()
            group.executor = DistributedExecutor(shard, env)
        except BaseException:
            group.close()
            raise
        log.info(
            "%s: %d ranks (tp %d x pp %d) ready, %d KV blocks each",
            settings.worker_id,
            world,
            cfg.parallel.tensor_parallel_size,
            cfg.parallel.pipeline_parallel_size,
            num_blocks,
        )
        return group

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()  # the ranks leave their step loops
        for a in self.actors:
            try:
                _get([a.shutdown.remote()], timeout=10)
            except Exception:  # noqa: BLE001 - best effort; the kill is what counts
                pass
            ray.kill(a)
        if self.member.kv is not None:
            self.member.kv.close()
        if self.executor is None and self.member.env is not None:
            self.member.env.close()


# ---- KV transport across every rank of a worker: rank 0's endpoint `kv` here, ranks 1.. in `actors` ----------


async def handshake_payloads(kv: RankKV, actors: list) -> list[bytes]:
    return [kv.handshake_payload()] + list(await asyncio.gather(*(a.handshake_payload.remote() for a in actors)))


async def rank_layouts(kv: RankKV, actors: list) -> list:
    return [kv.layout] + list(await asyncio.gather(*(a.layout.remote() for a in actors)))


async def add_peer_worker(kv: RankKV, actors: list, payloads: list[bytes]) -> str:
    """Every rank adds every rank of a peer worker; returns the peer's leader agent."""
    results = await asyncio.gather(*(a.add_peer_worker.remote(payloads) for a in actors))
    agents = kv.add_peer_worker(payloads)
    if any(r != agents for r in results):
        raise RuntimeError(f"ranks disagree on the peer's agents: {agents} vs {results}")
    return agents[0]


async def remove_peer_worker(kv: RankKV, actors: list, leader_agent: str) -> bool:
    """Every rank forgets a peer worker; True if rank 0 knew it."""
    await asyncio.gather(*(a.remove_peer_worker.remote(leader_agent) for a in actors))
    return kv.remove_peer_worker(leader_agent)


async def pull_on_ranks(kv: RankKV, actors: list, args: tuple) -> int:
    """Every rank pulls its part of a request's KV (rank 0 on a thread here, the others in their actors).

    Returns the bytes read once ALL have finished; waits for all of them also when one fails
    or the caller is cancelled, so the destination blocks are never freed under a READ.
    """
    parts = [asyncio.ensure_future(asyncio.to_thread(kv.pull, *args))]
    parts += [asyncio.ensure_future(_await_ref(a.pull.remote(*args))) for a in actors]
    gathered = asyncio.gather(*parts, return_exceptions=True)
    try:
        results = await asyncio.shield(gathered)
    except asyncio.CancelledError:
        await gathered
        raise
    for r in results:
        if isinstance(r, KVTransferFailedError):
            raise r
        if isinstance(r, BaseException):  # a rank actor died, or a plan refused the block tables
            raise KVTransferFailedError(f"KV pull on {kv.agent_name}'s worker failed: {type(r).__name__}: {r}") from r
    return sum(r for r in results if isinstance(r, int))


def _get(refs: list, timeout: float | None = None) -> list:
    """ray.get from the leader's __init__ / shutdown: no event loop is running in this thread then,
    so Ray's "blocking ray.get inside async actor" warning does not apply (its documented switch)."""
    key = "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        return ray.get(refs, timeout=timeout)
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


async def _await_ref(ref):
    return await ref
