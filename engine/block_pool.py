"""The pool of physical KV blocks: reference counts, prefix-cache hashes, LRU eviction.

A block id indexes dimension `block` of the KV tensor (see engine/kv_cache.py). The
pool only does bookkeeping; it never touches tensors.

Life of a block:

    free (uncached) --get_new_blocks--> in use (ref 1) --cache_block--> in use, cached
         ^                                   |                              |  ^ touch
         |                                free_blocks                   free_blocks
         |                                   v                              v  |
         +---- reused first-in-first-out ---- free ---<---evicted (BlockRemoved)--- free, cached

A cached free block stays findable by hash (a prefix hit can `touch` it back into use)
until `get_new_blocks` evicts it, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from common.block_hash import BlockHash
from common.errors import EngineError
from common.kv_events import AllCleared, BlockRemoved, BlockStored, KVEvent


class BlockPoolError(EngineError):
    """Base of the block pool's errors."""


class NoFreeBlocksError(BlockPoolError):
    """Fewer free blocks than asked for; nothing was taken."""


class BlockPoolUsageError(BlockPoolError, ValueError):
    """The caller broke the pool's contract (double free, foreign block, bad count...)."""


class BlockPoolCorruptionError(BlockPoolError):
    """check_integrity found a broken invariant; the message names the first one."""


class BlockLeakError(BlockPoolCorruptionError):
    """leak_check found a block still referenced after every owner was released."""


class KVBlock:
    """One physical block. Mutated only by its BlockPool."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set iff findable in the pool's cache map
        self.token_ids: tuple[int, ...] | None = None  # the block's tokens, to verify hits

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """Ref-counted blocks with a prefix cache and an LRU free queue.

    NOTE invariants (check_integrity verifies each; the first broken one is reported):
    1. blocks[i].block_id == i for every i in [0, num_blocks).
    2. ref_cnt >= 0 for every block.
    3. The free queue holds exactly the blocks with ref_cnt == 0, each once; its order
       is eviction order (front = least recently freed, reused or evicted first).
    4. block_hash is None iff token_ids is None; a block with a hash has block_size tokens.
    5. The cache map and the blocks agree: cached[h] is b  <=>  b.block_hash == h. So at
       most one block per hash, and a block with a hash is findable whether or not free.
    6. Prefix caching disabled => no block has a hash.
    7. Pending events have seq contiguous, ending at next_seq - 1.

    NOTE on safety: a KVBlock handed out is valid for its holder only while the holder
    keeps its reference (between get_new_blocks/touch and free_blocks). A free cached
    block may be evicted and reused by the very next get_new_blocks call.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        enable_events: bool = True,
        max_pending_events: int = 1 << 16,
    ) -> None:
        if num_blocks < 1:
            raise BlockPoolUsageError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or max_pending_events < 1:
            raise BlockPoolUsageError(
                f"block_size and max_pending_events must be >= 1, got {block_size} and {max_pending_events}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_events = enable_events
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        # OrderedDict: O(1) popleft (popitem(last=False)), append, and remove by id.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        # Bounded: if nobody drains, the oldest events go and the consumer sees a seq gap.
        self._events: deque[KVEvent] = deque(maxlen=max_pending_events)
        self._next_seq = 0
        self.num_dropped_events = 0

    # ---- queries ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, including cached ones that can still be hit or evicted."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def block(self, block_id: int) -> KVBlock:
        return self._blocks[block_id]

    def get_cached_block(self, block_hash: BlockHash, token_ids: Sequence[int]) -> KVBlock | None:
        """The block cached under this hash if its tokens equal `token_ids`, else None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None  # a hash collision must never return another sequence's KV
        return block

    # ---- ownership -------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks (ref_cnt 1, no hash) from the front of the free queue.

        Cached free blocks taken this way are evicted (one BlockRemoved for the call).
        Raises NoFreeBlocksError, taking nothing, if fewer than n are free.
        """
        if n < 0:
            raise BlockPoolUsageError(f"cannot take {n} blocks")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        popleft = self._free.popitem
        out: list[KVBlock] = []
        evicted: list[BlockHash] = []
        for _ in range(n):
            _, block = popleft(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                evicted.append(block.block_hash)
                block.block_hash = None
                block.token_ids = None
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self._emit(BlockRemoved(self._next_seq, evicted))
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take one more reference on each block (a prefix hit). A free block must be cached."""
        for block in blocks:
            self._check_own(block)
            if block.ref_cnt == 0 and block.block_hash is None:
                raise BlockPoolUsageError(f"{block} is free and uncached: nothing to hit, take it with get_new_blocks")
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each; a block reaching 0 goes to the END of the free queue.

        Pass blocks in the order they should be evicted: a sequence's tail first.
        """
        free = self._free
        for block in blocks:
            self._check_own(block)
            if block.ref_cnt <= 0:
                raise BlockPoolUsageError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.block_id] = block

    # ---- prefix cache ----------------------------------------------------------

    def cache_block(
        self, block: KVBlock, block_hash: BlockHash, parent: BlockHash | None, token_ids: Sequence[int]
    ) -> None:
        """Make a full, computed block findable under `block_hash` (see cache_blocks)."""
        self.cache_blocks((block,), (block_hash,), parent, token_ids)

    def cache_blocks(
        self,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[BlockHash],
        parent: BlockHash | None,
        token_ids: Sequence[int],
    ) -> None:
        """Cache consecutive blocks of one chain: block i holds token_ids[i*bs:(i+1)*bs] and
        has hash block_hashes[i]; `parent` is the hash of the block before blocks[0].

        A hash another block already holds keeps that block (no event) and leaves this
        one uncached. Each run of newly cached blocks is one BlockStored event.
        """
        bs = self.block_size
        if len(blocks) != len(block_hashes) or len(token_ids) != len(blocks) * bs:
            raise BlockPoolUsageError(
                f"cache_blocks: {len(blocks)} blocks, {len(block_hashes)} hashes and {len(token_ids)} tokens "
                f"do not match block_size {bs}"
            )
        if not self.enable_prefix_caching:
            return
        for block, h in zip(blocks, block_hashes):  # validate everything before changing anything
            self._check_own(block)
            if block.ref_cnt <= 0:
                raise BlockPoolUsageError(f"cannot cache {block}: it is free, its contents may be stale")
            if block.block_hash is not None and block.block_hash != h:
                raise BlockPoolUsageError(f"{block} is already cached under another hash")
        run_hashes: list[BlockHash] = []
        run_parent, run_start = parent, 0
        for i, (block, h) in enumerate(zip(blocks, block_hashes)):
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                block.token_ids = tuple(token_ids[i * bs : (i + 1) * bs])
                self._cached[h] = block
                if not run_hashes:
                    run_start = i
                run_hashes.append(h)
                continue
            self._flush_stored(run_hashes, run_parent, token_ids, run_start)
            run_hashes, run_parent = [], h
        self._flush_stored(run_hashes, run_parent, token_ids, run_start)

    def _flush_stored(
        self, hashes: list[BlockHash], parent: BlockHash | None, token_ids: Sequence[int], start: int
    ) -> None:
        if hashes:
            bs = self.block_size
            tokens = list(token_ids[start * bs : (start + len(hashes)) * bs])
            self._emit(BlockStored(self._next_seq, hashes, parent, tokens, bs))

    def reset_prefix_cache(self) -> bool:
        """Forget every hash (AllCleared). Refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        self._emit(AllCleared(self._next_seq))
        return True

    # ---- events ----------------------------------------------------------------

    def _emit(self, event: KVEvent) -> None:
        if not self.enable_events:
            return
        if len(self._events) == self._events.maxlen:
            self.num_dropped_events += 1
        self._events.append(event)
        self._next_seq += 1

    def take_events(self) -> list[KVEvent]:
        """Drain the pending events, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def next_seq(self) -> int:
        """The seq the next event will carry."""
        return self._next_seq

    def snapshot(self) -> tuple[int, list[BlockHash]]:
        """(next_seq, every cached hash): what a consumer that saw events 0..next_seq-1 would know.

        A consumer that lost events loads this and goes on from the event with seq next_seq.
        """
        return self._next_seq, list(self._cached)

    # ---- checks ----------------------------------------------------------------

    def _check_own(self, block: KVBlock) -> None:
        bid = block.block_id
        if not 0 <= bid < self.num_blocks or self._blocks[bid] is not block:
            raise BlockPoolUsageError(f"{block} does not belong to this pool")

    def check_integrity(self) -> None:
        """Raise BlockPoolCorruptionError naming the first broken invariant (see NOTE)."""

        def fail(msg: str) -> None:
            raise BlockPoolCorruptionError(f"block pool corrupt: {msg}")

        for i, b in enumerate(self._blocks):
            if b.block_id != i:
                fail(f"blocks[{i}] has block_id {b.block_id}")
            if b.ref_cnt < 0:
                fail(f"{b} has a negative ref count")
            if (b.block_hash is None) != (b.token_ids is None):
                fail(f"{b}: block_hash and token_ids must be both set or both None")
            if b.token_ids is not None and len(b.token_ids) != self.block_size:
                fail(f"{b} caches {len(b.token_ids)} tokens, block_size is {self.block_size}")
            if b.block_hash is not None and self._cached.get(b.block_hash) is not b:
                fail(f"{b} has a hash but is not the block cached under it")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                fail(f"{b} is {'not ' if b.ref_cnt == 0 else ''}in the free queue")
        for bid, b in self._free.items():
            if self._blocks[bid] is not b:
                fail(f"free queue entry {bid} is not the pool's block {bid}")
        for h, b in self._cached.items():
            if b.block_hash != h:
                fail(f"cache map entry {h.hex()[:8]} points to {b}")
        if not self.enable_prefix_caching and self._cached:
            fail("prefix caching is disabled but blocks are cached")
        for i, event in enumerate(self._events):
            if event.seq != self._next_seq - len(self._events) + i:
                fail(f"pending event {i} has seq {event.seq}, not contiguous up to {self._next_seq - 1}")

    def leak_check(self) -> None:
        """check_integrity, then every block must be free (ref_cnt 0): call after a scenario."""
        self.check_integrity()
        held = [b for b in self._blocks if b.ref_cnt]
        if held:
            raise BlockLeakError(f"{len(held)} KV blocks still referenced, first: {held[:4]}")
