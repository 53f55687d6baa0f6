"""The cluster as the router knows it: worker pools, their prefix indexes and KV event feeds, health,
drain, rejoin, and whether the router is serving.

`Membership` is what deploy and the admin API talk to (add a worker, drain one, follow a config
reload, poll health); the request path (router/request_path.py) only reads it: which pools, which
worker is up, the routing decision (`router`, whose prefix indexes the feeds keep current). Both
front doors (gRPC, HTTP) share one `Membership` through one request path.

Health: `refresh_health` asks every worker's `status()`; a worker that does not answer SERVING is
marked down (no new request, its cache forgotten). One that answers as a new process (Ray restarted
it) stays down and rejoins in the background (`rejoin(worker_id)`, set by deploy, handshakes it with
its peers again); once it is back, retries waiting for a worker (`workers_changed`) wake up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable

from common.contract import Health, WorkerStatus
from router.attempts import Attempt
from router.errors import WorkerStalledError, WorkerUnavailableError, one_line
from router.kv_feed import KVEventFeed
from router.pools import WorkerPool, WorkerReport, WorkerSlot, worker_reports
from router.routing import Router, RoutingConfig
from router.workers import WorkerClient

log = logging.getLogger(__name__)


class Membership:
    """Worker pools (`prefill=None`: aggregated mode, `decode` holds every worker) and their state."""

    def __init__(
        self,
        decode: WorkerPool,
        prefill: WorkerPool | None = None,
        *,
        routing: RoutingConfig | None = None,
        rng: random.Random | None = None,
        status_timeout_s: float = 2.0,
        cleanup_timeout_s: float = 5.0,
    ) -> None:
        self.prefill, self.decode = prefill, decode
        self.router = Router(decode, prefill, routing or RoutingConfig(policy=decode.policy), rng)
        self.feed = KVEventFeed(self.mark_down)
        self.status_timeout_s, self.cleanup_timeout_s = status_timeout_s, cleanup_timeout_s
        self._feeding = False
        self._workers_changed = asyncio.Event()  # set (and replaced) when a worker comes up or joins
        # deploy sets it: handshakes a worker Ray restarted with its peers (async, raises on failure)
        self.rejoin: Callable[[str], Awaitable[None]] | None = None
        self._rejoining: dict[str, asyncio.Task] = {}  # worker id -> its rejoin under way
        self.serving = False
        self._serving_listeners: list[Callable[[bool], Awaitable[None]]] = []
        # the request path sets it: the attempts in flight (a drain that times out aborts those on its worker)
        self.attempts_source: Callable[[], Iterable[Attempt]] = tuple

    @property
    def mode(self) -> str:
        return "aggregated" if self.prefill is None else "disaggregated"

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        return tuple(p for p in (self.prefill, self.decode) if p is not None)

    @property
    def workers_changed(self) -> asyncio.Event:
        """Set once the pools change (a worker comes up or joins); read it before routing, wait after."""
        return self._workers_changed

    def worker_states(self) -> list[tuple[str, str, object, bool]]:
        """(role, worker id, last status, eligible) of every worker, for the metrics scrape."""
        return [(pool.role, s.worker_id, s.status, s.eligible) for pool in self.pools for s in pool.slots]

    def mark_down(self, pool: WorkerPool, worker_id: str, reason: str) -> None:
        """A worker failed a call or its health check: no request goes there, and its cache is forgotten."""
        pool.set_health(worker_id, False, reason)
        self.router.index_of(pool).forget(worker_id)

    def mark_down_for(self, exc: BaseException, message: str) -> None:
        """A worker that is gone (per `exc`) gets no new request (its KV feed and the health check bring it
        back); a stalled one is only avoided by the request it stalled."""
        if isinstance(exc, WorkerUnavailableError) and not isinstance(exc, WorkerStalledError) and exc.worker_id:
            for pool in self.pools:
                if exc.worker_id in pool:
                    self.mark_down(pool, exc.worker_id, message)

    async def start_feeds(self) -> None:
        """Follow every worker's KV events (deploy calls this once serving; tests may leave it off)."""
        self._feeding = True
        for pool in self.pools:
            self.feed.follow_pool(self.router.index_of(pool))

    # -- serving ----------------------------------------------------------------------------------

    def on_serving(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """`listener(serving)` runs on every `set_serving` (the gRPC door's health service)."""
        self._serving_listeners.append(listener)

    async def set_serving(self, serving: bool = True) -> None:
        """Deploy calls this once the pools are ready (and with False to drain)."""
        self.serving = serving
        for listener in self._serving_listeners:
            await listener(serving)

    # -- pools that grow and shrink ----------------------------------------------------------------

    def pool_of(self, worker_id: str) -> WorkerPool:
        for pool in self.pools:
            if worker_id in pool:
                return pool
        raise KeyError(f"no worker {worker_id!r} in the router's pools")

    def add_worker(self, pool: WorkerPool, client: WorkerClient, incarnation: str = "") -> None:
        """A new worker (loaded and handshaken) starts taking requests. `incarnation`: the process that was
        handshaken (its WorkerStatus.incarnation), so that a restart before the first health check is seen."""
        slot = pool.add(client)
        slot.incarnation = incarnation
        if self._feeding:
            self.feed.follow(self.router.index_of(pool), slot)
        self._notify_workers()

    def _notify_workers(self) -> None:
        """Wake retries waiting for a worker to resume on."""
        changed, self._workers_changed = self._workers_changed, asyncio.Event()
        changed.set()

    async def drain_worker(self, worker_id: str, timeout_s: float) -> bool:
        """Take a worker out of service: no new requests; waits up to timeout_s for its running ones
        (then aborts them); its KV leases end; it leaves the pool and the index. True if it drained in time.
        A failure part way puts the worker back in service."""
        pool = self.pool_of(worker_id)
        slot = pool.drain(worker_id)
        try:
            drained = await self._drain(pool, slot, timeout_s)
        except BaseException:
            slot.draining = False
            raise
        pool.remove(worker_id)
        await self.feed.unfollow(worker_id)
        self.router.index_of(pool).forget(worker_id)
        return drained

    async def _drain(self, pool: WorkerPool, slot: WorkerSlot, timeout_s: float) -> bool:
        worker_id = slot.worker_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        drained = await pool.wait_drained(worker_id, timeout_s)
        if not drained:
            # a prefill worker: only prompts it is still computing (a leased one may be mid-pull on D,
            # and aborting it would free blocks under the READ); a decode worker: everything on it
            stuck = [
                a.rid
                for a in self.attempts_source()
                if (a.d is not None and a.d.worker_id == worker_id)
                or (a.p is not None and a.p.worker_id == worker_id and not a.prefill_done)
            ]
            log.warning("drain of %s timed out after %.1f s; aborting %d request(s)", worker_id, timeout_s, len(stuck))
            await asyncio.gather(*(self._abort_quietly(slot.client, rid) for rid in stuck))
            await pool.wait_drained(worker_id, self.cleanup_timeout_s)
        try:  # a prefill worker's leases: decode may still be pulling a prompt it computed
            wait = max(deadline - loop.time(), self.cleanup_timeout_s)
            async with asyncio.timeout(wait + self.cleanup_timeout_s):
                drained = await slot.client.wait_idle(wait) and drained
        except Exception as exc:  # noqa: BLE001 - the worker is being removed either way
            log.warning("%s did not report idle before removal: %s: %s", worker_id, type(exc).__name__, exc)
        return drained

    async def _abort_quietly(self, client: WorkerClient, rid: str) -> None:
        try:
            async with asyncio.timeout(self.cleanup_timeout_s):
                await client.abort(rid)
        except Exception as exc:  # noqa: BLE001 - the worker is being removed either way
            log.warning("drain: abort(%s) on %s failed: %s: %s", rid, client.worker_id, type(exc).__name__, exc)

    # -- health ----------------------------------------------------------------------------------

    async def worker_reports(self) -> list[WorkerReport]:
        """Every worker's status (None for one that did not answer within `status_timeout_s`)."""
        return await worker_reports(self.pools, self.status_timeout_s)

    async def refresh_health(self) -> None:
        """Marks each worker up or down by whether it answers `status()` with SERVING (deploy polls this,
        every `router.health_check_s`). A worker answering as a new process (Ray restarted it) is kept
        down and rejoins in the background (`rejoin(worker_id)` handshakes it with its peers again, then
        its status is checked once more); one rejoin at a time per worker, a failed one is tried again
        on a later check. `wait_rejoins` waits for those under way."""
        pools = {c.worker_id: pool for pool in self.pools for c in pool.clients}
        for report in await self.worker_reports():
            wid = report.worker_id
            pool = pools[wid]
            if wid not in pool:
                continue  # removed while we asked
            status = report.status
            if status is None or status.health != Health.SERVING:
                self.mark_down(pool, wid, "status check failed")
                continue
            slot = pool.slot(wid)
            if wid in self._rejoining:
                continue  # its rejoin decides
            if slot.incarnation and status.incarnation != slot.incarnation:
                self.mark_down(pool, wid, "restarted by Ray; re-handshaking with its peers")
                task = asyncio.create_task(self._rejoin(pool, wid), name=f"rejoin-{wid}")
                self._rejoining[wid] = task
                task.add_done_callback(functools.partial(self._forget_rejoin, wid))
                continue
            self._take_up(pool, wid, status)

    def _forget_rejoin(self, worker_id: str, _task: asyncio.Task) -> None:
        self._rejoining.pop(worker_id, None)

    def _take_up(self, pool: WorkerPool, worker_id: str, status: WorkerStatus) -> None:
        pool.slot(worker_id).incarnation = status.incarnation
        pool.set_status(worker_id, status)
        if pool.set_health(worker_id, True):
            self._notify_workers()

    async def _rejoin(self, pool: WorkerPool, worker_id: str) -> None:
        try:
            if self.rejoin is not None:
                await self.rejoin(worker_id)
            async with asyncio.timeout(self.status_timeout_s):  # still the process that rejoined, and well?
                status = await pool.client(worker_id).status()
        except Exception as exc:  # noqa: BLE001 - it stays down and is tried again on a later check
            log.warning("worker %s could not rejoin: %s: %s", worker_id, type(exc).__name__, one_line(str(exc)))
            return
        if worker_id in pool and status.health == Health.SERVING:
            self._take_up(pool, worker_id, status)

    async def wait_rejoins(self, timeout_s: float) -> bool:
        """True once no rejoin is under way (tests; shutdown); False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._rejoining:
                    await asyncio.gather(*self._rejoining.values(), return_exceptions=True)
            return True
        except TimeoutError:
            return False

    def worker_extras(self) -> dict[str, tuple[bool, int]]:
        """worker -> (draining, blocks the router's index holds for it)."""
        return {
            s.worker_id: (s.draining, self.router.index_of(pool).indexer.num_blocks(s.worker_id))
            for pool in self.pools
            for s in pool.slots
        }

    async def close(self) -> None:
        """Stops the KV event feeds and the rejoins under way."""
        await self.feed.close()
        for task in list(self._rejoining.values()):
            task.cancel()
        await asyncio.gather(*self._rejoining.values(), return_exceptions=True)
