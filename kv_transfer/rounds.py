"""What `ConversionPlan.bind` returns for one request: `Round`s of READ plans and `RowScatter`s.

A request larger than the decode rank's staging buffer is split in rounds:

    for rnd in rounds:
        submit every (src_rank, plan) of rnd.reads (READ), wait until all are DONE
        apply_scatter(rnd.scatter, staging, kv_cache)      if rnd.scatter is not None
    (the next round reuses staging only after the scatter ran)

Rows: the cache and staging are viewed as [-1, head_dim] of the cache dtype. A row of a
layout is numbered like its tensor (engine/kv_cache.py):

    NHD: (((layer * 2 + kv) * num_blocks + block) * block_size + slot) * heads + head
    HND: (((layer * 2 + kv) * num_blocks + block) * heads + head) * block_size + slot

A staged piece moves the same tokens in every (layer, K|V) plane, so its scatter is kept
factored (`ScatterSegment`: per-plane bases + per-token offsets); the CUDA kernel
(scatter_cuda.py) computes the rows itself, and `RowScatter.src_rows` / `dst_rows` are
materialised only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kv_transfer.errors import InvalidPlanError
from kv_transfer.plan import TransferPlan


class ScatterSegment(NamedTuple):
    """Rows i in [lo, hi) of the outer sum over (p, k), p = i // K, k = i % K (K = len(src_tok)):

        staging row src_plane[p] + src_tok[k]  ->  cache row dst_plane[p] + dst_tok[k]

    A staged piece moves the same tokens in every (layer, K|V) plane, so its rows factor
    into per-plane bases [P] and per-token offsets [K]: a CUDA scatter uploads P + K
    indices instead of P * K (and computes the rows in the kernel).
    """

    src_plane: np.ndarray
    src_tok: np.ndarray
    dst_plane: np.ndarray
    dst_tok: np.ndarray
    lo: int
    hi: int

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The segment's (src_rows, dst_rows), materialised."""
        k = len(self.src_tok)
        p0, p1 = self.lo // k, -(-self.hi // k)
        off = self.lo - p0 * k
        src = (self.src_plane[p0:p1, None] + self.src_tok[None, :]).ravel()[off : off + self.hi - self.lo]
        dst = (self.dst_plane[p0:p1, None] + self.dst_tok[None, :]).ravel()[off : off + self.hi - self.lo]
        return src, dst


class RowScatter:
    """Rows to move after a round's reads landed: staging row src_rows[i] -> cache row dst_rows[i].

    Rows are head_dim elements of the cache dtype. Built from explicit int64 arrays,
    `RowScatter(src_rows, dst_rows)`, or (by `bind`) from factored `ScatterSegment`s;
    `src_rows` / `dst_rows` are materialised on first use, and `src_rows, dst_rows =
    scatter` unpacks. `bind` makes src_rows strictly increasing and dst_rows unique.
    """

    __slots__ = ("segments", "_rows")

    def __init__(self, src_rows=None, dst_rows=None, *, segments: Sequence[ScatterSegment] = ()) -> None:
        if (src_rows is None) != (dst_rows is None) or (src_rows is not None and segments):
            raise ValueError("give RowScatter either src_rows and dst_rows, or segments")
        if src_rows is not None:
            src = np.asarray(src_rows, dtype=np.int64).reshape(-1)
            dst = np.asarray(dst_rows, dtype=np.int64).reshape(-1)
            if len(src) != len(dst):
                raise InvalidPlanError(f"row scatter has {len(src)} source rows but {len(dst)} destination rows")
            zero = np.zeros(1, dtype=np.int64)
            segments = (ScatterSegment(zero, src, zero, dst, 0, len(src)),) if len(src) else ()
            self._rows: tuple[np.ndarray, np.ndarray] | None = (src, dst)
        else:
            self._rows = None
        self.segments = tuple(segments)

    def __len__(self) -> int:
        return sum(seg.hi - seg.lo for seg in self.segments)

    def _materialise(self) -> tuple[np.ndarray, np.ndarray]:
        if self._rows is None:
            parts = [seg.rows() for seg in self.segments]
            empty = np.empty(0, dtype=np.int64)
            self._rows = (
                np.concatenate([a for a, _ in parts]) if parts else empty,
                np.concatenate([b for _, b in parts]) if parts else empty,
            )
        return self._rows

    @property
    def src_rows(self) -> np.ndarray:
        return self._materialise()[0]

    @property
    def dst_rows(self) -> np.ndarray:
        return self._materialise()[1]

    def __iter__(self):
        return iter(self._materialise())

    def __repr__(self) -> str:
        return f"RowScatter(<{len(self)} rows in {len(self.segments)} segments>)"


@dataclass(frozen=True, eq=False)
class Round:
    """Reads that may run together, then (optionally) one scatter out of staging."""

    reads: tuple[tuple[int, TransferPlan], ...]  # (index into src_layouts, READ plan from that rank)
    scatter: RowScatter | None

    @property
    def nbytes(self) -> int:
        return sum(p.total_bytes for _, p in self.reads)
