"""KVEventPublisher: a worker's KV events, long-polled by routers over Ray.

The engine thread drains the block pool's events after every step and command
(worker_core/engine_loop.py) and hands them to `publish` on the actor's loop. A
router's subscription is a loop of Ray calls:

    reply = await worker.kv_events(after_seq, timeout_s)   # returns at once if events
                                                          # with seq >= after_seq are
                                                          # buffered, else when one is
                                                          # published or at timeout
    reply.events: encoded KVEventBatch (common/kv_events.py), reply.status: the load

The buffer is bounded (`capacity` events). A subscriber that falls further behind
gets the oldest events still held and sees a seq gap; it then asks for
`snapshot()` (every cached hash and the seq to go on from) and polls from there.
`epoch` names this publisher instance: a subscriber that sees it change (a new
worker under an old name) re-syncs the same way.

Pull rather than push: a router that starts late, restarts or falls behind simply
asks; a worker never holds a router's handle, and a dead router costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import deque
from collections.abc import Iterable

from common.kv_events import KVEvent, KVEventBatch, encode_event_batch

# A BlockStored of a 2048-token prefill holds lists of its 2048 token ids and 128 digests: about
# 18 KB of its own (17,592 bytes by tracemalloc around BlockStored(0, list(hashes), None, list(tokens),
# 16); the ints and digests themselves are shared with the engine). The buffer is kept short anyway:
# a router that falls 1024 events behind re-syncs from a snapshot instead.
DEFAULT_CAPACITY = 1024
MAX_EVENTS_PER_REPLY = 4096


class KVEventPublisher:
    def __init__(self, worker_id: str, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.worker_id = worker_id
        self.epoch = uuid.uuid4().hex
        self._buffer: deque[KVEvent] = deque(maxlen=capacity)
        self._published: asyncio.Event | None = None  # made on the loop by the first poll
        self.num_published = 0

    def publish(self, events: Iterable[KVEvent]) -> None:
        """Loop thread: append events (seq-contiguous, as the block pool made them) and wake pollers."""
        events = list(events)
        self._buffer.extend(events)
        self.num_published += len(events)
        if self._published is not None:
            self._published.set()

    @property
    def next_seq(self) -> int:
        """One past the newest published seq (0 before any event)."""
        return self._buffer[-1].seq + 1 if self._buffer else 0

    def since(self, after_seq: int, max_events: int = MAX_EVENTS_PER_REPLY) -> list[KVEvent]:
        """Buffered events with seq >= after_seq, oldest first (all held ones if after_seq fell out)."""
        if not self._buffer or after_seq >= self.next_seq:
            return []
        start = max(0, after_seq - self._buffer[0].seq)
        return list(itertools.islice(self._buffer, start, start + max_events))

    async def poll(self, after_seq: int, timeout_s: float) -> list[KVEvent]:
        """Events with seq >= after_seq; waits up to timeout_s for one to be published (then [])."""
        events = self.since(after_seq)
        if events or timeout_s <= 0:
            return events
        if self._published is None:
            self._published = asyncio.Event()
        self._published.clear()
        try:
            async with asyncio.timeout(timeout_s):
                while not (events := self.since(after_seq)):
                    await self._published.wait()
                    self._published.clear()
        except TimeoutError:
            return []
        return events

    def encode(self, events: list[KVEvent]) -> bytes:
        return encode_event_batch(KVEventBatch(self.worker_id, events))
