"""`ConversionPlan`: the pieces one decode rank reads, and `bind`, which turns them into one request's rounds.

A plan is pure data made once per (P worker, D rank) by `plan_conversion` (planner.py:
which P rank each (layer, KV head) is read from, grouped into `Piece`s, each direct or
staged). What does not depend on the request (per staged piece: the span each source
block contributes and where its rows go) is prepared when the plan is made; `bind`
then does one request, vectorised, into `Round`s (rounds.py).

Byte space of a READ's destination: [cache bytes | staging bytes]. A region whose
dst_offset >= dst.region_bytes lands in staging at dst_offset - region_bytes, and never
crosses that boundary (the transports check it; register the staging tensor with the
cache). A request whose staged reads exceed the staging buffer is cut into rounds; a
round's scatter must run before the next round's reads reuse staging. Rows are numbered
as in rounds.py.

`bind` copies exactly tokens [first_token, num_tokens) of every layer and head the D
rank holds. Direct pieces copy whole chunks, so rows past num_tokens in the last
destination block may be written too (with whatever P holds there); staged pieces touch
only the requested rows. Nothing outside the request's destination blocks is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kv_transfer.errors import InvalidPlanError
from kv_transfer.layout import KVLayout
from kv_transfer.plan import TransferPlan, as_count, check_block_ids
from kv_transfer.rounds import Round, RowScatter, ScatterSegment


@dataclass(frozen=True)
class Piece:
    """Layers [layer_start, +num_layers) x KV heads [head_start, +num_heads) (global) read from src rank `src`."""

    src: int
    layer_start: int
    num_layers: int
    head_start: int
    num_heads: int
    direct: bool  # True: READ straight into the cache; False: into staging, then scatter


def _is_nhd(lay: KVLayout) -> bool:
    return lay.order == "NHD"


def _inner(lay: KVLayout, slot, head):
    """Row of (slot, local head) inside one (layer, K|V, block) of `lay` (ints or arrays)."""
    return slot * lay.num_kv_heads + head if _is_nhd(lay) else head * lay.block_size + slot


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
