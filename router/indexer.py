"""The prefix index: which worker holds which KV block hashes, fed by KV events.

Block hashes are chained (common/block_hash.py): hash i names tokens 0..end of block i,
so a worker holds a prefix of n blocks iff it holds hashes[0..n-1]. A flat map is
enough, no tree:

    _masks   hash -> bitmask of the workers holding it (one small int bit per worker,
             freed bits reused lowest first, so masks stay small ints)
    workers  worker id -> its hashes (for AllCleared / removal), next expected seq,
             stale mark

`find_matches(hashes)` walks the query once: `active = mask(h0)`, then for each next
hash `still = active & mask(h)`; the workers in `active & ~still` matched i blocks.
It stops as soon as `still == 0`, and decodes bits to worker ids only for the result.

Event sequence rules (common/kv_events.py): every worker's events carry seq 0, 1, 2...
The indexer remembers the next seq it expects per worker (0 for a worker never seen).

    seq == expected                         applied
    seq <  expected, snapshot overlap       skipped silently (see below)
    seq >  expected (lost events)           the worker becomes STALE
    seq <  expected otherwise (restart,     the worker becomes STALE
        or a re-delivered batch)

A stale worker's entries are dropped (we no longer know what it holds), the rest of
its batch and every later batch are ignored, and `apply` returns True until the
caller loads a snapshot (`BlockPool.snapshot()`: next_seq and every cached hash).

Snapshot overlap: `load_snapshot(w, hashes, next_seq)` reflects every event with
seq < next_seq, and some of those may still be in flight (taken from the pool before
the snapshot, delivered after it). So until the first event is applied after a
snapshot, an event with seq < expected is skipped. Once an event has been applied,
the per-worker stream is past the snapshot and a smaller seq can only mean a
restarted worker (or a duplicated batch): stale. A worker that restarts and whose
first events arrive in that window cannot be told from an overlap (batches carry no
incarnation id); its first event with seq >= next_seq is then taken as a
continuation.

A BlockStored whose block_size is not the index's raises ValueError before anything
of the batch is applied (misconfiguration: never index hashes of another block size).

`PredictedBlocks` is the router's own guess: blocks it routed to a worker that the
worker has not reported stored yet, refcounted per request, same `find_matches`.

Nothing here imports torch or the engine; one instance per pool (one block size).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.contract import AllCleared, BlockRemoved, BlockStored, KVEventBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaleWorker:
    """Why a worker's entries were dropped: the event that broke its sequence."""

    worker_id: str
    expected_seq: int  # what the index expected
    got_seq: int  # what arrived
    reason: str  # "lost events" (got > expected) or "restart or replay" (got < expected)

    def describe(self) -> str:
        return f"worker {self.worker_id}: {self.reason} (expected seq {self.expected_seq}, got {self.got_seq})"


class _Bits:
    """Worker id <-> small int bit, freed bits reused lowest first."""

    __slots__ = ("ids", "_free")

    def __init__(self) -> None:
        self.ids: list[str | None] = []  # bit -> worker id
        self._free: list[int] = []  # heap of freed bits

    def take(self, worker_id: str) -> int:
        if self._free:
            bit = heapq.heappop(self._free)
            self.ids[bit] = worker_id
        else:
            bit = len(self.ids)
            self.ids.append(worker_id)
        return bit

    def release(self, bit: int) -> None:
        self.ids[bit] = None
        heapq.heappush(self._free, bit)


def _walk(masks: dict[bytes, int], ids: list[str | None], hashes: Iterable[bytes]) -> dict[str, int]:
    """worker -> number of leading hashes it holds (contiguous from hashes[0]); zeros omitted."""
    it = iter(hashes)
    first = next(it, None)
    if first is None:
        return {}
    get = masks.get
    active = get(first, 0)
    if not active:
        return {}
    out: dict[str, int] = {}
    n = 1
    for h in it:
        still = active & get(h, 0)
        if still != active:
            gone = active ^ still  # matched exactly n
            while gone:
                low = gone & -gone
                out[ids[low.bit_length() - 1]] = n  # type: ignore[index]  # a set bit names a live worker
                gone ^= low
            if not still:
                return out
            active = still
        n += 1
    while active:
        low = active & -active
        out[ids[low.bit_length() - 1]] = n  # type: ignore[index]  # a set bit names a live worker
        active ^= low
    return out


class _WorkerState:
    __slots__ = ("bit", "flag", "hashes", "expected", "stale", "after_snapshot")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.flag = 1 << bit
        self.hashes: set[bytes] = set()
        self.expected = 0  # next seq expected
        self.stale: StaleWorker | None = None
        self.after_snapshot = False  # a snapshot was loaded and no event applied since


class Indexer:
    """Which worker holds which KV block hashes, fed by KV events (one instance per pool, one block size)."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._masks: dict[bytes, int] = {}
        self._bits = _Bits()
        self._workers: dict[str, _WorkerState] = {}

    def _state(self, worker_id: str) -> _WorkerState:
        st = self._workers.get(worker_id)
        if st is None:
            st = self._workers[worker_id] = _WorkerState(self._bits.take(worker_id))
        return st

    def _drop_all(self, st: _WorkerState) -> None:
        masks, keep = self._masks, ~st.flag
        for h in st.hashes:
            m = masks[h] & keep
            if m:
                masks[h] = m
            else:
                del masks[h]
        st.hashes.clear()

    # ---- raw mutations ---------------------------------------------------------

    def store(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        """The worker now holds these hashes (already held ones are no-ops)."""
        st = self._state(worker_id)
        masks, flag, held = self._masks, st.flag, st.hashes
        for h in hashes:
            if h not in held:
                held.add(h)
                masks[h] = masks.get(h, 0) | flag

    def remove(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        """The worker no longer holds these hashes (ones it never held are ignored)."""
        st = self._state(worker_id)
        masks, keep, held = self._masks, ~st.flag, st.hashes
        for h in hashes:
            if h in held:
                held.discard(h)
                m = masks[h] & keep
                if m:
                    masks[h] = m
                else:
                    del masks[h]

    def clear(self, worker_id: str) -> None:
        """AllCleared: drop every hash of this worker; it stays known (seq, stale mark kept)."""
        self._drop_all(self._state(worker_id))

    def remove_worker(self, worker_id: str) -> None:
        """Death or removal: drop its entries, forget its seq and stale mark, free its bit."""
        st = self._workers.pop(worker_id, None)
        if st is not None:
            self._drop_all(st)
            self._bits.release(st.bit)

    # ---- event stream ----------------------------------------------------------

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply the batch's events in order; True iff the worker is stale afterwards (fetch a snapshot)."""
        bs = self.block_size
        for ev in batch.events:  # validate all before changing anything
            if type(ev) is BlockStored and ev.block_size != bs:
                raise ValueError(
                    f"KV event from worker {batch.worker_id!r} has block_size {ev.block_size}, "
                    f"this index is for block_size {bs}: the worker and router disagree on the block size"
                )
        st = self._state(batch.worker_id)
        if st.stale is not None:
            return True
        expected = st.expected
        for ev in batch.events:
            seq = ev.seq
            if seq != expected:
                if seq < expected and st.after_snapshot:
                    continue  # already reflected in the snapshot
                st.expected = expected
                self._mark_stale(st, batch.worker_id, seq)
                return True
            if type(ev) is BlockStored:
                self.store(batch.worker_id, ev.block_hashes)
            elif type(ev) is BlockRemoved:
                self.remove(batch.worker_id, ev.block_hashes)
            elif type(ev) is AllCleared:
                self.clear(batch.worker_id)
            else:  # pragma: no cover - KVEvent is a closed union
                raise TypeError(f"unknown KV event {ev!r}")
            expected += 1
            st.after_snapshot = False
        st.expected = expected
        return False

    def _mark_stale(self, st: _WorkerState, worker_id: str, got: int) -> None:
        reason = "lost events" if got > st.expected else "restart or replay"
        st.stale = StaleWorker(worker_id, st.expected, got, reason)
        st.after_snapshot = False
        dropped = len(st.hashes)
        self._drop_all(st)
        log.warning("KV index: %s; dropped its %d entries until a snapshot", st.stale.describe(), dropped)

    def load_snapshot(self, worker_id: str, hashes: Iterable[bytes], next_seq: int) -> None:
        """Replace the worker's entries with `hashes` (all it caches as of seq next_seq - 1).

        Clears the stale mark; the next expected seq is next_seq, and events with a smaller
        seq still in flight are skipped until one event has been applied.
        """
        if next_seq < 0:
            raise ValueError(f"next_seq must be >= 0, got {next_seq}")
        st = self._state(worker_id)
        self._drop_all(st)
        self.store(worker_id, hashes)
        st.stale = None
        st.expected = next_seq
        st.after_snapshot = True

    def is_stale(self, worker_id: str) -> bool:
        st = self._workers.get(worker_id)
        return st is not None and st.stale is not None

    def stale_reason(self, worker_id: str) -> StaleWorker | None:
        """What made the worker stale (None if it is not)."""
        st = self._workers.get(worker_id)
        return st.stale if st is not None else None

    def expected_seq(self, worker_id: str) -> int:
        """The seq the next event of this worker must carry (0 for an unknown worker)."""
        st = self._workers.get(worker_id)
        return st.expected if st is not None else 0

    # ---- queries ---------------------------------------------------------------

    def find_matches(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """worker -> number of LEADING hashes it holds (contiguous from hashes[0]); workers with 0 omitted."""
        return _walk(self._masks, self._bits.ids, hashes)

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Entries of one worker, or every (hash, worker) pair."""
        if worker_id is None:
            return sum(len(st.hashes) for st in self._workers.values())
        st = self._workers.get(worker_id)
        return len(st.hashes) if st is not None else 0

    def workers(self) -> list[str]:
        """Every known worker (named by a mutation, an event batch or a snapshot, not removed), sorted."""
        return sorted(self._workers)


class PredictedBlocks:
    """Blocks the router has routed to a worker but that worker has not reported stored yet (burst accounting).

    Refcounted: two requests may predict the same hash on the same worker. Each key
    (request id) predicts one list of hashes on one worker; drop it when the request's
    blocks are reported stored, or the request ends.
    """

    def __init__(self) -> None:
        self._masks: dict[bytes, int] = {}
        self._bits = _Bits()
        self._keys: dict[str, tuple[str, tuple[bytes, ...]]] = {}  # key -> (worker, distinct hashes)
        self._bit_of: dict[str, int] = {}  # worker -> bit, while it has a key
        self._counts: dict[str, dict[bytes, int]] = {}  # worker -> hash -> refcount
        self._worker_keys: dict[str, set[str]] = {}

    def add(self, key: str, worker_id: str, hashes: Sequence[bytes]) -> None:
        """Predict `hashes` on `worker_id` for `key` (one add per key; ValueError on a live key)."""
        if key in self._keys:
            raise ValueError(f"predicted blocks for key {key!r} were already added (on {self._keys[key][0]!r})")
        distinct = tuple(dict.fromkeys(hashes))
        bit = self._bit_of.get(worker_id)
        if bit is None:
            bit = self._bit_of[worker_id] = self._bits.take(worker_id)
            self._counts[worker_id] = {}
            self._worker_keys[worker_id] = set()
        self._keys[key] = (worker_id, distinct)
        self._worker_keys[worker_id].add(key)
        counts, masks, flag = self._counts[worker_id], self._masks, 1 << bit
        for h in distinct:
            c = counts.get(h, 0)
            counts[h] = c + 1
            if not c:
                masks[h] = masks.get(h, 0) | flag

    def drop(self, key: str) -> None:
        """Forget the key's prediction (idempotent)."""
        entry = self._keys.pop(key, None)
        if entry is None:
            return
        worker_id, hashes = entry
        bit = self._bit_of[worker_id]
        counts, masks, keep = self._counts[worker_id], self._masks, ~(1 << bit)
        for h in hashes:
            c = counts[h] - 1
            if c:
                counts[h] = c
            else:
                del counts[h]
                m = masks[h] & keep
                if m:
                    masks[h] = m
                else:
                    del masks[h]
        keys = self._worker_keys[worker_id]
        keys.discard(key)
        if not keys:
            del self._worker_keys[worker_id], self._counts[worker_id], self._bit_of[worker_id]
            self._bits.release(bit)

    def drop_worker(self, worker_id: str) -> None:
        """Forget every key predicted on this worker."""
        for key in list(self._worker_keys.get(worker_id, ())):
            self.drop(key)

    def find_matches(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Same meaning as Indexer.find_matches, over predicted blocks."""
        return _walk(self._masks, self._bits.ids, hashes)

    def __len__(self) -> int:
        return len(self._keys)
