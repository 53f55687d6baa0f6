"""`TransferPlan`: which bytes go where, as data, computed once and never by a transport.

A plan is a tuple of byte regions, each (src_offset, dst_offset, nbytes) relative to
the start of each side's registered tensor. Executors (transports) copy regions;
they never do layout arithmetic. A `TransferPlan` keeps its regions as one (n, 3)
int64 array [src_offset, dst_offset, nbytes] (`as_array()`): planners build it
vectorised and NIXL posts it as is; the `regions` tuple of `Region`s is built on
first use.

`plan_transfer(src, dst, src_blocks, dst_blocks)` is the plan of a plain block copy
between two layouts of one topology (layer range, head range, block size, order).
Runs are merged: where consecutive pairs of the block lists are consecutive on BOTH
sides, their bytes are contiguous on both sides inside every (layer, K|V) plane, so
one region covers the whole run:

    src_blocks = [7, 8, 9, 2]      runs: (src 7, dst 0, 3 blocks), (src 2, dst 5, 1 block)
    dst_blocks = [0, 1, 2, 5]

    for each layer l, for kv in (K, V), for each run:
        Region(src.offset(l, kv, s0), dst.offset(l, kv, d0), n * block_bytes)

So a plan has num_layers * 2 * num_runs regions. Regions are not merged across
planes (that only pays when a run spans every block of both caches). Any other
topology raises `UnsupportedConversionError`.

The served workers never call `plan_transfer`: a decode rank plans every pull, the
identical topology included, with `plan_conversion` (planner.py) and
`ConversionPlan.bind` (conversion_plan.py), whose plans are the same `TransferPlan`s
(some destination offsets addressing a staging buffer). `plan_transfer` is the
reference those plans are checked against: for an identical topology `bind` must give
exactly its regions, in one round without a scatter
(tests/unit/test_kv_convert.py::test_identical_topology_binds_to_exactly_plan_transfer).
It is also the plan the transport conformance suite
(tests/component/test_transport_conformance.py) and benchmarks/kv_transfer_bandwidth.py
submit, since they test transports, not conversions.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kv_transfer.errors import InvalidPlanError, UnsupportedConversionError
from kv_transfer.layout import KVLayout, check_compatible

# fields that must be equal for a plain byte copy (beyond `check_compatible`'s)
TOPOLOGY_FIELDS = ("layer_start", "num_layers", "head_start", "num_kv_heads", "block_size", "order")


@dataclass(frozen=True)
class Region:
    src_offset: int
    dst_offset: int
    nbytes: int


class TransferPlan:
    """Byte regions to copy, plus totals. An empty plan (0 regions) is valid. Immutable, hashable.

    `TransferPlan(regions, total_bytes, num_blocks)` from `Region`s, or
    `TransferPlan.from_array(array, total_bytes, num_blocks)` from an (n, 3) int64 array of
    [src_offset, dst_offset, nbytes] rows (what vectorised planners produce). Two plans are
    equal when their regions (in order) and totals are.
    """

    __slots__ = ("_array", "_regions", "total_bytes", "num_blocks")
    _array: np.ndarray
    _regions: tuple[Region, ...] | None
    total_bytes: int
    num_blocks: int

    def __init__(self, regions: Sequence[Region] = (), total_bytes: int = 0, num_blocks: int = 0) -> None:
        regions = tuple(regions)
        arr = np.array([(r.src_offset, r.dst_offset, r.nbytes) for r in regions], dtype=np.int64).reshape(-1, 3)
        self._init(arr, regions, total_bytes, num_blocks)

    @classmethod
    def from_array(cls, array: np.ndarray, total_bytes: int, num_blocks: int) -> TransferPlan:
        arr = np.array(array, dtype=np.int64).reshape(-1, 3)  # a private copy: the plan is immutable
        plan = cls.__new__(cls)
        plan._init(arr, None, total_bytes, num_blocks)
        return plan

    @classmethod
    def empty(cls) -> TransferPlan:
        return cls(regions=(), total_bytes=0, num_blocks=0)

    def _init(self, arr: np.ndarray, regions: tuple[Region, ...] | None, total_bytes: int, num_blocks: int) -> None:
        arr.flags.writeable = False
        object.__setattr__(self, "_array", arr)
        object.__setattr__(self, "_regions", regions)
        object.__setattr__(self, "total_bytes", int(total_bytes))
        object.__setattr__(self, "num_blocks", int(num_blocks))

    def __setattr__(self, name, value):
        raise AttributeError(f"TransferPlan is immutable (cannot set {name!r})")

    def __delattr__(self, name):
        raise AttributeError(f"TransferPlan is immutable (cannot delete {name!r})")

    @property
    def regions(self) -> tuple[Region, ...]:
        regions = self._regions
        if regions is None:
            regions = tuple(Region(*row) for row in self._array.tolist())
            object.__setattr__(self, "_regions", regions)
        return regions

    def as_array(self) -> np.ndarray:
        """The regions as a read-only (n, 3) int64 array: src_offset, dst_offset, nbytes."""
        return self._array

    def __len__(self) -> int:
        return len(self._array)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransferPlan):
            return NotImplemented
        return (
            self.total_bytes == other.total_bytes
            and self.num_blocks == other.num_blocks
            and np.array_equal(self._array, other._array)
        )

    def __hash__(self) -> int:
        return hash((self.total_bytes, self.num_blocks, self._array.tobytes()))

    def __repr__(self) -> str:
        n = len(self._array)
        return f"TransferPlan(<{n} regions>, total_bytes={self.total_bytes}, num_blocks={self.num_blocks})"

    def check_bounds(self, src_bytes: int, dst_bytes: int, dst_staging_bytes: int = 0) -> None:
        """Raise InvalidPlanError unless every region lies inside both registered tensors.

        Transports call this before submitting, so a plan built for other layouts fails
        with a clear error instead of a backend error (or a silent out-of-range copy).
        `dst_staging_bytes` > 0 (only for the local side of a READ, see conversion_plan.py): a
        destination offset >= dst_bytes addresses the staging buffer registered after the
        cache, at offset - dst_bytes; a region lies wholly in one of the two.
        """
        a = self._array
        if not len(a):
            return
        s, d, n = a[:, 0], a[:, 1], a[:, 2]
        malformed = (n <= 0) | (s < 0) | (d < 0)
        if malformed.any():
            raise InvalidPlanError(f"malformed region {Region(*a[int(np.argmax(malformed))].tolist())}")
        in_cache = d + n <= dst_bytes
        in_staging = (d >= dst_bytes) & (d + n <= dst_bytes + dst_staging_bytes)
        bad = (s + n > src_bytes) | ~(in_cache | in_staging)
        if bad.any():
            i = int(np.argmax(bad))
            r = Region(*a[i].tolist())
            if dst_staging_bytes and r.dst_offset < dst_bytes < r.dst_offset + r.nbytes:
                raise InvalidPlanError(f"region {r} crosses the end of the KV cache ({dst_bytes} bytes) into staging")
            staging = f" + {dst_staging_bytes} staging bytes" if dst_staging_bytes else ""
            raise InvalidPlanError(
                f"region {r} falls outside the registered memory (src {src_bytes} bytes, dst {dst_bytes} bytes"
                f"{staging}); was the plan built for these peers' layouts?"
            )


def check_block_ids(ids, num_blocks: int, side: str) -> np.ndarray:
    """`ids` (list, array or tensor) as int64, each a block id in [0, num_blocks); InvalidPlanError otherwise."""
    arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    if arr.ndim != 1:
        raise InvalidPlanError(f"{side} block ids must be a flat list, got shape {arr.shape}")
    if not len(arr):
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidPlanError(f"{side} block ids must be integers: {arr[0]!r} ({arr.dtype}) is not an integer")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= num_blocks)
    if bad.any():
        raise InvalidPlanError(f"{side} block id {int(arr[np.argmax(bad)])} is out of range [0, {num_blocks})")
    return arr


def as_count(x, name: str) -> int:
    """A non-negative Python int from an int-like `x` (bools and floats refused)."""
    if isinstance(x, bool):
        raise InvalidPlanError(f"{name} {x!r} is not an integer")
    try:
        x = operator.index(x)
    except TypeError:
        raise InvalidPlanError(f"{name} {x!r} is not an integer") from None
    if x < 0:
        raise InvalidPlanError(f"{name} must be >= 0, got {x}")
    return x


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
            "this needs layout conversion: use kv_transfer.plan_conversion"
        )
    if len(src_blocks) != len(dst_blocks):
        raise InvalidPlanError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    s_ids = check_block_ids(src_blocks, src.num_blocks, "source").tolist()
    d_ids = check_block_ids(dst_blocks, dst.num_blocks, "destination").tolist()
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
