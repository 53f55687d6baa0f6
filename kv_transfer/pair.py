"""`check_pair`: can this prefill worker P and this decode worker D exchange KV at all?

Run once at startup (deploy/topology.py, worker_core/host.py), before any traffic, on
every rank layout of both workers. A pair is refused, naming the field and both sides,
when

    IncompatiblePeerError        no conversion bridges them: `PAIR_FIELDS` differ
                                 (model_fingerprint, dtype, head_dim, total_layers,
                                 total_kv_heads)
    UnsupportedConversionError   block sizes where neither divides the other; a decode
                                 rank holding a (layer, KV head) no prefill rank holds;
                                 a malformed rank set (empty, not KVLayouts, or ranks of
                                 one worker disagreeing on `WORKER_FIELDS`)

Everything else (TP degree, PP stages, block size, NHD/HND order) is converted by the
planner (planner.py), which starts from the same rank-set check (`rank_set`) and the
same owner grid (`owner_grid`: which prefill rank a (layer, KV head) is read from).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kv_transfer.errors import IncompatiblePeerError, UnsupportedConversionError
from kv_transfer.layout import KVLayout

# fields P and D must agree on (no conversion bridges them), in message order
PAIR_FIELDS = ("model_fingerprint", "dtype", "head_dim", "total_layers", "total_kv_heads")
# fields every rank of ONE worker shares (one model, one block pool)
WORKER_FIELDS = (*PAIR_FIELDS, "block_size", "num_blocks", "order")


def rank_set(layouts: Sequence[KVLayout], side: str) -> tuple[KVLayout, ...]:
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


def owner_grid(src: Sequence[KVLayout]) -> np.ndarray:
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
    src, dst = rank_set(src_layouts, "prefill"), rank_set(dst_layouts, "decode")
    s0, d0 = src[0], dst[0]
    bad = [f"{f}: prefill {getattr(s0, f)!r} vs decode {getattr(d0, f)!r}" for f in PAIR_FIELDS
           if getattr(s0, f) != getattr(d0, f)]  # fmt: skip
    if bad:
        raise IncompatiblePeerError("prefill and decode KV caches can never be exchanged: " + "; ".join(bad))
    bs, bd = s0.block_size, d0.block_size
    if bs % bd and bd % bs:
        raise UnsupportedConversionError(f"block_size: prefill {bs} vs decode {bd}: one must divide the other")
    _check_coverage(src, dst, owner_grid(src))
