"""router/indexer.py: the prefix index against a naive reference, golden seq/stale cases, PredictedBlocks.

The differential harness drives `Indexer` and `NaiveIndexer` with the same seeded random
event streams (simulated workers with lost events, restarts, duplicated batches,
snapshots with in-flight overlap, removals) and compares every query after every step.
It is shown able to fail: indexers with a planted bug must make it report a mismatch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from common.block_hash import hash_full_blocks
from common.kv_events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    decode_event_batch,
    encode_event_batch,
)
from engine.block_pool import BlockPool
from router.indexer import Indexer, PredictedBlocks
from router.indexer_reference import NaiveIndexer

BS = 4


# ---- the differential harness ----------------------------------------------------


class SimWorker:
    """What a worker's pool really holds, its next seq and its taken-but-undelivered events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cache: set[bytes] = set()
        self.next_seq = 0
        self.pending: list[KVEvent] = []
        self.last_batch: KVEventBatch | None = None

    def emit(self, event_of_seq: Callable[[int], KVEvent]) -> None:
        self.pending.append(event_of_seq(self.next_seq))
        self.next_seq += 1


def make_chains(rng: random.Random) -> tuple[list[list[int]], list[list[bytes]]]:
    """~20 token lists sharing prefixes (each may extend a prefix of an earlier one) and their chains."""
    docs: list[list[int]] = []
    for _ in range(20):
        if docs and rng.random() < 0.7:
            base = rng.choice(docs)
            tokens = base[: rng.randint(0, len(base))] + [rng.randrange(1000) for _ in range(rng.randint(0, 40))]
        else:
            tokens = [rng.randrange(1000) for _ in range(rng.randint(1, 60))]
        if len(tokens) >= BS:
            docs.append(tokens)
    return docs, [hash_full_blocks(d, BS) for d in docs]


def make_queries(rng: random.Random, docs: list[list[int]], chains: list[list[bytes]]) -> list[list[bytes]]:
    queries: list[list[bytes]] = [[], [rng.randbytes(16)]]
    for doc, chain in zip(docs, chains):
        queries.append(chain)
        queries.append(chain[: rng.randint(1, len(chain))])
        extended = doc + [rng.randrange(1000) for _ in range(rng.randint(BS, 4 * BS))]
        queries.append(hash_full_blocks(extended, BS, prior=chain))
        if len(chain) > 2:
            holed = list(chain)
            holed[rng.randrange(1, len(chain) - 1)] = rng.randbytes(16)
            queries.append(holed)
    queries.append([rng.randbytes(16) for _ in range(5)])
    return queries


def compare(real: Indexer, ref: NaiveIndexer, names: list[str], queries: list[list[bytes]], what: str) -> str | None:
    """The first difference between the two indexers, described, or None."""
    for q in queries:
        a, b = real.find_matches(q), ref.find_matches(q)
        if a != b:
            return f"{what}: find_matches({len(q)} hashes) = {a}, reference {b}"
    for w in names:
        for attr in ("is_stale", "stale_reason", "expected_seq", "num_blocks"):
            a, b = getattr(real, attr)(w), getattr(ref, attr)(w)
            if a != b:
                return f"{what}: {attr}({w!r}) = {a}, reference {b}"
    if real.num_blocks() != ref.num_blocks():
        return f"{what}: num_blocks() = {real.num_blocks()}, reference {ref.num_blocks()}"
    if real.workers() != ref.workers():
        return f"{what}: workers() = {real.workers()}, reference {ref.workers()}"
    return None


def differential_mismatch(seed: int, make_indexer: Callable[[int], Indexer] = Indexer, steps: int = 300) -> str | None:
    """Drive `make_indexer(BS)` and NaiveIndexer with one seeded random stream; the first mismatch, or None."""
    rng = random.Random(seed)
    docs, chains = make_chains(rng)
    queries = make_queries(rng, docs, chains)
    sims = [SimWorker(f"w{i}") for i in range(rng.randint(1, 6))]
    names = [s.name for s in sims] + ["never-seen"]
    real, ref = make_indexer(BS), NaiveIndexer(BS)

    def check(what: str) -> str | None:
        return compare(real, ref, names, rng.sample(queries, min(12, len(queries))), what)

    def both(method: str, *args) -> tuple[object, object]:
        return getattr(real, method)(*args), getattr(ref, method)(*args)

    for step in range(steps):
        s = rng.choice(sims)
        r = rng.random()
        what = f"seed {seed} step {step} {s.name}"
        if r < 0.50:  # the pool emits an event
            k = rng.random()
            if k < 0.6:
                c = rng.randrange(len(chains))
                a = rng.randrange(len(chains[c]))
                b = rng.randint(a + 1, min(len(chains[c]), a + 6))
                hashes = chains[c][a:b]
                parent = chains[c][a - 1] if a else None
                tokens = docs[c][a * BS : b * BS]
                s.emit(lambda seq: BlockStored(seq, hashes, parent, tokens, BS))
                s.cache.update(hashes)
            elif k < 0.95:
                gone = rng.sample(sorted(s.cache), min(len(s.cache), rng.randint(1, 4)))
                if rng.random() < 0.2:
                    gone.append(rng.choice(rng.choice(chains)) if rng.random() < 0.5 else rng.randbytes(16))
                s.emit(lambda seq: BlockRemoved(seq, gone))
                s.cache.difference_update(gone)
            else:
                s.emit(AllCleared)
                s.cache.clear()
            continue
        if r < 0.78:  # deliver some pending events in one batch
            if not s.pending:
                continue
            n = rng.randint(1, len(s.pending))
            batch = KVEventBatch(s.name, s.pending[:n])
            del s.pending[:n]
            s.last_batch = batch
            if rng.random() < 0.3:
                batch = decode_event_batch(encode_event_batch(batch))
            stale_a, stale_b = both("apply", batch)
            if stale_a != stale_b:
                return f"{what}: apply returned {stale_a}, reference {stale_b}"
            if stale_a and rng.random() < 0.6:  # the router fetches a snapshot; pending events overlap it
                both("load_snapshot", s.name, sorted(s.cache), s.next_seq)
            what += " apply"
        elif r < 0.82:  # events lost (dropped batch or overflowed queue)
            if not s.pending:
                continue
            del s.pending[rng.randrange(len(s.pending))]
            continue
        elif r < 0.85:  # the worker restarts: empty cache, seq from 0, undelivered events gone
            s.cache.clear()
            s.next_seq = 0
            s.pending.clear()
            continue
        elif r < 0.88:  # a batch delivered twice
            if s.last_batch is None:
                continue
            stale_a, stale_b = both("apply", s.last_batch)
            if stale_a != stale_b:
                return f"{what}: apply(duplicate) returned {stale_a}, reference {stale_b}"
            what += " duplicate"
        elif r < 0.91:  # an unprompted snapshot, with the pending events overlapping it
            both("load_snapshot", s.name, sorted(s.cache), s.next_seq)
            what += " snapshot"
        elif r < 0.93:  # the worker is removed from the pool (its stream may go on: a gap later)
            both("remove_worker", s.name)
            what += " remove_worker"
        elif r < 0.94:  # a misconfigured worker: the whole batch is refused
            ch = rng.choice(chains)
            bad = KVEventBatch(s.name, [BlockStored(s.next_seq, ch[:1], None, [0] * 8, 8)])
            for idx in (real, ref):
                with pytest.raises(ValueError, match="block_size"):
                    idx.apply(bad)
            what += " bad block_size"
        else:  # raw mutations
            w = rng.choice(names)
            ch = rng.choice(chains)
            op = rng.random()
            if op < 0.4:
                both("store", w, ch[: rng.randint(1, len(ch))])
            elif op < 0.8:
                both("remove", w, rng.sample(ch, rng.randint(1, len(ch))))
            else:
                both("clear", w)
            what += " raw"
        diff = check(what)
        if diff:
            return diff
    return None


@pytest.mark.parametrize("seed", range(30))
def test_differential_against_naive(seed: int) -> None:
    assert differential_mismatch(seed) is None


class IgnoresRemovals(Indexer):
    def remove(self, worker_id, hashes) -> None:
        pass


class IgnoresAllCleared(Indexer):
    def clear(self, worker_id) -> None:
        pass


class CountsAnyHeld(Indexer):
    """find_matches counts every held hash of the query, not only the leading run."""

    def find_matches(self, hashes: Sequence[bytes]) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in hashes:
            for w in self.workers():
                if h in self._workers[w].hashes:
                    out[w] = out.get(w, 0) + 1
        return out


class NoOverlapSkip(Indexer):
    """Treats events already reflected in a snapshot as a replay (stale again)."""

    def load_snapshot(self, worker_id, hashes, next_seq) -> None:
        super().load_snapshot(worker_id, hashes, next_seq)
        self._workers[worker_id].after_snapshot = False


@pytest.mark.parametrize("broken", [IgnoresRemovals, IgnoresAllCleared, CountsAnyHeld, NoOverlapSkip])
def test_harness_catches_planted_bugs(broken: type[Indexer]) -> None:
    found = [differential_mismatch(seed, broken) for seed in range(5)]
    assert all(found), found  # every seed finds it
    assert found[0] is not None and "reference" in found[0]


# ---- golden cases ----------------------------------------------------------------


def chain(n: int, salt: int = 0) -> list[bytes]:
    return hash_full_blocks([salt * 1000 + i for i in range(n * BS)], BS)


def stored(seq: int, hashes: list[bytes], block_size: int = BS) -> BlockStored:
    return BlockStored(seq, hashes, None, [0] * (len(hashes) * block_size), block_size)


def batch(worker: str, *events: KVEvent) -> KVEventBatch:
    return KVEventBatch(worker, list(events))


def test_events_in_order_are_indexed() -> None:
    h = chain(4)
    idx = Indexer(BS)
    assert idx.apply(batch("a", stored(0, h[:3]), stored(1, h[3:]), BlockRemoved(2, [h[3]]))) is False
    assert idx.find_matches(h) == {"a": 3}
    assert idx.expected_seq("a") == 3 and idx.num_blocks("a") == 3 and idx.workers() == ["a"]
    assert idx.expected_seq("nobody") == 0 and not idx.is_stale("nobody") and idx.num_blocks("nobody") == 0


def test_gap_marks_stale_and_drops_entries() -> None:
    h = chain(3)
    idx = Indexer(BS)
    idx.apply(batch("a", stored(0, h)))
    idx.apply(batch("b", stored(0, h[:1])))
    assert idx.apply(batch("a", BlockRemoved(2, [h[2]]))) is True  # seq 1 was lost
    assert idx.is_stale("a") and idx.num_blocks("a") == 0
    reason = idx.stale_reason("a")
    assert reason is not None
    assert (reason.expected_seq, reason.got_seq, reason.reason) == (1, 2, "lost events")
    assert idx.find_matches(h) == {"b": 1}  # other workers untouched
    assert "a" in idx.workers()


def test_a_gap_mid_batch_keeps_nothing_of_the_batch() -> None:
    h = chain(3)
    idx = Indexer(BS)
    assert idx.apply(batch("a", stored(0, h[:1]), stored(1, h[1:2]), stored(3, h[2:]))) is True
    assert idx.num_blocks("a") == 0 and idx.expected_seq("a") == 2
    assert idx.find_matches(h) == {}


def test_batches_after_stale_are_ignored_until_snapshot() -> None:
    h = chain(4)
    idx = Indexer(BS)
    assert idx.apply(batch("a", stored(1, h[:1]))) is True  # never saw seq 0
    assert idx.apply(batch("a", stored(2, h[1:2]))) is True  # contiguous, but stale: ignored
    assert idx.apply(batch("a", stored(0, h[:4]))) is True
    assert idx.num_blocks("a") == 0 and idx.find_matches(h) == {}
    idx.load_snapshot("a", h[:2], next_seq=3)
    assert not idx.is_stale("a") and idx.stale_reason("a") is None and idx.expected_seq("a") == 3
    assert idx.find_matches(h) == {"a": 2}
    assert idx.apply(batch("a", stored(3, h[2:3]))) is False
    assert idx.find_matches(h) == {"a": 3}


def test_overlap_events_after_snapshot_are_skipped_then_smaller_seq_is_a_restart() -> None:
    h = chain(5)
    idx = Indexer(BS)
    idx.load_snapshot("a", h[:3], next_seq=10)  # reflects seq 0..9
    # in flight when the snapshot was taken: 8 and 9 (already reflected), then new ones
    assert idx.apply(batch("a", stored(8, h[:2]), BlockRemoved(9, [h[4]]))) is False
    assert idx.find_matches(h) == {"a": 3} and idx.expected_seq("a") == 10
    assert idx.apply(batch("a", BlockRemoved(9, [h[0]]), stored(10, h[3:4]), stored(11, h[4:]))) is False
    assert idx.find_matches(h) == {"a": 5} and idx.expected_seq("a") == 12
    assert idx.apply(batch("a", stored(9, h[:1]))) is True  # past the snapshot now: a replay or restart
    reason = idx.stale_reason("a")
    assert reason is not None and reason.reason == "restart or replay"


def test_restart_seq_back_to_zero_marks_stale() -> None:
    h = chain(2)
    idx = Indexer(BS)
    idx.apply(batch("a", stored(0, h[:1]), stored(1, h[1:])))
    assert idx.apply(batch("a", stored(0, h[:1]))) is True  # the restarted pool starts at 0 again
    assert idx.is_stale("a") and idx.num_blocks("a") == 0
    r = idx.stale_reason("a")
    assert r is not None
    assert (r.expected_seq, r.got_seq) == (2, 0) and "expected seq 2, got 0" in r.describe()


def test_duplicate_batch_marks_stale() -> None:
    h = chain(1)
    idx = Indexer(BS)
    b = batch("a", stored(0, h))
    idx.apply(b)
    assert idx.apply(b) is True


def test_wrong_block_size_raises_before_applying_anything() -> None:
    h = chain(2)
    idx = Indexer(BS)
    with pytest.raises(ValueError, match=r"block_size 32.*block_size 4"):
        idx.apply(batch("a", stored(0, h[:1]), stored(1, h[1:], block_size=32)))
    assert idx.num_blocks() == 0 and idx.expected_seq("a") == 0
    idx.apply(batch("a", stored(0, h)))
    idx.apply(batch("a", BlockRemoved(5, [h[0]])))  # stale now
    with pytest.raises(ValueError, match="block_size"):  # still refused loudly
        idx.apply(batch("a", stored(6, h, block_size=8)))


def test_remove_worker_frees_the_bit_and_forgets_seq() -> None:
    h = chain(3)
    idx = Indexer(BS)
    idx.apply(batch("a", stored(0, h)))
    idx.apply(batch("b", stored(0, h[:2])))
    bit_a = idx._workers["a"].bit
    idx.remove_worker("a")
    assert idx.workers() == ["b"] and idx.expected_seq("a") == 0 and idx.find_matches(h) == {"b": 2}
    idx.store("c", h[:1])  # takes a's freed bit
    assert idx._workers["c"].bit == bit_a
    assert idx.find_matches(h) == {"b": 2, "c": 1}
    assert idx.num_blocks("c") == 1 and idx.num_blocks() == 3
    assert idx.apply(batch("a", stored(0, h[:1]))) is False  # a fresh start, no stale mark remembered
    assert idx.find_matches(h) == {"a": 1, "b": 2, "c": 1}
    idx.remove_worker("ghost")  # unknown: no-op


def test_clear_keeps_the_worker_and_its_seq() -> None:
    h = chain(2)
    idx = Indexer(BS)
    idx.apply(batch("a", stored(0, h), AllCleared(1), stored(2, h[:1])))
    assert idx.find_matches(h) == {"a": 1} and idx.expected_seq("a") == 3
    idx.clear("a")
    assert idx.workers() == ["a"] and idx.expected_seq("a") == 3 and idx.num_blocks("a") == 0


def test_find_matches_counts_leading_blocks_and_stops_at_a_hole() -> None:
    h = chain(6)
    idx = Indexer(BS)
    idx.store("hole", [h[0], h[2], h[3]])
    idx.store("all", h)
    idx.store("two", h[:2])
    idx.store("tail", h[1:])  # no h0: no match at all
    assert idx.find_matches(h) == {"hole": 1, "two": 2, "all": 6}
    assert idx.find_matches(h[:3]) == {"hole": 1, "two": 2, "all": 3}
    assert idx.find_matches(h[1:]) == {"all": 5, "tail": 5, "two": 1}
    assert idx.find_matches([]) == {} and idx.find_matches(chain(2, salt=7)) == {}
    idx.remove("all", h[4:])
    assert idx.find_matches(h)["all"] == 4
    idx.remove("nobody-yet", h)  # hashes never held: ignored
    assert idx.num_blocks("nobody-yet") == 0


def test_many_workers_beyond_machine_word() -> None:
    h = chain(3)
    idx = Indexer(BS)
    for i in range(100):
        idx.store(f"w{i}", h[: 1 + i % 3])
    got = idx.find_matches(h)
    assert got == {f"w{i}": 1 + i % 3 for i in range(100)}


def test_against_a_real_block_pool_with_overflow_and_snapshot() -> None:
    """The engine's BlockPool emits the events; after recovery the index equals the pool's cache."""
    pool = BlockPool(12, BS, max_pending_events=4)
    idx = Indexer(BS)
    rng = random.Random(1)
    docs = [[rng.randrange(50) for _ in range(rng.randint(BS, 5 * BS))] for _ in range(30)]
    stale = False
    for i, doc in enumerate(docs):
        hashes = hash_full_blocks(doc, BS)
        blocks = pool.get_new_blocks(len(hashes))
        pool.cache_blocks(blocks, hashes, None, doc[: len(hashes) * BS])
        pool.free_blocks(reversed(blocks))
        if i % 3 == 0 or i > 20:  # drained irregularly: the bounded queue overflows in between
            events = pool.take_events()
            stale = idx.apply(decode_event_batch(encode_event_batch(KVEventBatch("p0", events))))
            if stale:
                next_seq, cached = pool.snapshot()
                idx.load_snapshot("p0", cached, next_seq)
            if i > 20:
                assert idx.num_blocks("p0") == pool.num_cached_blocks
    assert pool.num_dropped_events > 0
    _, cached = pool.snapshot()
    assert idx.num_blocks("p0") == len(cached) and all(idx.find_matches([h]) == {"p0": 1} for h in cached)


def test_snapshot_taken_with_events_still_pending() -> None:
    pool = BlockPool(8, BS)
    idx = Indexer(BS)
    doc = list(range(3 * BS))
    hashes = hash_full_blocks(doc, BS)
    blocks = pool.get_new_blocks(3)
    pool.cache_blocks(blocks, hashes, None, doc)
    pool.free_blocks(reversed(blocks))
    next_seq, cached = pool.snapshot()  # the pending BlockStored (seq 0) is already reflected
    idx.load_snapshot("p0", cached, next_seq)
    assert idx.apply(KVEventBatch("p0", pool.take_events())) is False
    assert idx.find_matches(hashes) == {"p0": 3} and idx.expected_seq("p0") == 1


# ---- PredictedBlocks -------------------------------------------------------------


def test_predicted_blocks_are_refcounted() -> None:
    h = chain(4)
    p = PredictedBlocks()
    p.add("r1", "a", h[:3])
    p.add("r2", "a", h[:2])
    p.add("r3", "b", h)
    assert len(p) == 3 and p.find_matches(h) == {"a": 3, "b": 4}
    p.drop("r1")
    assert p.find_matches(h) == {"a": 2, "b": 4}  # r2 still predicts h0, h1 on a
    p.drop("r1")  # idempotent
    p.drop("never")
    assert len(p) == 2
    p.drop("r2")
    assert p.find_matches(h) == {"b": 4}
    with pytest.raises(ValueError, match="r3"):
        p.add("r3", "a", h)


def test_predicted_blocks_drop_worker_and_bit_reuse() -> None:
    h = chain(3)
    p = PredictedBlocks()
    p.add("r1", "a", h)
    p.add("r2", "a", h[:1])
    p.add("r3", "b", h[:2])
    p.drop_worker("a")
    assert len(p) == 1 and p.find_matches(h) == {"b": 2}
    p.drop_worker("a")
    p.drop_worker("unknown")
    p.add("r4", "c", h[:1])  # reuses a's bit without inheriting anything
    assert p.find_matches(h) == {"b": 2, "c": 1}
    p.add("r5", "c", [h[0], h[0], h[1]])  # duplicates in one add count once
    p.drop("r4")
    assert p.find_matches(h) == {"b": 2, "c": 2}
    p.drop("r5")
    p.drop("r3")
    assert len(p) == 0 and p.find_matches(h) == {} and p._masks == {}
