"""Paged attention in Triton: decode rows and prefill chunks read K/V from the cache blocks in place.

The gather path (attention.py `_gather`) copies every block a step attends to into a new tensor
before SDPA; on a GPU that copy is as large as the attention read itself. These kernels instead
look each key position's block up in the block table and load it where it lies, for both cache
orders (NHD and HND differ only in the slot and head strides):

* `paged_decode`: one program per (decode row, KV head); the G = heads / kv_heads query heads
  of that KV head share each K/V tile (GQA without repeating K/V); online softmax over tiles of
  BLOCK_N positions, fp32 accumulation.
* `paged_prefill`: one chunk of one request (a cached prefix and/or earlier chunks before it):
  one program per (tile of BLOCK_M queries, query head); causal mask shifted by the context
  before the chunk; tl.dot on tiles, fp32 accumulation.

Float32 dots use IEEE precision (no TF32), so the float path stays close to the reference; bf16 and fp16
dots use the tensor cores with fp32 accumulation (in Triton's interpreter they run in float32 instead: its
bf16 tl.dot is wrong, so the half-precision dot is checked only by the `gpu` tests).
Triton is imported lazily: CPU engines never need it. Tests run the same kernels on CPU with
TRITON_INTERPRET=1 (tests/unit/test_triton_attention.py); `gpu`-marked tests run them compiled.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_addr(bt_row, pos, ok, kvh, stride_kb, stride_ks, stride_kh, BS: tl.constexpr):
    """Element offsets of positions `pos` of KV head `kvh`, each in the block its block-table row names."""
    blk = tl.load(bt_row + pos // BS, mask=ok, other=0).to(tl.int64)
    return blk * stride_kb + (pos % BS) * stride_ks + kvh * stride_kh


@triton.jit
def _online_softmax(m, den, s):
    """One tile of scores `s` [rows, keys] into the running max `m` and denominator `den`:
    (new max, the tile's probabilities, the factor that rescales what was accumulated, new denominator)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    return m_new, p, alpha, den * alpha + tl.sum(p, axis=1)


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    Out,
    BT,
    LENS,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(LENS + row)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q_ptr = Q + row * stride_qb + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(0, length, BLOCK_N):
        pos = start + offs_n
        ok = pos < length
        addr = _kv_addr(BT + row * stride_bt, pos, ok, kvh, stride_kb, stride_ks, stride_kh, BS)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + addr[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new, p, alpha, den = _online_softmax(m, den, s)
        v = tl.load(V + addr[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / den[:, None]
    o_ptr = Out + row * stride_ob + (kvh * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_prefill_kernel(
    Q,
    K,
    V,
    Out,
    BT,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    q_len,
    context_len,
    scale,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // G
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < D
    before = context_len - q_len  # tokens cached before this chunk
    q_pos = before + offs_m  # each query's position in the sequence
    q_ptr = Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = tl.minimum(context_len, before + (tile + 1) * BLOCK_M)  # the last key this tile's queries see, + 1
    for start in range(0, hi, BLOCK_N):
        pos = start + offs_n
        ok = pos < hi
        addr = _kv_addr(BT, pos, ok, kvh, stride_kb, stride_ks, stride_kh, BS)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + addr[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & ok[None, :], s, float("-inf"))
        m_new, p, alpha, den = _online_softmax(m, den, s)
        v = tl.load(V + addr[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / den[:, None]
    o_ptr = Out + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _cache_strides(cache: torch.Tensor, nhd: bool) -> tuple[int, int, int, int]:
    """(block, slot, head) element strides of a [blocks, slots, heads, dim] (NHD) or [blocks, heads, slots,
    dim] (HND) cache, and its block size; the last dim must be contiguous."""
    if cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous")
    sb, s1, s2 = cache.stride(0), cache.stride(1), cache.stride(2)
    if nhd:
        return sb, s1, s2, cache.shape[1]
    return sb, s2, s1, cache.shape[2]


def _interpreting() -> bool:
    """Triton's interpreter (CPU tests) computes a bf16/fp16 tl.dot wrongly (numpy has no bf16): there the dots
    run in float32, which the GPU path does only for float32 inputs."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def paged_decode(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    nhd: bool = True,
    block_n: int | None = None,
) -> torch.Tensor:
    """q: [rows, heads, dim], one query token per row; block_table: [rows, max_blocks]; lens: [rows] context
    lengths (>= 1) -> [rows, heads, dim], in q's dtype. `block_n`: keys per tile (None: sized to the heads)."""
    rows, heads, dim = q.shape
    kv_heads = cache_k.shape[2] if nhd else cache_k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group under {kv_heads} KV heads")
    sb, ss, sh, bs = _cache_strides(cache_k, nhd)
    if _cache_strides(cache_v, nhd) != (sb, ss, sh, bs):
        raise ValueError("K and V caches must share one layout")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    g = heads // kv_heads
    if block_n is None:  # the [G, keys, dim] product in registers: about 8K floats per program
        block_n = max(8, min(64, _pow2(8192 // (_pow2(g) * _pow2(dim)))))
    _paged_decode_kernel[(rows, kv_heads)](
        q,
        cache_k,
        cache_v,
        out,
        block_table,
        lens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        sb,
        ss,
        sh,
        block_table.stride(0),
        scale,
        G=g,
        G_PAD=_pow2(g),
        D=dim,
        D_PAD=_pow2(dim),
        BS=bs,
        BLOCK_N=block_n,
    )
    return out


def paged_prefill(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_ids: torch.Tensor,
    context_len: int,
    scale: float,
    nhd: bool = True,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """q: [q_len, heads, dim], the chunk's queries (the last q_len positions of `context_len`, whose K/V are
    already in the cache); block_ids: [n] blocks covering the context -> [q_len, heads, dim]."""
    q_len, heads, dim = q.shape
    kv_heads = cache_k.shape[2] if nhd else cache_k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group under {kv_heads} KV heads")
    if not 0 < q_len <= context_len:
        raise ValueError(f"a chunk of {q_len} queries cannot end a context of {context_len} tokens")
    sb, ss, sh, bs = _cache_strides(cache_k, nhd)
    if block_ids.numel() * bs < context_len:
        raise ValueError(f"{block_ids.numel()} blocks of {bs} do not cover a context of {context_len} tokens")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    _paged_prefill_kernel[(triton.cdiv(q_len, block_m), heads)](
        q,
        cache_k,
        cache_v,
        out,
        block_ids,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        sb,
        ss,
        sh,
        q_len,
        context_len,
        scale,
        G=heads // kv_heads,
        D=dim,
        D_PAD=_pow2(dim, 16),
        BS=bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32 or _interpreting(),
    )
    return out
