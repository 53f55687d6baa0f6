"""Running a conversion's rounds: `apply_scatter` (staging rows -> cache rows) and `execute_locally`.

A decode rank runs each `Round` of `ConversionPlan.bind` (rounds.py): its READs through
a transport, then, when the round staged rows, `apply_scatter(rnd.scatter, staging,
kv_cache)` on the cache's device before the next round reuses staging
(worker_core/rank_kv.py). The scatter runs torch ops on CPU and one Triton kernel on
CUDA (scatter_cuda.py, imported lazily so CPU hosts never import triton), with the
torch ops as the fallback where triton does not import.

`execute_locally` is the reference executor for tests and benchmarks/kv_conversion.py:
every round's reads as byte copies in one process, then its scatter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kv_transfer.errors import InvalidPlanError
from kv_transfer.rounds import Round, RowScatter, ScatterSegment

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_TRITON_STATE: dict[str, object] = {}


def _triton_rows():
    """scatter_cuda.copy_rows when triton imports here, else None (checked once)."""
    if "copy_rows" not in _TRITON_STATE:
        import kv_transfer.scatter_cuda as scatter_cuda  # lazy: CPU hosts never import triton

        _TRITON_STATE["copy_rows"] = scatter_cuda.copy_rows if scatter_cuda.AVAILABLE else None
        if not scatter_cuda.AVAILABLE:
            log.info("triton is not available (%s): CUDA row scatters use torch", scatter_cuda.IMPORT_ERROR)
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
                if d >= cache_n and st is not None:  # check_bounds admits offsets past the cache only with staging
                    copy(st[d - cache_n : d - cache_n + nb], src[s : s + nb])
                else:
                    copy(dst[d : d + nb], src[s : s + nb])
        if rnd.scatter is not None:
            if staging is None:
                raise InvalidPlanError("these rounds scatter out of staging, but no staging tensor was given")
            used = apply_scatter(rnd.scatter, staging, dst_cache, backend)
    return used
