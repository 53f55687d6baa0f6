"""The CUDA row scatter of a layout conversion: one Triton kernel (see scatter.apply_scatter).

Imported lazily by `scatter.apply_scatter` for CUDA caches only, so CPU hosts never
import triton. Importing this module without triton works (AVAILABLE is False and
IMPORT_ERROR says why); calling `copy_rows` then raises.

Kernel: a 1-D grid over blocks of ROWS rows of one `ScatterSegment`; each program
computes its rows' source and destination indices from the segment's factors (row i =
plane p, token k: src_plane[p] + src_tok[k] -> dst_plane[p] + dst_tok[k]), so only
P + K indices cross PCIe instead of P * K, and copies those rows, reinterpreted as the
widest integer words that divide the row (a bf16 row of head_dim 64 = 16 int64 words),
so bytes move untouched (no float canonicalisation) and wide.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # CPU host, or a CUDA host without triton
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = ""

AVAILABLE = triton is not None
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))

if AVAILABLE:

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, src_plane_ptr, src_tok_ptr, dst_plane_ptr, dst_tok_ptr, lo, n_rows,
                          k_len, row_words, ROWS: tl.constexpr, WORDS: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        i = pid * ROWS + tl.arange(0, ROWS)
        row_ok = i < n_rows
        f = i.to(tl.int64) + lo  # flat (plane, token) index of the row
        p = f // k_len
        k = f - p * k_len
        s = tl.load(src_plane_ptr + p, mask=row_ok, other=0) + tl.load(src_tok_ptr + k, mask=row_ok, other=0)
        d = tl.load(dst_plane_ptr + p, mask=row_ok, other=0) + tl.load(dst_tok_ptr + k, mask=row_ok, other=0)
        w = tl.arange(0, WORDS)
        ok = row_ok[:, None] & (w < row_words)[None, :]
        vals = tl.load(src_ptr + s[:, None] * row_words + w[None, :], mask=ok)
        tl.store(dst_ptr + d[:, None] * row_words + w[None, :], vals, mask=ok)


def _as_words(rows: torch.Tensor, word: int, dtype: torch.dtype) -> torch.Tensor:
    return rows.view(torch.uint8).view(dtype) if word > 1 else rows.view(torch.uint8)


def copy_rows(src: torch.Tensor, dst: torch.Tensor, src_plane: torch.Tensor, src_tok: torch.Tensor,
              dst_plane: torch.Tensor, dst_tok: torch.Tensor, lo: int, hi: int) -> None:  # fmt: skip
    """dst[dst_plane[p] + dst_tok[k]] = src[src_plane[p] + src_tok[k]] for flat i = p * K + k in [lo, hi).

    src and dst: 2-D contiguous CUDA tensors of one row width in bytes; the index tensors
    int64 on the same device (K = len(src_tok)). One kernel launch.
    """
    if not AVAILABLE:
        raise RuntimeError(f"triton is not available: {IMPORT_ERROR}")
    n = hi - lo
    if n <= 0:
        return
    row_bytes = src.shape[1] * src.element_size()
    if row_bytes != dst.shape[1] * dst.element_size():
        raise ValueError(f"row widths differ: {row_bytes} vs {dst.shape[1] * dst.element_size()} bytes")
    word, wdtype = next(
        (w, t) for w, t in _WORDS if row_bytes % w == 0 and src.data_ptr() % w == 0 and dst.data_ptr() % w == 0
    )
    s, d = _as_words(src, word, wdtype), _as_words(dst, word, wdtype)
    row_words = row_bytes // word
    words = triton.next_power_of_2(row_words)
    rows = max(1, min(64, 2048 // words))
    grid = (triton.cdiv(n, rows),)
    _copy_rows_kernel[grid](s, d, src_plane, src_tok, dst_plane, dst_tok, lo, n, src_tok.numel(), row_words,
                            ROWS=rows, WORDS=words, num_warps=4)  # fmt: skip
