"""Attention over the paged KV cache, batched: no Python loop over tokens.

A step's tokens arrive flattened, decode-like requests first:

    tokens:  | d0 | d1 | ... | d{B-1} | prefill chunk 0 ......... | chunk 1 ..... |
              one query token each       q_len tokens, context = cached + chunk

* Decode rows (one query token per request), sorted by context length and cut
  into a few groups of similar length (so short contexts are not padded to the
  longest): the blocks of a group are gathered in one copy ([rows, max_blocks]
  block table), and the query heads
  are grouped under their KV head, so one SDPA call over (B, kv_heads) with the
  G = heads / kv_heads query heads as the "query length" does all of them with no
  repeat of K/V. Padding beyond each context is masked.
* Prefill chunks: one call per chunk (a loop over requests, not tokens). With the
  CPU kernels (engine/model/cpu_kernels.py) a native causal kernel reads the
  chunk's K/V in place: a fresh prompt's own rows, or the context blocks after a
  cached prefix or an earlier chunk. Otherwise SDPA: a chunk that starts at
  position 0 attends to its own fresh K/V with is_causal; a chunk after a cached
  prefix or an earlier chunk gathers its context blocks and uses a causal mask
  shifted by the context length.

`AttentionMetadata` is built once per step by the runner; every layer reuses it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kv_cache import KVOrder

log = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    start: int  # first token index in the flattened batch
    end: int
    context_len: int  # tokens visible to the last query (cached + this chunk)
    block_ids: torch.Tensor | None  # [n_blocks] blocks covering the context; None when the chunk is the whole context
    mask: torch.Tensor | None  # [q_len, context_len] bool, None when is_causal suffices


@dataclass
class DecodeGroup:
    """Decode rows [start, end) of similar context length, padded to the longest of them."""

    start: int
    end: int
    block_table: torch.Tensor  # [rows, max_blocks]
    mask: torch.Tensor  # [rows, 1, 1, max_blocks * block_size] bool, True = attend
    lens: torch.Tensor | None = None  # [rows] int64 context lengths (the CPU kernel reads these, not the mask)

    def context_lens(self) -> torch.Tensor:
        """[rows] context lengths: `lens`, or counted from the mask where the runner gave none."""
        return self.lens if self.lens is not None else self.mask.view(self.end - self.start, -1).sum(-1)


@dataclass
class AttentionMetadata:
    slot_block: torch.Tensor  # [T] block id of each token's KV slot
    slot_offset: torch.Tensor  # [T] slot inside the block
    slot_mapping: torch.Tensor  # [T] block * block_size + offset
    num_decode: int
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # cover rows [0, num_decode)
    prefills: list[PrefillChunk] = field(default_factory=list)

    def to(self, device: torch.device) -> AttentionMetadata:
        """A copy on `device` (ranks of a worker on other devices receive the leader's metadata)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return AttentionMetadata(
            slot_block=self.slot_block.to(device),
            slot_offset=self.slot_offset.to(device),
            slot_mapping=self.slot_mapping.to(device),
            num_decode=self.num_decode,
            decode_groups=[
                DecodeGroup(g.start, g.end, g.block_table.to(device), g.mask.to(device), mv(g.lens))
                for g in self.decode_groups
            ],
            prefills=[PrefillChunk(c.start, c.end, c.context_len, mv(c.block_ids), mv(c.mask)) for c in self.prefills],
        )


def write_kv(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    md: AttentionMetadata,
    order: KVOrder,
) -> None:
    """Store this step's K/V ([T, kv_heads, dim]) into their slots."""
    if order is KVOrder.NHD:
        nb, bs, h, d = cache_k.shape
        cache_k.view(nb * bs, h, d).index_copy_(0, md.slot_mapping, k)
        cache_v.view(nb * bs, h, d).index_copy_(0, md.slot_mapping, v)
    else:
        cache_k[md.slot_block, :, md.slot_offset] = k
        cache_v[md.slot_block, :, md.slot_offset] = v


def cache_geometry(cache: torch.Tensor, order: KVOrder) -> tuple[tuple[int, int, int], int]:
    """((block, slot, head) element strides, block size) of one K or V cache: what the native kernels index by."""
    sb, s1, s2 = cache.stride(0), cache.stride(1), cache.stride(2)
    if order is KVOrder.NHD:
        return (sb, s1, s2), cache.shape[1]
    return (sb, s2, s1), cache.shape[2]


_ONE_BLOCK = torch.zeros(1, dtype=torch.int64)  # a fresh prompt's own K/V rows, passed as block 0


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, order: KVOrder) -> torch.Tensor:
    """Blocks -> [..., kv_heads, tokens, dim] (tokens = n_blocks * block_size)."""
    # index_select over flattened blocks: one contiguous copy per block (~4x faster than cache[block_ids])
    nb = cache.shape[0]
    g = cache.view(nb, -1).index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, *cache.shape[1:])
    # NHD: [..., n, bs, h, d]   HND: [..., n, h, bs, d]
    if order is KVOrder.NHD:
        *lead, n, bs, h, d = g.shape
        return g.reshape(*lead, n * bs, h, d).transpose(-3, -2)
    *lead, n, h, bs, d = g.shape
    return g.transpose(-4, -3).reshape(*lead, h, n * bs, d)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    md: AttentionMetadata,
    order: KVOrder,
    scale: float,
    kernels=None,
    q_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, heads, dim]; k, v: [T, kv_heads, dim] (already written to the cache) -> [T, heads * dim].

    With `kernels` (engine/model/cpu_kernels.py, float32 or bf16 on CPU) decode rows and prefill chunks are attended by
    the native kernels, which read the cache blocks (or a fresh prompt's own K/V rows) in place; `q_rows` [T, row] is
    then the tensor whose rows start with q.
    """
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = md.decode_groups
    nhd = order is KVOrder.NHD
    triton = None
    if q.is_cuda or TRITON_ON_CPU:  # on CPU the layers' own path, with no lookup per layer
        triton = triton_kernels(q.device, q.dtype, dim, cache_k.shape[1] if nhd else cache_k.shape[2])

    def decode(g: DecodeGroup) -> torch.Tensor:
        if triton is not None:
            return triton.paged_decode(
                q[g.start : g.end], cache_k, cache_v, g.block_table, g.context_lens().to(q.device), scale, nhd
            )
        if kernels is not None and q_rows is not None:
            return _decode_attention_kernel(
                kernels, q_rows[g.start : g.end], cache_k, cache_v, g, order, scale, heads, kv_heads, dim
            )
        return _decode_attention(q[g.start : g.end], cache_k, cache_v, g, order, scale, kv_heads)

    if len(groups) == 1 and groups[0].end == t:  # decode-only step, one group: no scatter
        return decode(groups[0]).view(t, heads * dim)
    out = torch.empty_like(q)
    for g in groups:
        out[g.start : g.end] = decode(g).view(g.end - g.start, heads, dim)
    for c in md.prefills:
        if triton is not None and c.block_ids is not None:  # after a prefix or an earlier chunk: blocks in place
            out[c.start : c.end] = triton.paged_prefill(
                q[c.start : c.end], cache_k, cache_v, c.block_ids, c.context_len, scale, nhd
            )
            continue
        if kernels is not None and q_rows is not None:
            oc = _prefill_attention_kernel(kernels, q, k, v, cache_k, cache_v, c, order, scale)
            if oc is not None:
                out[c.start : c.end] = oc.view(c.end - c.start, heads, dim)
                continue
        qc = q[c.start : c.end].transpose(0, 1).unsqueeze(0)  # [1, heads, q, d]
        if c.block_ids is None:
            kc = k[c.start : c.end].transpose(0, 1).unsqueeze(0)
            vc = v[c.start : c.end].transpose(0, 1).unsqueeze(0)
        else:
            kc = _gather(cache_k, c.block_ids, order)[:, : c.context_len].unsqueeze(0)
            vc = _gather(cache_v, c.block_ids, order)[:, : c.context_len].unsqueeze(0)
        oc = F.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None, scale=scale, enable_gqa=heads != kv_heads
        )
        out[c.start : c.end] = oc.squeeze(0).transpose(0, 1)
    return out.view(t, heads * dim)


def _prefill_attention_kernel(
    kernels,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    c: PrefillChunk,
    order: KVOrder,
    scale: float,
) -> torch.Tensor | None:
    """The native prefill attention (causal, K/V read in place): [q_len, heads * dim], or None where the chunk's
    K/V are not laid out as the kernel reads them (torch's path then). The kernel applies the causal mask shifted
    by the context itself: `c.mask` is always exactly that (model_runner.py builds no other)."""
    qc = q[c.start : c.end]
    if c.block_ids is None:  # a fresh prompt: its own K/V rows, one block of q_len tokens
        kc, vc = k[c.start : c.end], v[c.start : c.end]
        if kc.stride() != vc.stride() or kc.stride(2) != 1:
            return None
        return kernels.paged_prefill_attention(
            qc, kc, vc, (0, kc.stride(0), kc.stride(1)), _ONE_BLOCK, c.end - c.start, c.context_len, k.shape[1], scale
        )
    strides, block_size = cache_geometry(cache_k, order)
    blocks = c.block_ids if c.block_ids.dtype == torch.int64 else c.block_ids.long()
    return kernels.paged_prefill_attention(
        qc, cache_k, cache_v, strides, blocks.contiguous(), block_size, c.context_len, k.shape[1], scale
    )


def _decode_attention_kernel(
    kernels,
    q_rows: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    group: DecodeGroup,
    order: KVOrder,
    scale: float,
    heads: int,
    kv_heads: int,
    dim: int,
) -> torch.Tensor:
    """The native decode attention: [rows, heads * dim], no gather of the blocks, no padding."""
    strides, block_size = cache_geometry(cache_k, order)
    return kernels.paged_decode_attention(
        q_rows,
        cache_k,
        cache_v,
        strides,
        group.block_table,
        group.context_lens(),
        block_size,
        heads,
        kv_heads,
        dim,
        scale,
    )


def _decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    group: DecodeGroup,
    order: KVOrder,
    scale: float,
    kv_heads: int,
) -> torch.Tensor:
    """One query token per request: [B, heads, dim] -> [B, heads, dim]."""
    b, heads, dim = q.shape
    qd = q.reshape(b, kv_heads, heads // kv_heads, dim)  # query heads grouped under their KV head
    kd = _gather(cache_k, group.block_table, order)  # [B, kv_heads, L, dim]
    vd = _gather(cache_v, group.block_table, order)
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scale)
    return od.reshape(b, heads, dim)


# ---- the Triton kernels on CUDA ------------------------------------------------------------------------------------

# (device, dtype, head dim, block size) -> engine/model/triton_attention, None: the gather path
_TRITON: dict[tuple[torch.device, torch.dtype, int, int], object] = {}
ATTENTION_ENV = "TANDEM_PAGED_ATTENTION"  # auto (default), triton (on any device; fail if it cannot run), gather
# CPU tensors go to the kernels only when forced (Triton's interpreter: tests); read once, at import
TRITON_ON_CPU = os.environ.get(ATTENTION_ENV, "auto").strip().lower() == "triton"


def triton_kernels(device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 64, block_size: int = 16):
    """engine/model/triton_attention for this device, dtype and cache geometry, or None for the gather path
    (and the CPU kernels).

    auto (default): the Triton kernels on CUDA, when Triton imports and they agree with the gather path on a
    self-check in this dtype, head dimension and block size at first use (both cache orders, GQA, a prefix),
    else the gather path with a warning; never on CPU. triton: on any device (CPU runs them in Triton's
    interpreter, TRITON_INTERPRET=1: tests), an error if they cannot run. gather: never."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype, head_dim, block_size)
    if key in _TRITON:
        return _TRITON[key]
    choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower()
    if choice not in ("auto", "triton", "gather"):
        raise ValueError(f"{ATTENTION_ENV}={choice!r}: use auto, triton or gather")
    module = None
    if choice == "triton" or (choice == "auto" and device.type == "cuda"):
        try:
            from engine.model import triton_attention

            _self_check(triton_attention, device, dtype, head_dim, block_size)
            module = triton_attention
        except Exception as exc:  # noqa: BLE001 - Triton missing, a compile error or a mismatch: the gather path
            if choice == "triton":
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            log.warning(
                "paged attention on %s (%s, head dim %d, block size %d): the gather path (Triton kernels "
                "unusable: %s: %s)",
                device,
                dtype,
                head_dim,
                block_size,
                type(exc).__name__,
                first,
            )
    _TRITON[key] = module
    return module


def _self_check(kernels, device: torch.device, dtype: torch.dtype, dim: int, bs: int) -> None:
    """The kernels against the gather path on a small random paged cache in the served dtype and geometry."""
    gen = torch.Generator().manual_seed(0)
    kv_heads, heads = 2, 4
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    scale = 1 / math.sqrt(dim)
    lens = [max(1, 2 * bs + bs // 2), 3 * bs + 1]  # mid-block and just past a block boundary
    nblk = 4
    for order in KVOrder:
        shape = (2 * nblk, bs, kv_heads, dim) if order is KVOrder.NHD else (2 * nblk, kv_heads, bs, dim)
        ck, cv = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
        table = torch.tensor([[5, 2, 7, 0], [1, 6, 3, 4]], device=device)
        t_lens = torch.tensor(lens, device=device)
        q = torch.randn(2, heads, dim, generator=gen).to(device, dtype)
        mask = (torch.arange(nblk * bs, device=device)[None, :] < t_lens[:, None]).view(2, 1, 1, -1)
        group = DecodeGroup(0, 2, table, mask, t_lens)
        want = _decode_attention(q, ck, cv, group, order, scale, kv_heads)
        got = kernels.paged_decode(q, ck, cv, table, t_lens, scale, order is KVOrder.NHD)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        ctx = lens[1]
        q_len = min(ctx, bs + 5)  # a chunk after a cached prefix
        qp = torch.randn(q_len, heads, dim, generator=gen).to(device, dtype)
        kd = _gather(ck, table[1], order)[:, :ctx]
        vd = _gather(cv, table[1], order)[:, :ctx]
        causal = torch.ones(q_len, ctx, dtype=torch.bool, device=device).tril(ctx - q_len)
        want_p = F.scaled_dot_product_attention(
            qp.transpose(0, 1)[None], kd[None], vd[None], attn_mask=causal, scale=scale, enable_gqa=True
        )[0].transpose(0, 1)
        got_p = kernels.paged_prefill(qp, ck, cv, table[1], ctx, scale, order is KVOrder.NHD)
        torch.testing.assert_close(got_p.float(), want_p.float(), atol=tol, rtol=tol)
