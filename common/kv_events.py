"""KV cache events: what a worker's block pool tells the router's prefix index.

A pool emits, in order:

    BlockStored   blocks became findable by hash (a chain: block_hashes[0]'s parent is
                  parent_block_hash, block_hashes[i]'s parent is block_hashes[i-1];
                  token_ids holds len(block_hashes) * block_size ids, block by block)
    BlockRemoved  blocks were evicted and are no longer findable
    AllCleared    every hash of this pool was dropped (prefix cache reset)

Sequence numbers: every event carries `seq`, strictly increasing by 1 per event and
per pool, starting at 0. A consumer remembers the next seq it expects. A larger seq
means events were lost (a dropped batch, a bounded queue that overflowed); a smaller
one, a replay or a restarted worker. Either way the consumer drops what it knows
about that worker and loads a `KVSnapshot` (every hash the pool caches, and the seq
to go on from): later events alone cannot rebuild it, because a hash already cached
is never announced again. `first_gap` finds the break.

Wire format: msgpack of the envelope `[KV_EVENTS_VERSION, KVEventBatch]`; the version
is checked before the batch is decoded, so a version bump is reported clearly.

    version history
    1  initial: BlockStored / BlockRemoved / AllCleared, array-like, tagged by class name

This module imports neither torch nor the engine (the router uses it).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

KV_EVENTS_VERSION = 1


class BlockStored(msgspec.Struct, tag=True, array_like=True, frozen=True):
    seq: int
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag=True, array_like=True, frozen=True):
    seq: int
    block_hashes: list[bytes]


class AllCleared(msgspec.Struct, tag=True, array_like=True, frozen=True):
    seq: int


KVEvent = BlockStored | BlockRemoved | AllCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    worker_id: str
    events: list[KVEvent]


class KVSnapshot(msgspec.Struct, frozen=True):
    """Everything one pool caches, for a consumer that lost events: load `block_hashes`,
    then apply events from seq `next_seq` on (earlier ones are already reflected)."""

    worker_id: str
    epoch: str  # the publisher instance (see worker_core/kv_publisher.py)
    block_size: int
    next_seq: int
    block_hashes: list[bytes]


class KVEventDecodeError(ValueError):
    """Bytes that are not a KV event batch of this version."""


_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_BATCH_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode_event_batch(batch: KVEventBatch) -> bytes:
    """msgpack bytes of `[KV_EVENTS_VERSION, batch]`."""
    return _ENCODER.encode((KV_EVENTS_VERSION, batch))


def decode_event_batch(data: bytes) -> KVEventBatch:
    """Inverse of `encode_event_batch`; raises KVEventDecodeError on any mismatch."""
    try:
        version, raw = _ENVELOPE_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise KVEventDecodeError(f"not a KV event envelope: {exc}") from None
    if version != KV_EVENTS_VERSION:
        raise KVEventDecodeError(
            f"KV event batch has wire version {version}, this process speaks {KV_EVENTS_VERSION}; "
            "upgrade the router and workers together"
        )
    try:
        return _BATCH_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise KVEventDecodeError(f"malformed KV event batch: {exc}") from None


def first_gap(events: Sequence[KVEvent], expected_seq: int) -> int | None:
    """Index of the first event whose seq is not the one expected, or None if contiguous.

    `expected_seq` is the seq the consumer expects next (0 for a fresh pool). An event
    with a larger seq means lost events; a smaller one means a replay or a restarted pool.
    """
    for i, event in enumerate(events):
        if event.seq != expected_seq + i:
            return i
    return None
