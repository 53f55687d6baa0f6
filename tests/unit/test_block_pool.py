"""BlockPool: ref counts, LRU eviction, hit verification, events, integrity checks."""

from __future__ import annotations

import pytest

from common.block_hash import hash_block_tokens, hash_full_blocks
from common.errors import EngineError
from common.kv_events import (
    KV_EVENTS_VERSION,
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    decode_event_batch,
    encode_event_batch,
    first_gap,
)
from engine.block_pool import (
    BlockLeakError,
    BlockPool,
    BlockPoolCorruptionError,
    BlockPoolUsageError,
    KVBlock,
    NoFreeBlocksError,
)

BS = 2


def cache_one(pool: BlockPool, block: KVBlock, tokens: list[int], parent: bytes | None = None) -> bytes:
    h = hash_block_tokens(parent, tokens)
    pool.cache_block(block, h, parent, tokens)
    return h


def test_fresh_pool() -> None:
    pool = BlockPool(4, BS)
    assert (pool.num_blocks, pool.block_size, pool.num_free_blocks, pool.num_cached_blocks) == (4, BS, 4, 0)
    assert pool.usage() == 0.0
    pool.leak_check()
    assert pool.take_events() == []


def test_get_new_blocks_and_exhaustion() -> None:
    pool = BlockPool(3, BS)
    got = pool.get_new_blocks(2)
    assert [b.ref_cnt for b in got] == [1, 1] and len({b.block_id for b in got}) == 2
    assert pool.num_free_blocks == 1 and pool.usage() == pytest.approx(2 / 3)
    with pytest.raises(NoFreeBlocksError) as err:
        pool.get_new_blocks(2)
    assert isinstance(err.value, EngineError)
    assert pool.num_free_blocks == 1  # nothing taken
    pool.check_integrity()
    with pytest.raises(BlockLeakError):
        pool.leak_check()
    pool.free_blocks(got)
    pool.leak_check()


def test_double_free_and_foreign_block_are_refused() -> None:
    pool = BlockPool(2, BS)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(BlockPoolUsageError, match="double free"):
        pool.free_blocks([b])
    with pytest.raises(BlockPoolUsageError, match="belong"):
        pool.free_blocks([BlockPool(2, BS).get_new_blocks(1)[0]])
    with pytest.raises(BlockPoolUsageError):
        pool.get_new_blocks(-1)
    pool.leak_check()


def test_lru_eviction_order_and_block_removed() -> None:
    pool = BlockPool(3, BS)
    blocks = pool.get_new_blocks(3)
    hashes = [cache_one(pool, b, [i, i]) for i, b in enumerate(blocks)]
    pool.take_events()
    # freed in the order 2, 0, 1: block 2 is least recently freed
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 3
    (first,) = pool.get_new_blocks(1)
    assert first is blocks[2] and first.block_hash is None and first.token_ids is None
    assert pool.get_cached_block(hashes[2], [2, 2]) is None
    assert pool.get_cached_block(hashes[0], [0, 0]) is blocks[0]
    (second,) = pool.get_new_blocks(1)
    assert second is blocks[0]
    events = pool.take_events()
    assert [type(e) for e in events] == [BlockRemoved, BlockRemoved]
    assert isinstance(events[0], BlockRemoved) and isinstance(events[1], BlockRemoved)
    assert events[0].block_hashes == [hashes[2]] and events[1].block_hashes == [hashes[0]]
    pool.free_blocks([first, second])
    pool.leak_check()


def test_uncached_free_blocks_are_reused_in_free_order() -> None:
    pool = BlockPool(3, BS)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([c, a, b])  # a tail-first release
    assert pool.get_new_blocks(3) == [c, a, b]
    assert pool.take_events() == []  # nothing cached, nothing removed


def test_touch_cached_free_block() -> None:
    pool = BlockPool(2, BS)
    (b,) = pool.get_new_blocks(1)
    h = cache_one(pool, b, [5, 6])
    pool.free_blocks([b])
    assert pool.num_free_blocks == 2
    hit = pool.get_cached_block(h, [5, 6])
    assert hit is b
    pool.touch([hit])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.touch([hit])  # a second sharer
    assert b.ref_cnt == 2 and pool.num_free_blocks == 1
    # the touched block is out of the free queue: it cannot be handed out
    (other,) = pool.get_new_blocks(1)
    assert other is not b
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(1)
    pool.free_blocks([b, b, other])
    assert pool.get_cached_block(h, [5, 6]) is b  # still cached while free
    pool.leak_check()


def test_touch_free_uncached_block_is_refused() -> None:
    pool = BlockPool(2, BS)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(BlockPoolUsageError, match="uncached"):
        pool.touch([b])
    pool.leak_check()


def test_hash_collision_returns_none() -> None:
    pool = BlockPool(2, BS)
    (b,) = pool.get_new_blocks(1)
    h = cache_one(pool, b, [1, 2])
    # another token sequence that (pretend) hashes to the same digest
    assert pool.get_cached_block(h, [1, 3]) is None
    assert pool.get_cached_block(h, [1, 2]) is b
    assert pool.get_cached_block(hash_block_tokens(None, [1, 3]), [1, 3]) is None
    pool.free_blocks([b])
    pool.leak_check()


def test_duplicate_hash_keeps_existing_block() -> None:
    pool = BlockPool(3, BS)
    a, b = pool.get_new_blocks(2)
    h = cache_one(pool, a, [7, 7])
    pool.take_events()
    cache_one(pool, b, [7, 7])
    assert b.block_hash is None and pool.get_cached_block(h, [7, 7]) is a
    assert pool.take_events() == []
    pool.free_blocks([a, b])
    pool.leak_check()


def test_cache_blocks_batches_runs_and_splits_at_known_hashes() -> None:
    pool = BlockPool(6, BS)
    tokens = [1, 1, 2, 2, 3, 3, 4, 4]
    hashes = hash_full_blocks(tokens, BS)
    holder = pool.get_new_blocks(1)[0]
    pool.cache_block(holder, hashes[1], hashes[0], tokens[2:4])  # block 1's hash is already held elsewhere
    pool.take_events()
    blocks = pool.get_new_blocks(4)
    pool.cache_blocks(blocks, hashes, None, tokens)
    events = pool.take_events()
    assert events == [
        BlockStored(events[0].seq, [hashes[0]], None, [1, 1], BS),
        BlockStored(events[0].seq + 1, hashes[2:], hashes[1], [3, 3, 4, 4], BS),
    ]
    assert blocks[1].block_hash is None
    pool.free_blocks(blocks + [holder])
    pool.leak_check()


def test_cache_free_block_or_bad_shapes_refused() -> None:
    pool = BlockPool(2, BS)
    (b,) = pool.get_new_blocks(1)
    with pytest.raises(BlockPoolUsageError):
        pool.cache_block(b, hash_block_tokens(None, [1]), None, [1])  # not a full block
    pool.free_blocks([b])
    with pytest.raises(BlockPoolUsageError, match="free"):
        cache_one(pool, b, [1, 2])
    pool.leak_check()


def test_event_sequence_numbers_contiguous_from_zero() -> None:
    pool = BlockPool(2, BS)
    a, b = pool.get_new_blocks(2)
    cache_one(pool, a, [1, 2])
    cache_one(pool, b, [3, 4])
    pool.free_blocks([a, b])
    first = pool.take_events()
    pool.free_blocks(pool.get_new_blocks(2))  # evicts both: one BlockRemoved
    assert pool.reset_prefix_cache()
    second = pool.take_events()
    seqs = [e.seq for e in first + second]
    assert seqs == list(range(len(seqs))) == [0, 1, 2, 3]
    assert [type(e) for e in second] == [BlockRemoved, AllCleared]
    assert first_gap(first + second, 0) is None
    assert first_gap(second, 0) == 0  # the consumer missed the first two events


def test_reset_prefix_cache_refused_while_in_use_then_clears() -> None:
    pool = BlockPool(3, BS)
    a, b = pool.get_new_blocks(2)
    ha = cache_one(pool, a, [1, 2])
    pool.free_blocks([a])
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(ha, [1, 2]) is a and pool.take_events() == []
    pool.free_blocks([b])
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0 and a.block_hash is None
    assert pool.get_cached_block(ha, [1, 2]) is None
    assert pool.take_events() == [AllCleared(1)]
    pool.leak_check()


def test_prefix_caching_disabled() -> None:
    pool = BlockPool(2, BS, enable_prefix_caching=False)
    (b,) = pool.get_new_blocks(1)
    h = cache_one(pool, b, [1, 2])
    assert b.block_hash is None and pool.get_cached_block(h, [1, 2]) is None
    assert pool.take_events() == []
    pool.free_blocks([b])
    pool.leak_check()


def test_events_disabled_and_bounded_queue() -> None:
    quiet = BlockPool(2, BS, enable_events=False)
    (b,) = quiet.get_new_blocks(1)
    cache_one(quiet, b, [1, 2])
    assert quiet.take_events() == []
    small = BlockPool(4, BS, max_pending_events=2)
    blocks = small.get_new_blocks(3)
    for i, blk in enumerate(blocks):
        cache_one(small, blk, [i, i])
    events = small.take_events()
    assert [e.seq for e in events] == [1, 2] and small.num_dropped_events == 1
    assert first_gap(events, 0) == 0
    small.check_integrity()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: setattr(p.block(0), "ref_cnt", -1), "negative"),
        (lambda p: setattr(p.block(1), "ref_cnt", 1), "free queue"),
        (lambda p: p._free.pop(2), "free queue"),
        (lambda p: setattr(p.block(3), "block_hash", b"x" * 16), "both set"),
        (lambda p: p._cached.__setitem__(b"y" * 16, p.block(0)), "cache map"),
    ],
)
def test_check_integrity_catches_corruption(corrupt, message: str) -> None:
    pool = BlockPool(4, BS)
    pool.check_integrity()
    corrupt(pool)
    with pytest.raises(BlockPoolCorruptionError, match=message):
        pool.check_integrity()


def test_event_batch_round_trip_and_version_check() -> None:
    h = hash_block_tokens(None, [1, 2])
    batch = KVEventBatch("prefill-0", [BlockStored(0, [h], None, [1, 2], 2), BlockRemoved(1, [h]), AllCleared(2)])
    data = encode_event_batch(batch)
    assert decode_event_batch(data) == batch
    import msgspec

    with pytest.raises(KVEventDecodeError, match="version"):
        decode_event_batch(msgspec.msgpack.encode((KV_EVENTS_VERSION + 1, batch)))
    with pytest.raises(KVEventDecodeError):
        decode_event_batch(b"\x01garbage")
