"""The paged KV cache of one model rank: its layout, described here and only here.

One tensor is preallocated per rank (so a transport can register a single
region). Its shape depends on the `order`:

    NHD:  kv[layer, kv, block, slot, head, dim]     (default)
    HND:  kv[layer, kv, block, head, slot, dim]

    layer  0..num_layers-1 : local index of a layer in this rank's layer range
                             [layer_start, layer_end) of the full model (pipeline stages)
    kv     0 = K, 1 = V
    block  0..num_blocks-1 : physical block id, handed out by the BlockPool
    slot   0..block_size-1 : token position inside the block
                             (token t of a request lives in block table[t // block_size],
                              slot t % block_size)
    head   0..num_kv_heads-1 : local KV head; global head = head_start + head
    dim    0..head_dim-1

So the bytes of one (layer, K|V, block) are contiguous: block_size * num_kv_heads *
head_dim * itemsize bytes, at offset ((layer * 2 + kv) * num_blocks + block) times
that size. K is stored after rotary embedding (what attention reads), never before.

`KVCacheSpec` is the frozen descriptor the transfer layer will derive its layout
from; `allocate_kv_cache` is the one constructor of the tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from common.errors import ConfigError


class KVOrder(str, enum.Enum):
    NHD = "NHD"
    HND = "HND"


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # layers held by this rank
    layer_start: int  # first global layer index held
    total_layers: int
    num_kv_heads: int  # KV heads held by this rank
    head_start: int  # first global KV head held
    total_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype
    order: KVOrder = KVOrder.NHD
    device: str = "cpu"

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id occupies across every layer and K and V."""
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        inner = (
            (self.block_size, self.num_kv_heads, self.head_dim)
            if self.order is KVOrder.NHD
            else (self.num_kv_heads, self.block_size, self.head_dim)
        )
        return (self.num_layers, 2, self.num_blocks, *inner)


def blocks_for_budget(memory_bytes: int, bytes_per_block: int) -> int:
    n = memory_bytes // bytes_per_block
    if n < 1:
        raise ConfigError(
            f"KV cache budget of {memory_bytes} bytes holds no block of {bytes_per_block} bytes; "
            "raise kv_cache_memory_bytes"
        )
    return n


def allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    # zeros: lazily mapped on CPU, and never reads uninitialised memory as NaN
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)
