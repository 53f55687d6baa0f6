"""KVEventFeed: each worker's KV events into its pool's prefix index, over Ray.

One asyncio task per worker long-polls `kv_events(after_seq, timeout)` (see
worker_core/kv_publisher.py) and:

- applies the batch to the pool's `Indexer` (router/indexer.py), which checks the
  sequence numbers; a gap (events lost) or a new publisher epoch (a new worker
  under the name) marks the worker stale, and the feed re-syncs it from
  `kv_snapshot()` before going on;
- keeps the worker's last `WorkerStatus` on its pool slot (every reply carries one,
  so decode costs see fresh free-block counts without a separate poll);
- reports a worker that is gone (actor dead, node lost) or not serving through
  `on_down(pool, worker_id, reason)`, which marks it down and drops its entries;
  the task keeps retrying every `retry_s`, so a worker that comes back is re-synced.

`wait_until(predicate)` lets tests wait for the index to reach a state, without
sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from common.contract import Health, KVEventDecodeError, decode_event_batch
from router.errors import WorkerUnavailableError
from router.pools import WorkerPool, WorkerSlot
from router.routing import PoolIndex

log = logging.getLogger(__name__)

OnDown = Callable[[WorkerPool, str, str], None]


class KVEventFeed:
    def __init__(self, on_down: OnDown, poll_timeout_s: float = 1.0, retry_s: float = 0.5) -> None:
        self.on_down = on_down
        self.poll_timeout_s = poll_timeout_s
        self.retry_s = retry_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._changed = asyncio.Condition()
        self.resyncs = 0  # snapshots loaded (observability, tests)

    def follow(self, ix: PoolIndex, slot: WorkerSlot) -> None:
        """Start following one worker (idempotent)."""
        wid = slot.worker_id
        if wid not in self._tasks or self._tasks[wid].done():
            self._tasks[wid] = asyncio.get_running_loop().create_task(self._follow(ix, slot), name=f"kv-feed-{wid}")

    def follow_pool(self, ix: PoolIndex) -> None:
        for slot in ix.pool.slots:
            self.follow(ix, slot)

    async def unfollow(self, worker_id: str) -> None:
        task = self._tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for wid in list(self._tasks):
            await self.unfollow(wid)

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Return once predicate() holds after some feed update; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _follow(self, ix: PoolIndex, slot: WorkerSlot) -> None:
        wid, client, indexer = slot.worker_id, slot.client, ix.indexer
        epoch: str | None = None
        while True:
            try:
                reply = await client.kv_events(indexer.expected_seq(wid), self.poll_timeout_s)
                ix.pool.set_status(wid, reply.status)
                if reply.status.health != Health.SERVING:
                    raise WorkerUnavailableError(f"worker {wid} reports {reply.status.health}", wid)
                batch = decode_event_batch(reply.events)
                # a new publisher under the same name (restarted worker): its seqs mean nothing to us
                stale = True if epoch is not None and reply.epoch != epoch else indexer.apply(batch)
                if stale:
                    snap = await client.kv_snapshot()
                    if snap.block_size != ix.pool.block_size:
                        raise ValueError(
                            f"snapshot block size {snap.block_size} != the {ix.pool.role} pool's {ix.pool.block_size}"
                        )
                    indexer.load_snapshot(wid, snap.block_hashes, snap.next_seq)
                    self.resyncs += 1
                    log.info(
                        "%s worker %s re-synced from a snapshot: %d blocks, next seq %d",
                        ix.pool.role,
                        wid,
                        len(snap.block_hashes),
                        snap.next_seq,
                    )
                    epoch = snap.epoch
                else:
                    epoch = reply.epoch
            except asyncio.CancelledError:
                raise
            except WorkerUnavailableError as exc:
                epoch = None
                self.on_down(ix.pool, wid, str(exc))
                await self._notify()
                await asyncio.sleep(self.retry_s)
                continue
            except (KVEventDecodeError, ValueError) as exc:  # a worker speaking another version, a wrong block size
                log.error("KV events of %s worker %s refused: %s", ix.pool.role, wid, exc)
                ix.forget(wid)
                await self._notify()
                await asyncio.sleep(self.retry_s)
                continue
            except Exception as exc:  # noqa: BLE001 - the feed must outlive one failed call
                log.warning("KV event poll of %s worker %s failed: %s: %s", ix.pool.role, wid, type(exc).__name__, exc)
                await asyncio.sleep(self.retry_s)
                continue
            await self._notify()
