"""Per-request block tables on top of the BlockPool, with prefix caching.

The scheduler's whole view of KV memory. A request's block table (token t lives
in block table[t // block_size], slot t % block_size) during one step, with
block_size 4, a prefix hit of 2 blocks, 11 tokens computed and 6 new this step:

             |<- cached prefix (shared)->| computed|<-- new this step -->|
    position |  0  1  2  3 |  4  5  6  7 |  8  9 10 11 | 12 13 14 15 | 16  .  .  . |
    table    | blk 7       | blk 2       | blk 4       | blk 11      | blk 5       |

    cached prefix   blocks from lookup_prefix, touched by allocate (ref >= 1, maybe
                    shared with other requests; never written again)
    computed        KV written by earlier steps; commit() cached each block once full
    new this step   allocate(id, tokens, 11, 6) grew the table to ceil(17 / 4) = 5 blocks

Per step the scheduler calls, for each scheduled request:

    1. first time only: hit = lookup_prefix(tokens)         (pure; may be empty)
    2. allocate(id, tokens, num_computed, num_new, hit)     (None: nothing changed,
                                                             preempt someone or wait)
    3. after the forward pass: commit(id, tokens, num_computed + num_new)
                                                            (caches newly full blocks)
    4. on finish, abort or preemption: free(id)             (tail evicted first)

Preemption is free(id) followed later by a fresh lookup_prefix + allocate from 0: the
blocks the request had committed are usually still cached and come back as a hit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.block_hash import BlockHash, extend_block_hashes, hash_block_tokens
from common.kv_events import KVEvent
from engine.block_pool import (
    BlockLeakError,
    BlockPool,
    BlockPoolCorruptionError,
    BlockPoolUsageError,
    KVBlock,
)


class StalePrefixHitError(BlockPoolUsageError):
    """A PrefixHit's blocks were evicted between lookup_prefix and allocate."""


@dataclass(frozen=True)
class PrefixHit:
    """Leading full blocks of a prompt already in the cache (from lookup_prefix).

    Valid only until the next pool operation that may evict: pass it to allocate for
    the same request in the same scheduling pass.
    """

    blocks: tuple[KVBlock, ...] = ()
    num_tokens: int = 0
    block_hashes: tuple[BlockHash, ...] = ()  # what each block held at lookup, to detect staleness

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


EMPTY_HIT = PrefixHit()


@dataclass
class _RequestBlocks:
    blocks: list[KVBlock]
    block_ids: list[int]
    block_hashes: list[BlockHash] = field(default_factory=list)  # of committed full blocks
    num_committed_blocks: int = 0  # leading blocks already hit or offered to the cache


class KVCacheManager:
    """Block tables of live requests. Ref counts in the pool == number of tables holding a block."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._requests: dict[str, _RequestBlocks] = {}

    # ---- queries ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def can_fit(self, num_tokens: int) -> bool:
        """Could a request of num_tokens tokens fit in an otherwise empty cache."""
        return -(-num_tokens // self.block_size) <= self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] for an unknown request)."""
        state = self._requests.get(request_id)
        return list(state.block_ids) if state is not None else []

    def num_blocks_of(self, request_id: str) -> int:
        state = self._requests.get(request_id)
        return len(state.blocks) if state is not None else 0

    def lookup_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Longest run of leading full blocks in the cache, leaving >= 1 token to compute.

        No side effects. num_tokens <= len(token_ids) - 1, a multiple of block_size.
        """
        if not self.enable_prefix_caching:
            return EMPTY_HIT
        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        blocks: list[KVBlock] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            chunk = token_ids[i * bs : (i + 1) * bs]
            parent = hash_block_tokens(parent, chunk)
            block = self.pool.get_cached_block(parent, chunk)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        if not blocks:
            return EMPTY_HIT
        return PrefixHit(tuple(blocks), len(blocks) * bs, tuple(hashes))

    # ---- ownership -------------------------------------------------------------

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        prefix_hit: PrefixHit | None = None,
    ) -> list[int] | None:
        """Grow the request's table to ceil((computed + new) / block_size) blocks.

        Returns the whole table, or None, changing nothing, if the blocks are not free.
        A prefix hit is accepted on the first call only; its blocks become the head of
        the table and num_computed_tokens must equal hit.num_tokens.
        """
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise BlockPoolUsageError(f"token counts must be >= 0, got {num_computed_tokens} and {num_new_tokens}")
        hit = prefix_hit if prefix_hit is not None else EMPTY_HIT
        need = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        state = self._requests.get(request_id)
        if state is not None:
            if hit.blocks:
                raise BlockPoolUsageError(
                    f"request {request_id!r} already has blocks; a prefix hit is only for its first allocate"
                )
            missing = need - len(state.blocks)
            if missing <= 0:
                return list(state.block_ids)
            if missing > self.pool.num_free_blocks:
                return None
            new = self.pool.get_new_blocks(missing)
            state.blocks.extend(new)
            state.block_ids.extend(b.block_id for b in new)
            return list(state.block_ids)

        self._check_hit(hit, num_computed_tokens)
        missing = max(0, need - len(hit.blocks))
        # touching a hit block that is free takes it off the free queue: it no longer counts
        hit_free = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        if missing > self.pool.num_free_blocks - hit_free:
            return None
        self.pool.touch(hit.blocks)  # first, so get_new_blocks cannot evict them
        blocks = list(hit.blocks) + self.pool.get_new_blocks(missing)
        self._requests[request_id] = _RequestBlocks(
            blocks=blocks,
            block_ids=[b.block_id for b in blocks],
            block_hashes=[b.block_hash for b in hit.blocks],  # type: ignore[misc]  # hit blocks are cached
            num_committed_blocks=len(hit.blocks),
        )
        return [b.block_id for b in blocks]

    def _check_hit(self, hit: PrefixHit, num_computed_tokens: int) -> None:
        if not hit.blocks:
            return
        if hit.num_tokens != len(hit.blocks) * self.block_size or num_computed_tokens != hit.num_tokens:
            raise BlockPoolUsageError(
                f"prefix hit of {len(hit.blocks)} blocks / {hit.num_tokens} tokens does not match "
                f"block_size {self.block_size} and num_computed_tokens {num_computed_tokens}"
            )
        for i, block in enumerate(hit.blocks):
            expected = hit.block_hashes[i] if i < len(hit.block_hashes) else block.block_hash
            if block.block_hash is None or block.block_hash != expected:
                raise StalePrefixHitError(
                    f"prefix hit block {i} ({block}) was evicted after lookup_prefix; look up again"
                )

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """KV of tokens [0, num_computed_tokens) is written: cache every newly full block."""
        state = self._requests.get(request_id)
        if state is None:
            raise BlockPoolUsageError(f"commit for request {request_id!r}, which holds no blocks")
        if num_computed_tokens > len(state.blocks) * self.block_size or num_computed_tokens > len(token_ids):
            raise BlockPoolUsageError(
                f"commit of {num_computed_tokens} tokens for {request_id!r}: it has {len(token_ids)} tokens "
                f"and {len(state.blocks)} blocks of {self.block_size}"
            )
        full = num_computed_tokens // self.block_size
        start = state.num_committed_blocks
        if full <= start:
            return
        state.num_committed_blocks = full
        if not self.enable_prefix_caching:
            return
        hashes = state.block_hashes
        extend_block_hashes(hashes, token_ids, self.block_size, max_blocks=full)
        bs = self.block_size
        self.pool.cache_blocks(
            state.blocks[start:full],
            hashes[start:full],
            hashes[start - 1] if start else None,
            token_ids[start * bs : full * bs],
        )

    def trim(self, request_id: str, num_tokens: int) -> int:
        """Shrink the table to the blocks that tokens [0, num_tokens) need; returns how many were freed.

        Speculative decoding allocates slots for every proposed token; the blocks that only rejected
        proposals reached go back to the pool (never cached: a block is cached only once committed full).
        """
        state = self._requests.get(request_id)
        if state is None:
            return 0
        keep = max(-(-num_tokens // self.block_size), state.num_committed_blocks)
        tail = state.blocks[keep:]
        if tail:
            del state.blocks[keep:]
            del state.block_ids[keep:]
            self.pool.free_blocks(reversed(tail))
        return len(tail)

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first (so its tail is evicted first). Unknown id: no-op."""
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free_blocks(reversed(state.blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def kv_snapshot(self) -> tuple[int, list[bytes]]:
        """(next event seq, every cached block hash); see BlockPool.snapshot."""
        return self.pool.snapshot()

    # ---- checks ----------------------------------------------------------------

    def check_integrity(self) -> None:
        """Pool invariants, and every block's ref count == number of tables holding it."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        for rid, state in self._requests.items():
            if state.block_ids != [b.block_id for b in state.blocks]:
                raise BlockPoolCorruptionError(f"request {rid!r}: block id list out of sync with its blocks")
            if len(set(state.block_ids)) != len(state.block_ids):
                raise BlockPoolCorruptionError(f"request {rid!r} holds a block twice: {state.block_ids}")
            if state.num_committed_blocks > len(state.blocks) or len(state.block_hashes) > state.num_committed_blocks:
                raise BlockPoolCorruptionError(f"request {rid!r}: committed/hash progress beyond its table")
            for i, h in enumerate(state.block_hashes):
                bh = state.blocks[i].block_hash
                if bh is not None and bh != h:
                    raise BlockPoolCorruptionError(f"request {rid!r} block {i}: cached under another hash")
            holders.update(state.block_ids)
        for block_id in range(self.pool.num_blocks):
            block = self.pool.block(block_id)
            if block.ref_cnt != holders[block_id]:
                raise BlockPoolCorruptionError(
                    f"{block}: ref count {block.ref_cnt} but {holders[block_id]} request tables hold it"
                )

    def leak_check(self) -> None:
        """No request holds blocks and the pool is whole: call after every scenario."""
        if self._requests:
            raise BlockLeakError(f"{len(self._requests)} requests still hold blocks: {sorted(self._requests)[:4]}")
        self.pool.leak_check()
