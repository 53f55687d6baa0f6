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

One admin operation runs at a time (a lock); requests keep flowing meanwhile. Each
runs as a task this service owns: a caller whose deadline passes (or who hangs up)
gets its status, while the operation still completes, worker registered in the
router included, so the router and the cluster never disagree on who exists. The
composition lives here, in deploy, because starting actors is deploy's business and
the router must not import it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import msgspec

from common.errors import ConfigError
from deploy.cluster import Cluster, WorkerHandle
from deploy.config import ServeConfig
from router.membership import Membership
from router.workers import RayWorkerClient, WorkerClient
from tandem_api.v1 import admin_pb2 as apb
from tandem_api.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")
ClientFactory = Callable[[WorkerHandle], WorkerClient]


def ray_client(handle: WorkerHandle) -> WorkerClient:
    return RayWorkerClient(handle.actor, handle.worker_id)


class AdminError(RuntimeError):
    """An admin operation refused or stopped part way; `code` is the gRPC status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdminService(apb_grpc.AdminServicer):
    def __init__(
        self,
        cluster: Cluster,
        membership: Membership,
        drain_timeout_s: float = 60.0,
        client_factory: ClientFactory = ray_client,
    ) -> None:
        """`membership`: the router's pools (router/membership.py), which this service grows and shrinks."""
        self.cluster, self.membership = cluster, membership
        self.drain_timeout_s = drain_timeout_s
        self.client_factory = client_factory
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        # the replicas the config file said last: a reload scales only the pools whose count changed in
        # the file, so workers added or removed through this service are not undone by an unrelated SIGHUP
        self._file_replicas = {name: getattr(cluster.config, name).replicas for name in POOLS}
        self.planner: Any = None  # deploy/planner_loop.PlannerLoop when `planner.mode` is sla

    # -- operations (each one a task this service owns: a caller that goes away does not cut it in half) ----

    async def _owned(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _router_pool(self, pool_name: str):
        m = self.membership
        return m.prefill if pool_name == "prefill" and m.prefill is not None else m.decode

    async def _add(self, pool_name: str) -> str:
        """Start a worker and put it in service; caller holds the lock."""
        handle = await asyncio.to_thread(self.cluster.add_worker, pool_name)
        client = self.client_factory(handle)
        try:
            incarnation = (await client.status()).incarnation  # the process just handshaken
        except Exception:  # noqa: BLE001 - unknown: the first health check records it
            incarnation = ""
        self.membership.add_worker(self._router_pool(pool_name), client, incarnation)
        return handle.worker_id

    async def _remove(self, worker_id: str, drain_timeout_s: float) -> bool:
        """Drain a worker out of service and stop it; caller holds the lock."""
        drained = await self.membership.drain_worker(worker_id, drain_timeout_s)
        await asyncio.to_thread(self.cluster.remove_worker, worker_id)
        return drained

    def _drain_s(self, requested: float) -> float:
        return requested if requested > 0 else self.drain_timeout_s

    @staticmethod
    def _check_request(pool_name: str, field: str, value: int) -> None:
        """INVALID_ARGUMENT for an unknown pool or a count / replica number below 1."""
        if pool_name not in POOLS:
            raise AdminError(
                grpc.StatusCode.INVALID_ARGUMENT, f"pool must be one of {', '.join(POOLS)}, got {pool_name!r}"
            )
        if value < 1:
            raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be >= 1, got {value}")

    async def add(self, pool_name: str, count: int) -> list[str]:
        self._check_request(pool_name, "count", count)
        added: list[str] = []
        async with self._lock:
            try:
                for _ in range(count):
                    added.append(await self._add(pool_name))
            except Exception as exc:
                log.exception("adding a %s worker failed", pool_name)
                code = grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, ConfigError) else grpc.StatusCode.INTERNAL
                raise AdminError(
                    code, f"added {added or 'none'}; the next failed: {type(exc).__name__}: {exc}"
                ) from exc
        return added

    async def remove(self, worker_id: str, drain_timeout_s: float = 0.0) -> bool:
        async with self._lock:
            try:
                pool_name = self.cluster.pool_name(worker_id)
                router_pool = self.membership.pool_of(worker_id)
            except KeyError as exc:
                raise AdminError(grpc.StatusCode.NOT_FOUND, str(exc).strip("'\"")) from None
            if len(router_pool.slots) <= 1:
                raise AdminError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{worker_id} is the last {router_pool.role} worker; add another before removing it",
                )
            try:
                return await self._remove(worker_id, self._drain_s(drain_timeout_s))
            except Exception as exc:
                log.exception("removing %s (%s pool) failed", worker_id, pool_name)
                raise AdminError(
                    grpc.StatusCode.INTERNAL, f"removing {worker_id} failed: {type(exc).__name__}: {exc}"
                ) from exc

    async def scale(self, pool_name: str, replicas: int, drain_timeout_s: float = 0.0) -> tuple[list[str], list[str]]:
        """Grow or shrink a pool to `replicas` (newest removed first); (added, removed)."""
        self._check_request(pool_name, "replicas", replicas)
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
                log.exception("scaling the %s pool failed", pool_name)
                raise AdminError(
                    grpc.StatusCode.INTERNAL,
                    f"added {added or 'none'}, removed {removed or 'none'}; then failed: {type(exc).__name__}: {exc}",
                ) from exc
        return added, removed

    async def apply_config(self, config: ServeConfig) -> tuple[list[str], list[str]]:
        """Follow a re-read config (SIGHUP): a pool whose `replicas` changed in the file is scaled to it;
        anything else that differs from the running config is reported as needing a restart."""
        running = self.cluster.config
        config = config.with_devices_of(running)
        added: list[str] = []
        removed: list[str] = []
        for pool_name in POOLS:
            new, old = getattr(config, pool_name), getattr(running, pool_name)
            if msgspec.structs.replace(new, replicas=old.replicas) != old:
                log.warning(
                    "config reload: %s pool settings other than replicas changed; they take effect on restart",
                    pool_name,
                )
            if new.replicas != self._file_replicas[pool_name]:
                a, r = await self._owned(self.scale(pool_name, new.replicas))
                self._file_replicas[pool_name] = new.replicas
                added += a
                removed += r
        if msgspec.structs.replace(config, prefill=running.prefill, decode=running.decode) != running:
            log.warning("config reload: settings outside the pools' replicas changed; they take effect on restart")
        log.info("config reload: added %s, removed %s: %s", added or "none", removed or "none", self.cluster.topology())
        return added, removed

    # -- RPCs ----------------------------------------------------------------------------------------

    async def _rpc(self, context: grpc.aio.ServicerContext, coro):
        try:
            return await self._owned(coro)
        except AdminError as exc:
            await context.abort(exc.code, str(exc))

    async def AddWorkers(
        self, request: apb.AddWorkersRequest, context: grpc.aio.ServicerContext
    ) -> apb.AddWorkersResponse:
        added = await self._rpc(context, self.add(request.pool, request.count))
        return apb.AddWorkersResponse(worker_ids=added, topology=self.cluster.topology())

    async def RemoveWorker(
        self, request: apb.RemoveWorkerRequest, context: grpc.aio.ServicerContext
    ) -> apb.RemoveWorkerResponse:
        drained = await self._rpc(context, self.remove(request.worker_id, request.drain_timeout_s))
        return apb.RemoveWorkerResponse(worker_id=request.worker_id, drained=drained, topology=self.cluster.topology())

    async def ScalePool(
        self, request: apb.ScalePoolRequest, context: grpc.aio.ServicerContext
    ) -> apb.ScalePoolResponse:
        added, removed = await self._rpc(context, self.scale(request.pool, request.replicas, request.drain_timeout_s))
        return apb.ScalePoolResponse(added=added, removed=removed, topology=self.cluster.topology())
