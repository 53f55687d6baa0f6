"""`plan_conversion`: how one decode rank reads its share of a prefill worker's KV cache.

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

    check_pair(src_layouts, dst_layouts)          startup: refuse an impossible P/D pair (pair.py)
    plan = plan_conversion(src_layouts, dst)      once per (P worker, D rank), cached (here)
    rounds = plan.bind(src_blocks, dst_blocks, num_tokens, first_token, staging_bytes)
                                                  per request: byte regions + row scatters
                                                  (conversion_plan.py, rounds.py; run by
                                                  a transport + scatter.apply_scatter)

`plan_conversion` decides, for every (layer, KV head) the D rank holds, which P rank it
reads from (the lowest-numbered rank holding it: replicas are read once), and groups
them into *pieces*: (P rank, layer range, head range) rectangles. A piece is copied one
of two ways, decided once per piece from the two layouts:

- direct: every chunk (the tokens shared by one source and one destination block, for
  one layer and K|V) is contiguous on both sides with the same element order, so the
  READ lands in the cache itself and consecutive chunks merge into one region. Same
  order and block size with the same heads (NHD) or a head sub-range (HND), and also
  re-blocking with the same heads (NHD), or any single-head piece. The identical
  topology gives exactly `plan_transfer`'s regions (plan.py).
- staged: the READ copies minimal contiguous source spans into the D rank's staging
  buffer: per (layer, K|V, source block) the piece's head sub-range (HND: contiguous),
  or the whole block (NHD interleaves heads per slot, so the cover of a head sub-range
  is within a few rows of the block, and whole blocks merge across consecutive block
  ids into one region). A `RowScatter` (rounds.py) then moves each needed row
  (head_dim elements) from staging to its place in the cache.

`describe_pair` names the conversion kinds a whole P/D pair needs (for logs and
start-up messages), from the plans of every D rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kv_transfer.conversion_plan import ConversionPlan, Piece
from kv_transfer.layout import KVLayout
from kv_transfer.pair import check_pair, owner_grid, rank_set

KIND_ORDER = ("tp-split", "tp-merge", "pp-restage")


def _box_contiguous(lay: KVLayout, tokens: int, heads: int) -> bool:
    """Are `tokens` consecutive slots x `heads` consecutive heads one contiguous run in a block of `lay`?"""
    if lay.order == "NHD":
        return tokens == 1 or heads == lay.num_kv_heads
    return heads == 1 or tokens == lay.block_size


def _is_direct(src: KVLayout, dst: KVLayout, heads: int) -> bool:
    m = min(src.block_size, dst.block_size)  # tokens one source block and one destination block share
    same_order = heads == 1 or m == 1 or src.order == dst.order
    return same_order and _box_contiguous(src, m, heads) and _box_contiguous(dst, m, heads)


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
            pieces.append(Piece(s, dst.layer_start + li, le - li, h0, nh, _is_direct(src[s], dst, nh)))
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
    src = rank_set(src_layouts, "prefill")
    check_pair(src, [dst_layout])
    return ConversionPlan(src, dst_layout, _pieces(src, dst_layout, owner_grid(src)))


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
