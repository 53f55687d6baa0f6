"""`plan_transfer`: which bytes go where, as data, computed once and never by a transport.

A plan is a tuple of byte regions, each (src_offset, dst_offset, nbytes) relative to
the start of each side's registered tensor. Executors (transports) copy regions;
they never do layout arithmetic.

Runs are merged: where consecutive pairs of the block lists are consecutive on BOTH
sides, their bytes are contiguous on both sides inside every (layer, K|V) plane, so
one region covers the whole run:

    src_blocks = [7, 8, 9, 2]      runs: (src 7, dst 0, 3 blocks), (src 2, dst 5, 1 block)
    dst_blocks = [0, 1, 2, 5]

    for each layer l, for kv in (K, V), for each run:
        Region(src.offset(l, kv, s0), dst.offset(l, kv, d0), n * block_bytes)

So a plan has num_layers * 2 * num_runs regions. Regions are not merged across
planes (that only pays when a run spans every block of both caches).

In this issue both sides must share the topology (layer range, head range, block
size, order); anything else raises `UnsupportedConversionError` until issue 4 adds
conversions.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.errors import InvalidPlanError, UnsupportedConversionError
from kv_transfer.layout import KVLayout, check_compatible

# fields that must be equal for a plain byte copy (beyond `check_compatible`'s)
TOPOLOGY_FIELDS = ("layer_start", "num_layers", "head_start", "num_kv_heads", "block_size", "order")


@dataclass(frozen=True)
class Region:
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class TransferPlan:
    """Byte regions to copy, plus totals. An empty plan (0 regions) is valid."""

    regions: tuple[Region, ...]
    total_bytes: int
    num_blocks: int

    @classmethod
    def empty(cls) -> TransferPlan:
        return cls(regions=(), total_bytes=0, num_blocks=0)

    def check_bounds(self, src_bytes: int, dst_bytes: int) -> None:
        """Raise InvalidPlanError unless every region lies inside both registered tensors.

        Transports call this before submitting, so a plan built for other layouts fails
        with a clear error instead of a backend error (or a silent out-of-range copy).
        """
        for r in self.regions:
            if r.nbytes <= 0 or r.src_offset < 0 or r.dst_offset < 0:
                raise InvalidPlanError(f"malformed region {r}")
            if r.src_offset + r.nbytes > src_bytes or r.dst_offset + r.nbytes > dst_bytes:
                raise InvalidPlanError(
                    f"region {r} falls outside the registered memory (src {src_bytes} bytes, dst {dst_bytes} bytes); "
                    "was the plan built for these peers' layouts?"
                )


def _check_block_ids(ids: Sequence[int], layout: KVLayout, side: str) -> list[int]:
    out = []
    for b in ids:
        if isinstance(b, bool):
            raise InvalidPlanError(f"{side} block id {b!r} is not an integer")
        try:
            b = operator.index(b)
        except TypeError:
            raise InvalidPlanError(f"{side} block id {b!r} is not an integer") from None
        if not 0 <= b < layout.num_blocks:
            raise InvalidPlanError(f"{side} block id {b} is out of range [0, {layout.num_blocks})")
        out.append(b)
    return out


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of maximal runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def plan_transfer(src: KVLayout, dst: KVLayout, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> TransferPlan:
    """Plan copying src block src_blocks[i] into dst block dst_blocks[i], for every i.

    Pure. Raises IncompatiblePeerError (caches can never match), UnsupportedConversionError
    (same model, different topology) or InvalidPlanError (bad block lists). Repeated
    source ids are allowed (one block fanned out); repeated destination ids are not
    (two writers to one block).
    """
    check_compatible(dst, src)
    shape_diff = [
        f"{f}: src {getattr(src, f)!r} vs dst {getattr(dst, f)!r}"
        for f in TOPOLOGY_FIELDS
        if getattr(src, f) != getattr(dst, f)
    ]
    if shape_diff:
        raise UnsupportedConversionError(
            "source and destination KV layouts differ (" + "; ".join(shape_diff) + "): "
            "this needs layout conversion (issue 4)"
        )
    if len(src_blocks) != len(dst_blocks):
        raise InvalidPlanError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    s_ids = _check_block_ids(src_blocks, src, "source")
    d_ids = _check_block_ids(dst_blocks, dst, "destination")
    if len(set(d_ids)) != len(d_ids):
        dup = sorted(b for b, c in Counter(d_ids).items() if c > 1)
        raise InvalidPlanError(f"destination block ids repeat: {dup}; each destination block can be written once")

    runs = _runs(s_ids, d_ids)
    bb = src.block_bytes
    regions = tuple(
        Region(src.offset(layer, kv, s0), dst.offset(layer, kv, d0), n * bb)
        for layer in range(src.num_layers)
        for kv in (0, 1)
        for s0, d0, n in runs
    )
    return TransferPlan(regions=regions, total_bytes=len(s_ids) * bb * 2 * src.num_layers, num_blocks=len(s_ids))
