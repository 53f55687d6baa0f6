"""tandem.v1.Admin: grow and shrink the worker pools while serving.

    AddWorkers(pool, count)        Cluster.add_worker (Ray actor, model load, KV handshakes
                                   with every peer) on a thread, then the router's pool and
                                   KV event feed take it in
    RemoveWorker(id, drain_s)      router: drain (no new requests, running ones finish or
                                   are aborted after drain_s, leases end), leave the pool
                                   and the prefix index; then Cluster.remove_worker (peers
                                   forget its NIXL agents, actor and placement group go)
    ScalePool(pool, replicas)      the config's `replicas` at run time: adds, or removes
                                   the newest workers first
    apply_config(config)           the same for both pools from a re-read config file
                                   (`tandem serve --config F`, then SIGHUP)

One admin operation runs at a time (a lock); requests keep flowing meanwhile. The
composition lives here, in deploy, because starting actors is deploy's business and
the router must not import it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import msgspec

from deploy.cluster import Cluster, WorkerHandle
from deploy.config import ServeConfig
from engine.errors import ConfigError
from router.server import GenerationService
from router.workers import RayWorkerClient, WorkerClient
from tandem_api.v1 import admin_pb2 as apb
from tandem_api.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")
ClientFactory = Callable[[WorkerHandle], WorkerClient]


def ray_client(handle: WorkerHandle) -> WorkerClient:
    return RayWorkerClient(handle.actor, handle.worker_id)


class AdminService(apb_grpc.AdminServicer):
    def __init__(self, cluster: Cluster, service: GenerationService, drain_timeout_s: float = 60.0,
                 client_factory: ClientFactory = ray_client) -> None:
        self.cluster, self.service = cluster, service
        self.drain_timeout_s = drain_timeout_s
        self.client_factory = client_factory
        self._lock = asyncio.Lock()

    def _router_pool(self, pool_name: str):
        s = self.service
        return s.prefill if pool_name == "prefill" and s.prefill is not None else s.decode

    @staticmethod
    async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        await context.abort(code, message)

    def _check_pool(self, pool: str) -> str | None:
        if pool not in POOLS:
            return f"pool must be one of {', '.join(POOLS)}, got {pool!r}"
        return None

    async def _add(self, pool_name: str) -> str:
        handle = await asyncio.to_thread(self.cluster.add_worker, pool_name)
        self.service.add_worker(self._router_pool(pool_name), self.client_factory(handle))
        return handle.worker_id

    async def _remove(self, worker_id: str, drain_timeout_s: float) -> bool:
        drained = await self.service.drain_worker(worker_id, drain_timeout_s)
        await asyncio.to_thread(self.cluster.remove_worker, worker_id)
        return drained

    def _drain_s(self, requested: float) -> float:
        return requested if requested > 0 else self.drain_timeout_s

    async def AddWorkers(self, request: apb.AddWorkersRequest, context: grpc.aio.ServicerContext
                         ) -> apb.AddWorkersResponse:
        problem = self._check_pool(request.pool) or (
            None if request.count >= 1 else f"count must be >= 1, got {request.count}")
        if problem:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        added: list[str] = []
        async with self._lock:
            try:
                for _ in range(request.count):
                    added.append(await self._add(request.pool))
            except Exception as exc:  # noqa: BLE001 - one line to the operator, the traceback to the log
                log.exception("adding a %s worker failed", request.pool)
                code = grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, ConfigError) else grpc.StatusCode.INTERNAL
                await self._refuse(context, code, f"added {added or 'none'}; the next failed: "
                                                  f"{type(exc).__name__}: {exc}")
        return apb.AddWorkersResponse(worker_ids=added, topology=self.cluster.topology())

    async def RemoveWorker(self, request: apb.RemoveWorkerRequest, context: grpc.aio.ServicerContext
                           ) -> apb.RemoveWorkerResponse:
        wid = request.worker_id
        async with self._lock:
            try:
                pool_name = self.cluster.pool_name(wid)
            except KeyError as exc:
                await self._refuse(context, grpc.StatusCode.NOT_FOUND, str(exc).strip("'\""))
            if len(self.cluster.pool_workers(pool_name)) <= 1:
                await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{wid} is the last {pool_name} worker; add another before removing it")
            drained = await self._remove(wid, self._drain_s(request.drain_timeout_s))
        return apb.RemoveWorkerResponse(worker_id=wid, drained=drained, topology=self.cluster.topology())

    async def scale(self, pool_name: str, replicas: int, drain_timeout_s: float = 0.0) -> tuple[list[str], list[str]]:
        """Grow or shrink a pool to `replicas` (newest removed first); (added, removed). Takes the admin lock."""
        added: list[str] = []
        removed: list[str] = []
        async with self._lock:
            workers = self.cluster.pool_workers(pool_name)
            try:
                while len(workers) < replicas:
                    added.append(await self._add(pool_name))
                while len(workers) > replicas:
                    wid = workers[-1].worker_id
                    await self._remove(wid, self._drain_s(drain_timeout_s))
                    removed.append(wid)
            except Exception as exc:
                raise ScaleError(f"added {added or 'none'}, removed {removed or 'none'}; then failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return added, removed

    async def apply_config(self, config: ServeConfig) -> tuple[list[str], list[str]]:
        """Reconcile the pools with a re-read config (SIGHUP): replicas change at run time; anything
        else that differs from the running config is reported as needing a restart."""
        running = self.cluster.config
        added: list[str] = []
        removed: list[str] = []
        for pool_name in POOLS:
            new, old = getattr(config, pool_name), getattr(running, pool_name)
            if msgspec.structs.replace(new, replicas=old.replicas) != old:
                log.warning("config reload: %s pool settings other than replicas changed; they take effect on "
                            "restart", pool_name)
            a, r = await self.scale(pool_name, new.replicas)
            added += a
            removed += r
        if msgspec.structs.replace(config, prefill=running.prefill, decode=running.decode) != running:
            log.warning("config reload: settings outside the pools' replicas changed; they take effect on restart")
        log.info("config reload: added %s, removed %s: %s", added or "none", removed or "none",
                 self.cluster.topology())
        return added, removed

    async def ScalePool(self, request: apb.ScalePoolRequest, context: grpc.aio.ServicerContext
                        ) -> apb.ScalePoolResponse:
        problem = self._check_pool(request.pool) or (
            None if request.replicas >= 1 else f"replicas must be >= 1, got {request.replicas}")
        if problem:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            added, removed = await self.scale(request.pool, request.replicas, request.drain_timeout_s)
        except ScaleError as exc:
            log.exception("scaling the %s pool failed", request.pool)
            await self._refuse(context, grpc.StatusCode.INTERNAL, str(exc))
        return apb.ScalePoolResponse(added=added, removed=removed, topology=self.cluster.topology())


class ScaleError(RuntimeError):
    """A pool change that stopped part way (what was done is in the message)."""
