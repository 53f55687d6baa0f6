"""Chained hashes of full KV blocks, identical in every process (engine and router).

A block of `block_size` token ids is named by a 16-byte digest of its parent's digest
and its own tokens, so equal digests mean "equal tokens from position 0 up to the end
of this block" (up to a 2**-128 collision, which the block pool still guards against
by comparing token ids on every hit).

Wire format of one digest, version 1 (changing any byte here changes every hash, so
the golden-digest test must be updated on purpose and routers and workers upgraded
together):

    blake2b(digest_size=16) over
        DOMAIN                       b"tandem.kv-block.v1\\x00"
        b"\\x00"                       when the block has no parent (first block), or
        b"\\x01" + parent (16 bytes)   otherwise
        token ids                    each as a little-endian uint32

Python's `hash()` is never used: it is salted per process for str/bytes and may
change between versions.

This module imports neither torch nor the engine (the router uses it).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

BlockHash = bytes  # 16-byte digest
BLOCK_HASH_BYTES = 16
HASH_DOMAIN = b"tandem.kv-block.v1\x00"

_BASE = blake2b(HASH_DOMAIN, digest_size=BLOCK_HASH_BYTES)
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"
_NATIVE_U32_LE = array("I").itemsize == 4 and sys.byteorder == "little"


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as consecutive little-endian uint32; ValueError if one is out of range."""
    try:
        if _NATIVE_U32_LE:
            return array("I", token_ids).tobytes()
        return struct.pack(f"<{len(token_ids)}I", *token_ids)  # pragma: no cover - big-endian hosts
    except (OverflowError, TypeError, struct.error) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def _check_parent(parent: BlockHash | None) -> None:
    if parent is not None and len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"a parent block hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent)}")


def _digest(parent: BlockHash | None, packed: bytes | memoryview) -> BlockHash:
    h = _BASE.copy()
    if parent is None:
        h.update(_NO_PARENT)
    else:
        h.update(_HAS_PARENT)
        h.update(parent)
    h.update(packed)
    return h.digest()


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Digest of one block: its parent's digest (None for the first block) and its tokens."""
    _check_parent(parent)
    return _digest(parent, _pack_tokens(token_ids))


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockHash | None = None,
    start_block: int = 0,
    prior: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Chained digests of the FULL blocks of `token_ids`, from block `start_block` on.

    `token_ids` always starts at position 0 of the sequence; a trailing partial block is
    ignored. Element i of the result is the digest of block `start_block + i`:

    * `hash_full_blocks(tokens, bs)` hashes every full block;
    * `hash_full_blocks(tokens, bs, parent=p, start_block=k)` hashes blocks k, k+1, ...
      where `p` is the digest of block k-1 (None only if k == 0 or the chain is rooted
      there on purpose);
    * incremental form: `hash_full_blocks(tokens, bs, prior=known)` treats `known` as
      the digests of the first len(known) blocks (from `start_block`), copies them into
      the result, and hashes only the blocks after them, chained to `known[-1]` (the
      `parent` argument is then ignored). Cost is proportional to the new blocks only
      (plus one list copy); `extend_block_hashes` avoids even that copy.
    """
    out = list(prior)
    extend_block_hashes(out, token_ids, block_size, parent=parent, start_block=start_block)
    return out


def extend_block_hashes(
    hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockHash | None = None,
    start_block: int = 0,
    max_blocks: int | None = None,
) -> int:
    """Append, in place, the digests of the full blocks after those already in `hashes`.

    Same meaning as `hash_full_blocks(..., prior=hashes)`, without copying the list.
    `max_blocks` caps how many blocks (counted from `start_block`) `hashes` may end up
    holding, e.g. only the blocks whose KV is already computed. Returns the number added.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start_block < 0:
        raise ValueError(f"start_block must be >= 0, got {start_block}")
    first = start_block + len(hashes)
    end = len(token_ids) // block_size
    if max_blocks is not None:
        end = min(end, start_block + max_blocks)
    if first >= end:
        return 0
    if hashes:
        parent = hashes[-1]
    _check_parent(parent)
    data = memoryview(_pack_tokens(token_ids[first * block_size : end * block_size]))
    step = 4 * block_size
    append = hashes.append
    for off in range(0, len(data), step):
        parent = _digest(parent, data[off : off + step])
        append(parent)
    return end - first
