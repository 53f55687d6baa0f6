"""KV layout conversion between a prefill worker P and a decode worker D of different shapes.

A worker has TP x PP ranks, each with its own cache tensor and `KVLayout`. P (the
source ranks) and D (the destination ranks) may differ in

    TP degree      heads split or merged; replicated heads (tp > total_kv_heads) read once
    PP stages      layer ranges
    block size     one divides the other, either way
    order          NHD vs HND

Block ids are shared by all ranks of one worker (one block pool), so a request has one
source block table and one destination block table. Each D rank pulls what IT holds
(READs from one or more P ranks).

Three steps, from rare to frequent:

    check_pair(src_layouts, dst_layouts)          startup: refuse an impossible P/D pair
    plan = plan_conversion(src_layouts, dst)      once per (P worker, D rank), cached
    rounds = plan.bind(src_blocks, dst_blocks, num_tokens, first_token, staging_bytes)
                                                  per request: byte regions + row scatters

`plan_conversion` decides, for every (layer, KV head) the D rank holds, which P rank it
reads from (the lowest-numbered rank holding it: replicas are read once), and groups
them into *pieces*: (P rank, layer range, head range) rectangles. A piece is copied one
of two ways, decided once per piece from the two layouts:

- direct: every chunk (the tokens shared by one source and one destination block, for
  one layer and K|V) is contiguous on both sides with the same element order, so the
  READ lands in the cache itself and consecutive chunks merge into one region. Same
  order and block size with the same heads (NHD) or a head sub-range (HND), and also
  re-blocking with the same heads (NHD), or any single-head piece. The identical
  topology gives exactly `plan_transfer`'s regions.
- staged: the READ copies minimal contiguous source spans into the D rank's staging
  buffer: per (layer, K|V, source block) the piece's head sub-range (HND: contiguous),
  or the whole block (NHD interleaves heads per slot, so the cover of a head sub-range
  is within a few rows of the block, and whole blocks merge across consecutive block
  ids into one region). A `RowScatter` then moves each needed row (head_dim elements)
  from staging to its place in the cache. A piece moves the same tokens in every
  (layer, K|V) plane, so its scatter is kept factored (`ScatterSegment`: per-plane
  bases + per-token offsets); the CUDA kernel computes the rows itself, and
  `src_rows` / `dst_rows` are materialised only when asked for.

Byte space of a READ's destination: [cache bytes | staging bytes]. A region whose
dst_offset >= dst.region_bytes lands in staging at dst_offset - region_bytes, and never
crosses that boundary (the transports check it; register the staging tensor with the
cache). A request larger than the staging buffer is split in rounds:

    for rnd in rounds:
        submit every (src_rank, plan) of rnd.reads (READ), wait until all are DONE
        apply_scatter(rnd.scatter, staging, kv_cache)      if rnd.scatter is not None
    (the next round reuses staging only after the scatter ran)

Rows: the cache and staging are viewed as [-1, head_dim] of the cache dtype. A row of a
layout is numbered like its tensor (engine/kv_cache.py):

    NHD: (((layer * 2 + kv) * num_blocks + block) * block_size + slot) * heads + head
    HND: (((layer * 2 + kv) * num_blocks + block) * heads + head) * block_size + slot

`bind` copies exactly tokens [first_token, num_tokens) of every layer and head the D
rank holds. Direct pieces copy whole chunks, so rows past num_tokens in the last
destination block may be written too (with whatever P holds there); staged pieces touch
only the requested rows. Nothing outside the request's destination blocks is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from kv_transfer.errors import IncompatiblePeerError, InvalidPlanError, UnsupportedConversionError
from kv_transfer.layout import KVLayout
from kv_transfer.plan import TransferPlan, as_count, check_block_ids

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# fields P and D must agree on (no conversion bridges them), in message order
PAIR_FIELDS = ("model_fingerprint", "dtype", "head_dim", "total_layers", "total_kv_heads")
# fields every rank of ONE worker shares (one model, one block pool)
WORKER_FIELDS = (*PAIR_FIELDS, "block_size", "num_blocks", "order")
KIND_ORDER = ("tp-split", "tp-merge", "pp-restage")


# ---- startup validation ---------------------------------------------------------------------------
def _rank_set(layouts: Sequence[KVLayout], side: str) -> tuple[KVLayout, ...]:
    ranks = tuple(layouts)
    if not ranks:
        raise UnsupportedConversionError(f"malformed {side} rank set: no ranks")
    for i, lay in enumerate(ranks):
        if not isinstance(lay, KVLayout):
            raise UnsupportedConversionError(
                f"malformed {side} rank set: rank {i} is a {type(lay).__name__}, not a KVLayout"
            )
    first = ranks[0]
    for i, lay in enumerate(ranks[1:], 1):
        for f in WORKER_FIELDS:
            if getattr(lay, f) != getattr(first, f):
                raise UnsupportedConversionError(
                    f"malformed {side} rank set: rank {i} has {f} {getattr(lay, f)!r} but rank 0 has "
                    f"{getattr(first, f)!r}; all ranks of one worker share one model and one block pool"
                )
    return ranks


def _span(start: int, n: int) -> str:
    return f"[{start}, {start + n})"


def _owner_grid(src: Sequence[KVLayout]) -> np.ndarray:
    """[total_layers, total_kv_heads] -> the lowest-numbered source rank holding it, or -1."""
    grid = np.full((src[0].total_layers, src[0].total_kv_heads), -1, dtype=np.int64)
    for i in range(len(src) - 1, -1, -1):  # lower ranks overwrite: deterministic, replicas read once
        s = src[i]
        grid[s.layer_start : s.layer_start + s.num_layers, s.head_start : s.head_start + s.num_kv_heads] = i
    return grid


def _check_coverage(src: Sequence[KVLayout], dst: Sequence[KVLayout], grid: np.ndarray) -> None:
    for i, d in enumerate(dst):
        sub = grid[d.layer_start : d.layer_start + d.num_layers, d.head_start : d.head_start + d.num_kv_heads]
        if (sub < 0).any():
            li, hi = (int(x) for x in np.argwhere(sub < 0)[0])
            held = ", ".join(
                f"rank {j}: layers {_span(s.layer_start, s.num_layers)} heads {_span(s.head_start, s.num_kv_heads)}"
                for j, s in enumerate(src)
            )
            raise UnsupportedConversionError(
                f"coverage: decode rank {i} holds layers {_span(d.layer_start, d.num_layers)} x KV heads "
                f"{_span(d.head_start, d.num_kv_heads)} but no prefill rank holds layer {d.layer_start + li} "
                f"KV head {d.head_start + hi} (prefill {held})"
            )


def check_pair(src_layouts: Sequence[KVLayout], dst_layouts: Sequence[KVLayout]) -> None:
    """Validate one prefill worker (all its ranks' layouts) against one decode worker, at startup.

    Raises IncompatiblePeerError when no conversion can bridge them (model_fingerprint,
    dtype, head_dim, total_layers, total_kv_heads differ), UnsupportedConversionError
    for block sizes where neither divides the other, decode ranks holding a (layer,
    head) no prefill rank holds, or a malformed rank set (empty, or ranks of one worker
    disagreeing on the model or the block pool). Messages name both sides and the field.
    """
    src, dst = _rank_set(src_layouts, "prefill"), _rank_set(dst_layouts, "decode")
    s0, d0 = src[0], dst[0]
    bad = [f"{f}: prefill {getattr(s0, f)!r} vs decode {getattr(d0, f)!r}" for f in PAIR_FIELDS
           if getattr(s0, f) != getattr(d0, f)]  # fmt: skip
    if bad:
        raise IncompatiblePeerError("prefill and decode KV caches can never be exchanged: " + "; ".join(bad))
    bs, bd = s0.block_size, d0.block_size
    if bs % bd and bd % bs:
        raise UnsupportedConversionError(f"block_size: prefill {bs} vs decode {bd}: one must divide the other")
    _check_coverage(src, dst, _owner_grid(src))


def describe_pair(src_layouts: Sequence[KVLayout], dst_layouts: Sequence[KVLayout]) -> list[str]:
    """The conversion kinds a P/D pair needs, e.g. ["tp-split", "pp-restage", "reblock 16->32", "NHD->HND"].

    ["identical"] when every decode rank copies plain blocks from one prefill rank
    (the same shape, or replicas of it). Validates the pair first (check_pair).
    """
    check_pair(src_layouts, dst_layouts)
    found: set[str] = set()
    for d in dst_layouts:
        found.update(plan_conversion(src_layouts, d).kinds)
    kinds = [k for k in KIND_ORDER if k in found]
    kinds += sorted(k for k in found if k.startswith("reblock"))
    kinds += sorted(k for k in found if "->" in k and not k.startswith("reblock"))
    return kinds or ["identical"]


# ---- plan --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Layers [layer_start, +num_layers) x KV heads [head_start, +num_heads) (global) read from src rank `src`."""

    src: int
    layer_start: int
    num_layers: int
    head_start: int
    num_heads: int
    direct: bool  # True: READ straight into the cache; False: into staging, then scatter


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
            self._rows = (src, dst)
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


def _is_nhd(lay: KVLayout) -> bool:
    return lay.order == "NHD"


def _inner(lay: KVLayout, slot, head):
    """Row of (slot, local head) inside one (layer, K|V, block) of `lay` (ints or arrays)."""
    return slot * lay.num_kv_heads + head if _is_nhd(lay) else head * lay.block_size + slot


def _box_contiguous(lay: KVLayout, tokens: int, heads: int) -> bool:
    """Are `tokens` consecutive slots x `heads` consecutive heads one contiguous run in a block of `lay`?"""
    if _is_nhd(lay):
        return tokens == 1 or heads == lay.num_kv_heads
    return heads == 1 or tokens == lay.block_size


def _is_direct(src: KVLayout, dst: KVLayout, heads: int) -> bool:
    m = min(src.block_size, dst.block_size)  # tokens one source block and one destination block share
    same_order = heads == 1 or m == 1 or src.order == dst.order
    return same_order and _box_contiguous(src, m, heads) and _box_contiguous(dst, m, heads)


@dataclass(frozen=True)
class _Staged:
    """Per staged piece, what does not depend on the request (a span = one (layer, K|V, source block))."""

    span_rows: int  # rows of one span
    span_start: int  # first row of the span inside its source block
    slot: np.ndarray  # [span_rows]: source slot of each span row
    head_ok: np.ndarray  # [span_rows] bool: the row's head belongs to the piece
    dst_head: np.ndarray  # [span_rows]: the row's local head on the destination rank


@dataclass(frozen=True)
class ConversionPlan:
    """How one decode rank (`dst`) reads its layers and heads from a prefill worker's ranks.

    Pure data from `plan_conversion`, computed once per (P worker, D rank) and cached by
    the caller; frozen and hashable. `bind` turns it into the rounds of one request.
    """

    src_layouts: tuple[KVLayout, ...]
    dst: KVLayout
    pieces: tuple[Piece, ...]
    _staged: tuple[_Staged | None, ...] = field(default=(), init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_layouts", tuple(self.src_layouts))
        object.__setattr__(self, "pieces", tuple(self.pieces))
        object.__setattr__(self, "_staged", tuple(None if p.direct else self._prepare(p) for p in self.pieces))

    def _prepare(self, p: Piece) -> _Staged:
        s = self.src_layouts[p.src]
        ha, hb = p.head_start - s.head_start, p.head_start - s.head_start + p.num_heads
        if _is_nhd(s):  # whole blocks: consecutive ids merge into one region
            start, end = 0, s.block_size * s.num_kv_heads
        else:  # the head sub-range is contiguous
            start, end = _inner(s, 0, ha), _inner(s, s.block_size - 1, hb - 1) + 1
        inner = np.arange(start, end, dtype=np.int64)
        if _is_nhd(s):
            slot, head = inner // s.num_kv_heads, inner % s.num_kv_heads
        else:
            slot, head = inner % s.block_size, inner // s.block_size
        ok = (head >= ha) & (head < hb)
        dst_head = head + (s.head_start - self.dst.head_start)
        for a in (slot, ok, dst_head):
            a.flags.writeable = False
        return _Staged(end - start, start, slot, ok, dst_head)

    # ---- facts ---------------------------------------------------------------------------------------
    @property
    def row_bytes(self) -> int:
        return self.dst.head_dim * self.dst.itemsize

    @property
    def needs_staging(self) -> bool:
        return not all(p.direct for p in self.pieces)

    @property
    def kinds(self) -> list[str]:
        """Conversion kinds this rank needs (see describe_pair); [] when it copies plain blocks."""
        d, s0 = self.dst, self.src_layouts[0]
        kinds = []
        if any(p.num_heads < self.src_layouts[p.src].num_kv_heads for p in self.pieces):
            kinds.append("tp-split")
        if any(p.num_heads < d.num_kv_heads for p in self.pieces):
            kinds.append("tp-merge")
        layers = [(p.layer_start, p.num_layers) for p in self.pieces]
        src_layers = [(self.src_layouts[p.src].layer_start, self.src_layouts[p.src].num_layers) for p in self.pieces]
        if any(lay != (d.layer_start, d.num_layers) or lay != s for lay, s in zip(layers, src_layers)):
            kinds.append("pp-restage")
        if s0.block_size != d.block_size:
            kinds.append(f"reblock {s0.block_size}->{d.block_size}")
        if s0.order != d.order:
            kinds.append(f"{s0.order}->{d.order}")
        return kinds

    def staging_bytes(self, num_tokens: int, first_token: int = 0) -> int:
        """Staging bytes for `bind` to do a request of these tokens in one round (0: all direct)."""
        bs = self.src_layouts[0].block_size
        if num_tokens <= first_token:
            return 0
        blocks = -(-num_tokens // bs) - first_token // bs
        rows = sum(2 * p.num_layers * blocks * st.span_rows for p, st in zip(self.pieces, self._staged) if st)
        return rows * self.row_bytes

    # ---- per request ---------------------------------------------------------------------------------
    def bind(
        self,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        num_tokens: int,
        first_token: int = 0,
        staging_bytes: int = 0,
    ) -> list[Round]:
        """The rounds copying tokens [first_token, num_tokens) of every layer and head `dst` holds.

        src_blocks: P's block ids for tokens [0, num_tokens) (ceil(num_tokens / Bs) ids);
        dst_blocks: D's block ids for tokens [first_token, num_tokens), first_token a
        multiple of D's block size (D's prefix cache holds the tokens before it);
        staging_bytes: the size of the staging buffer registered with D's cache (rounds
        are cut so one round's staged reads fit). Returns [] when there is nothing to copy.
        Raises InvalidPlanError for bad lengths, ids out of range, repeated destination
        ids, a misaligned first_token, or staged work with staging smaller than one row.
        """
        s0, d = self.src_layouts[0], self.dst
        bs, bd = s0.block_size, d.block_size
        n = as_count(num_tokens, "num_tokens")
        t0 = as_count(first_token, "first_token")
        if t0 > n:
            raise InvalidPlanError(f"first_token {t0} is past num_tokens {n}")
        if t0 % bd:
            raise InvalidPlanError(f"first_token {t0} is not a multiple of the decode block size {bd}")
        sb = _block_ids(src_blocks, s0.num_blocks, "source", -(-n // bs), f"tokens [0, {n}) in blocks of {bs}")
        db = _block_ids(dst_blocks, d.num_blocks, "destination", -(-n // bd) - t0 // bd,
                        f"tokens [{t0}, {n}) in blocks of {bd}")  # fmt: skip
        if len(np.unique(db)) != len(db):
            vals, counts = np.unique(db, return_counts=True)
            raise InvalidPlanError(
                f"destination block ids repeat: {vals[counts > 1].tolist()}; each destination block can be written once"
            )
        if n == t0:
            return []
        row_bytes = self.row_bytes
        direct: dict[int, list[np.ndarray]] = {}
        staged = []
        for p, st in zip(self.pieces, self._staged):
            if st is None:
                direct.setdefault(p.src, []).append(self._direct_regions(p, sb, db, n, t0))
            else:
                staged.append((p, st))
        total_rows = sum(2 * p.num_layers * (-(-n // bs) - t0 // bs) * st.span_rows for p, st in staged)
        capacity = staging_bytes // row_bytes if staging_bytes > 0 else 0
        if total_rows and capacity == 0:
            raise InvalidPlanError(
                f"this conversion stages rows of {row_bytes} bytes but the staging buffer has {staging_bytes} bytes; "
                f"register a staging buffer (one round needs {total_rows * row_bytes} bytes)"
            )
        num_rounds = -(-total_rows // capacity) if total_rows else 1
        reads: list[dict[int, list[np.ndarray]]] = [{} for _ in range(num_rounds)]
        for src, arrs in direct.items():
            reads[0].setdefault(src, []).extend(arrs)
        scatters: list[RowScatter | None] = [None] * num_rounds
        if staged:
            self._staged_rounds(staged, sb, db, n, t0, capacity, total_rows, reads, scatters)
        rounds = []
        for r in range(num_rounds):
            plans = []
            for src in sorted(reads[r]):
                arr = np.concatenate(reads[r][src]) if len(reads[r][src]) > 1 else reads[r][src][0]
                arr = arr * row_bytes  # rows -> bytes (staging rows are numbered after the cache's)
                plans.append((src, TransferPlan.from_array(arr, int(arr[:, 2].sum()), len(db))))
            rounds.append(Round(tuple(plans), scatters[r]))
        return rounds

    def _planes(self, lay: KVLayout, p: Piece) -> np.ndarray:
        """First row of each (layer, K|V) plane of piece `p` in `lay`, in (layer, kv) order."""
        first = (p.layer_start - lay.layer_start) * 2
        plane_rows = lay.num_blocks * lay.block_size * lay.num_kv_heads
        return np.arange(first, first + 2 * p.num_layers, dtype=np.int64) * plane_rows

    def _direct_regions(self, p: Piece, sb: np.ndarray, db: np.ndarray, n: int, t0: int) -> np.ndarray:
        """[k, 3] rows (src_row, dst_row, num_rows) of piece p's merged chunks."""
        s, d = self.src_layouts[p.src], self.dst
        bs, bd = s.block_size, d.block_size
        m = min(bs, bd)
        chunk = m * p.num_heads
        tc = np.arange(t0, -(-n // m) * m, m, dtype=np.int64)  # first token of each chunk
        src_tok = sb[tc // bs] * (bs * s.num_kv_heads) + _inner(s, tc % bs, p.head_start - s.head_start)
        dst_tok = db[(tc - t0) // bd] * (bd * d.num_kv_heads) + _inner(d, tc % bd, p.head_start - d.head_start)
        # a run continues where both sides continue (the same in every plane)
        cont = (src_tok[1:] == src_tok[:-1] + chunk) & (dst_tok[1:] == dst_tok[:-1] + chunk)
        starts = np.flatnonzero(np.concatenate(([True], ~cont)))
        lengths = np.diff(np.append(starts, len(tc))) * chunk
        sp, dp = self._planes(s, p), self._planes(d, p)
        out = np.empty((len(sp), len(starts), 3), dtype=np.int64)
        np.add(sp[:, None], src_tok[starts][None, :], out=out[:, :, 0])
        np.add(dp[:, None], dst_tok[starts][None, :], out=out[:, :, 1])
        out[:, :, 2] = lengths
        return out.reshape(-1, 3)

    def _staged_rounds(self, staged, sb, db, n, t0, capacity, total_rows, reads, scatters) -> None:
        """Fill `reads` (staging regions per round and rank) and `scatters` for the staged pieces.

        The staged spans are laid out one after the other in a virtual stream of rows
        (piece, layer, K|V, source block, span row); round r holds stream rows
        [r * capacity, (r + 1) * capacity) at staging rows [0, capacity).
        """
        d = self.dst
        bs, bd = self.src_layouts[0].block_size, d.block_size
        j0, j1 = t0 // bs, -(-n // bs)
        nj = j1 - j0
        d_block_rows = bd * d.num_kv_heads
        region_rows = d.region_bytes // self.row_bytes
        num_rounds = len(scatters)
        bounds = np.arange(num_rounds + 1, dtype=np.int64) * capacity  # stream row where each round starts
        segments: list[list[ScatterSegment]] = [[] for _ in range(num_rounds)]
        # spans: (src_row, stream_row, rows, src rank)
        span_src, span_stream, span_len, span_rank = [], [], [], []
        base = 0
        for p, st in staged:
            s = self.src_layouts[p.src]
            sp, dp = self._planes(s, p), self._planes(d, p)
            # which (source block, span row) pairs are requested rows, and where they go
            tok = (np.arange(j0, j1, dtype=np.int64) * bs)[:, None] + st.slot[None, :]
            ok = (tok >= t0) & (tok < n) & st.head_ok[None, :]
            k = np.flatnonzero(ok) if not ok.all() else None
            tok = tok.ravel() if k is None else tok.ravel()[k]
            head = np.tile(st.dst_head, nj) if k is None else st.dst_head[k % st.span_rows]
            dst_tok = db[tok // bd - t0 // bd] * d_block_rows + _inner(d, tok % bd, head)
            local = np.arange(nj * st.span_rows, dtype=np.int64) if k is None else k  # stream row within a plane
            per_plane = nj * st.span_rows
            planes = base + np.arange(len(sp), dtype=np.int64) * per_plane
            if len(local):
                # requested rows before each round boundary, in flat (plane, token) order
                rel = bounds - base
                pb = np.clip(rel // per_plane, 0, len(sp))
                inner = np.searchsorted(local, rel - pb * per_plane)
                flat = np.where(rel <= 0, 0, np.where(pb >= len(sp), len(sp) * len(local), pb * len(local) + inner))
                for r in np.flatnonzero(flat[1:] > flat[:-1]).tolist():
                    segments[r].append(ScatterSegment(planes - r * capacity, local, dp, dst_tok,
                                                      int(flat[r]), int(flat[r + 1])))  # fmt: skip
            # the spans, merged where the source continues (the stream always does)
            src_span = (sp[:, None] + (sb[j0:j1] * (bs * s.num_kv_heads) + st.span_start)[None, :]).ravel()
            cont = src_span[1:] == src_span[:-1] + st.span_rows
            starts = np.flatnonzero(np.concatenate(([True], ~cont)))
            span_src.append(src_span[starts])
            span_stream.append(base + starts * st.span_rows)
            span_len.append(np.diff(np.append(starts, len(src_span))) * st.span_rows)
            span_rank.append(np.full(len(starts), p.src, dtype=np.int64))
            base += len(sp) * per_plane
        assert base == total_rows
        a = np.concatenate(span_stream)
        ln = np.concatenate(span_len)
        src0 = np.concatenate(span_src)
        rank = np.concatenate(span_rank)
        # cut spans at round boundaries
        first_r, last_r = a // capacity, (a + ln - 1) // capacity
        parts = last_r - first_r + 1
        if (parts == 1).all():
            rid, seg_a, seg_len, seg_src, seg_rank = first_r, a, ln, src0, rank
        else:
            idx = np.repeat(np.arange(len(a)), parts)
            q = np.arange(len(idx)) - np.repeat(np.cumsum(parts) - parts, parts)
            rid = first_r[idx] + q
            seg_a = np.maximum(a[idx], rid * capacity)
            seg_len = np.minimum(a[idx] + ln[idx], (rid + 1) * capacity) - seg_a
            seg_src, seg_rank = src0[idx] + (seg_a - a[idx]), rank[idx]
        seg_dst = region_rows + seg_a - rid * capacity
        # group segments by (round, rank): both never decrease along the stream
        key = rid * (len(self.src_layouts) + 1) + seg_rank
        cuts = np.flatnonzero(np.diff(key)) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(key)]))):
            arr = np.stack([seg_src[lo:hi], seg_dst[lo:hi], seg_len[lo:hi]], 1)
            reads[int(rid[lo])].setdefault(int(seg_rank[lo]), []).append(arr)
        for r, segs in enumerate(segments):
            if segs:
                scatters[r] = RowScatter(segments=segs)


def _block_ids(ids, num_blocks: int, side: str, want: int, what: str) -> np.ndarray:
    arr = check_block_ids(ids, num_blocks, side)
    if len(arr) != want:
        raise InvalidPlanError(f"{len(arr)} {side} block ids but {what} need {want}")
    return arr


def _pieces(src: Sequence[KVLayout], dst: KVLayout, grid: np.ndarray) -> tuple[Piece, ...]:
    sub = grid[dst.layer_start : dst.layer_start + dst.num_layers, dst.head_start : dst.head_start + dst.num_kv_heads]
    rows = []  # per layer: ((src, head_start, num_heads), ...), maximal head runs of one source rank
    for line in sub.tolist():
        runs, h = [], 0
        while h < len(line):
            e = h
            while e < len(line) and line[e] == line[h]:
                e += 1
            runs.append((line[h], dst.head_start + h, e - h))
            h = e
        rows.append(tuple(runs))
    pieces = []
    li = 0
    while li < len(rows):
        le = li
        while le < len(rows) and rows[le] == rows[li]:
            le += 1
        for s, h0, nh in rows[li]:
            pieces.append(
                Piece(s, dst.layer_start + li, le - li, h0, nh, _is_direct(src[s], dst, nh))
            )
        li = le
    pieces.sort(key=lambda p: (p.src, p.layer_start, p.head_start))
    return tuple(pieces)


def plan_conversion(src_layouts: Sequence[KVLayout], dst_layout: KVLayout) -> ConversionPlan:
    """Plan how decode rank `dst_layout` reads its share of a prefill worker's cache (all its ranks).

    Pure; validates the pair like check_pair (with this one decode rank). For each
    (layer, KV head) of the destination, the lowest-numbered source rank holding it is
    read (replicated heads are read once); the result is cached by the caller per
    (P worker, D rank).
    """
    src = _rank_set(src_layouts, "prefill")
    check_pair(src, [dst_layout])
    return ConversionPlan(src, dst_layout, _pieces(src, dst_layout, _owner_grid(src)))


# ---- executing ------------------------------------------------------------------------------------------
_TRITON_STATE: dict[str, object] = {}


def _triton_rows():
    """kv_transfer.convert_cuda's copy_rows when triton imports here, else None (checked once)."""
    if "copy_rows" not in _TRITON_STATE:
        from kv_transfer import convert_cuda  # lazy: CPU hosts never import triton

        _TRITON_STATE["copy_rows"] = convert_cuda.copy_rows if convert_cuda.AVAILABLE else None
        if not convert_cuda.AVAILABLE:
            log.info("triton is not available (%s): CUDA row scatters use torch", convert_cuda.IMPORT_ERROR)
    return _TRITON_STATE["copy_rows"]


def _rows_view(t: torch.Tensor, dtype: torch.dtype, head_dim: int, what: str) -> torch.Tensor:
    import torch

    if not t.is_contiguous():
        raise InvalidPlanError(f"the {what} tensor must be contiguous")
    flat = t.reshape(-1).view(torch.uint8)
    row_bytes = head_dim * dtype.itemsize
    usable = flat.numel() // row_bytes * row_bytes
    return flat[:usable].view(dtype).view(-1, head_dim)


def apply_scatter(scatter: RowScatter, staging: torch.Tensor, cache: torch.Tensor, backend: str = "auto") -> str:
    """Copy staging row scatter.src_rows[i] to cache row scatter.dst_rows[i], for every i.

    staging is viewed as [-1, head_dim] of the cache's dtype, the cache as [-1, head_dim];
    `scatter` is a RowScatter or a (src_rows, dst_rows) pair. CPU: torch ops
    (index_select, index_copy_; a slice when the staging rows are one range). CUDA: one
    Triton kernel, launched once per segment, computing each row's indices from the
    segment's factors ("auto" or "triton"), else (or with backend="torch") the torch
    ops. Returns the backend that ran: "triton", "torch", or "none" for an empty scatter.
    """
    import torch

    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if not isinstance(scatter, RowScatter):
        scatter = RowScatter(*scatter)
    if len(scatter) == 0:
        return "none"
    if staging.device != cache.device:
        raise InvalidPlanError(f"staging lives on {staging.device}, the KV cache on {cache.device}")
    head_dim = cache.shape[-1]
    rows = _rows_view(cache, cache.dtype, head_dim, "KV cache")
    st = _rows_view(staging, cache.dtype, head_dim, "staging")
    dev = cache.device

    def upload(seg: ScatterSegment) -> list[torch.Tensor]:
        return [torch.as_tensor(a, dtype=torch.int64).to(dev, non_blocking=True)
                for a in (seg.src_plane, seg.src_tok, seg.dst_plane, seg.dst_tok)]  # fmt: skip

    if cache.is_cuda and backend != "torch":
        copy_rows = _triton_rows()
        if copy_rows is not None:
            for seg in scatter.segments:
                copy_rows(st, rows, *upload(seg), seg.lo, seg.hi)
            return "triton"
        if backend == "triton":
            raise RuntimeError("backend='triton' was asked for but triton does not import here")
    elif backend == "triton":
        raise RuntimeError("the triton backend runs on CUDA tensors only")
    for seg in scatter.segments:
        src_plane, src_tok, dst_plane, dst_tok = upload(seg)
        k, m = len(seg.src_tok), seg.hi - seg.lo
        p0, p1, off = seg.lo // k, -(-seg.hi // k), seg.lo % k
        di = (dst_plane[p0:p1, None] + dst_tok[None, :]).reshape(-1)[off : off + m]
        tok, planes = np.asarray(seg.src_tok), np.asarray(seg.src_plane)[p0:p1]
        if (np.diff(tok) == 1).all() and (np.diff(planes) == k).all():  # one range of staging: no gather
            first = int(planes[0] + tok[0]) + off
            vals = st[first : first + m]
        else:
            vals = st.index_select(0, (src_plane[p0:p1, None] + src_tok[None, :]).reshape(-1)[off : off + m])
        rows.index_copy_(0, di, vals)
    return "torch"


def execute_locally(
    rounds: Sequence[Round],
    src_caches: Sequence[torch.Tensor],
    dst_cache: torch.Tensor,
    staging: torch.Tensor | None,
    backend: str = "auto",
) -> str:
    """Reference executor of `bind`'s rounds in one process: byte copies, then each round's scatter.

    src_caches[i] is the cache of src_layouts[i]. Does what a transport READ + the decode
    rank's scatter do. Returns the scatter backend that ran last ("none" without scatters).
    """
    import torch

    on_cpu = all(t.device.type == "cpu" for t in (dst_cache, *src_caches, *([staging] if staging is not None else [])))

    def flat(t: torch.Tensor):
        b = t.reshape(-1).view(torch.uint8)
        return b.numpy() if on_cpu else b  # numpy slices copy with less overhead per region

    def copy(dst, src) -> None:
        if on_cpu:
            dst[:] = src
        else:
            dst.copy_(src)

    dst = flat(dst_cache)
    cache_n = len(dst)
    st = flat(staging) if staging is not None else None
    st_n = len(st) if st is not None else 0
    used = "none"
    for rnd in rounds:
        for src_index, plan in rnd.reads:
            src = flat(src_caches[src_index])
            plan.check_bounds(len(src), cache_n, st_n)
            for s, d, nb in plan.as_array().tolist():
                if d >= cache_n:
                    copy(st[d - cache_n : d - cache_n + nb], src[s : s + nb])
                else:
                    copy(dst[d : d + nb], src[s : s + nb])
        if rnd.scatter is not None:
            if staging is None:
                raise InvalidPlanError("these rounds scatter out of staging, but no staging tensor was given")
            used = apply_scatter(rnd.scatter, staging, dst_cache, backend)
    return used
