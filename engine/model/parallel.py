"""Tensor-parallel context of one model rank.

A `ParallelContext` tells each layer which slice of the weights it owns and how
to combine partial results. With `tp_size == 1` (the only shape built so far)
every collective is the identity, so the single-rank path pays nothing; the
tensor-parallel issue plugs a `torch.distributed` group in here without changing
the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.errors import ConfigError


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    # Sum partial outputs across the TP group (row-parallel layers).
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    # Concatenate along the last dim across the TP group (vocab-parallel head).
    all_gather_last_dim: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"invalid tensor-parallel rank {self.tp_rank} of size {self.tp_size}")

    def split(self, total: int, what: str) -> tuple[int, int]:
        """The [start, end) slice of `total` items this rank holds; `total` must divide."""
        if total % self.tp_size:
            raise ConfigError(f"{what} ({total}) is not divisible by tensor-parallel size {self.tp_size}")
        per = total // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        """KV heads held by this rank; replicated when there are fewer KV heads than ranks."""
        if num_kv_heads >= self.tp_size:
            return self.split(num_kv_heads, "num_kv_heads")
        if self.tp_size % num_kv_heads:
            raise ConfigError(
                f"tensor-parallel size {self.tp_size} must be a multiple of num_kv_heads ({num_kv_heads}) to replicate them"
            )
        head = self.tp_rank * num_kv_heads // self.tp_size
        return head, head + 1


SINGLE_RANK = ParallelContext()
