"""NaiveIndexer: the obviously correct, slow reference for router/indexer.py (differential tests).

Same public API and the same seq / stale / snapshot-overlap rules as `Indexer`, written
independently: one plain `set` per worker, `common.kv_events.first_gap` for the
sequence check, and find_matches counts each worker's leading hashes on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.contract import AllCleared, BlockRemoved, BlockStored, KVEventBatch, first_gap
from router.indexer import StaleWorker


class NaiveIndexer:
    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.held: dict[str, set[bytes]] = {}
        self.next_seq: dict[str, int] = {}
        self.stale: dict[str, StaleWorker] = {}
        self.in_overlap: set[str] = set()  # snapshot loaded, no event applied since

    def _know(self, worker_id: str) -> set[bytes]:
        self.next_seq.setdefault(worker_id, 0)
        return self.held.setdefault(worker_id, set())

    def store(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        self._know(worker_id).update(hashes)

    def remove(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        self._know(worker_id).difference_update(hashes)

    def clear(self, worker_id: str) -> None:
        self._know(worker_id).clear()

    def remove_worker(self, worker_id: str) -> None:
        self.held.pop(worker_id, None)
        self.next_seq.pop(worker_id, None)
        self.stale.pop(worker_id, None)
        self.in_overlap.discard(worker_id)

    def apply(self, batch: KVEventBatch) -> bool:
        w = batch.worker_id
        wrong = [e.block_size for e in batch.events if isinstance(e, BlockStored) and e.block_size != self.block_size]
        if wrong:
            raise ValueError(f"block_size {wrong[0]} in a KV event, index block_size {self.block_size}")
        self._know(w)
        if w in self.stale:
            return True
        events = list(batch.events)
        if w in self.in_overlap:
            while events and events[0].seq < self.next_seq[w]:
                events.pop(0)
        gap = first_gap(events, self.next_seq[w])
        good = events if gap is None else events[:gap]
        for e in good:
            if isinstance(e, BlockStored):
                self.store(w, e.block_hashes)
            elif isinstance(e, BlockRemoved):
                self.remove(w, e.block_hashes)
            elif isinstance(e, AllCleared):
                self.clear(w)
            self.next_seq[w] += 1
        if good:
            self.in_overlap.discard(w)
        if gap is None:
            return False
        got, want = events[gap].seq, self.next_seq[w]
        self.stale[w] = StaleWorker(w, want, got, "lost events" if got > want else "restart or replay")
        self.in_overlap.discard(w)
        self.held[w] = set()
        return True

    def load_snapshot(self, worker_id: str, hashes: Iterable[bytes], next_seq: int) -> None:
        if next_seq < 0:
            raise ValueError(f"next_seq must be >= 0, got {next_seq}")
        self._know(worker_id)
        self.held[worker_id] = set(hashes)
        self.next_seq[worker_id] = next_seq
        self.stale.pop(worker_id, None)
        self.in_overlap.add(worker_id)

    def is_stale(self, worker_id: str) -> bool:
        return worker_id in self.stale

    def stale_reason(self, worker_id: str) -> StaleWorker | None:
        return self.stale.get(worker_id)

    def expected_seq(self, worker_id: str) -> int:
        return self.next_seq.get(worker_id, 0)

    def find_matches(self, hashes: Sequence[bytes]) -> dict[str, int]:
        out = {}
        for w, held in self.held.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                out[w] = n
        return out

    def num_blocks(self, worker_id: str | None = None) -> int:
        if worker_id is None:
            return sum(len(s) for s in self.held.values())
        return len(self.held.get(worker_id, ()))

    def workers(self) -> list[str]:
        return sorted(self.held)
