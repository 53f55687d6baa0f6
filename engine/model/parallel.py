"""Where one model rank sits in its worker, and what it owns.

`RankPosition` is the (tp_rank, pp_rank) coordinate of a rank in a worker of
tp x pp ranks; `stage_layers` and `ParallelContext.kv_head_range` are the ONLY
functions that decide which layers and KV heads a rank holds (the engine, the KV
layouts a worker advertises and start-up validation all call them).

A `ParallelContext` tells each layer which slice of the weights it owns and how
to combine partial results. With `tp_size == 1` every collective is the identity,
so the single-rank path pays nothing; `engine.distributed` plugs a
`torch.distributed` group in for tp > 1 without changing the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from common.errors import ConfigError


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
                f"tensor-parallel size {self.tp_size} must be a multiple of num_kv_heads ({num_kv_heads}) "
                "to replicate them"
            )
        head = self.tp_rank * num_kv_heads // self.tp_size
        return head, head + 1


SINGLE_RANK = ParallelContext()


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """The [start, end) layer range of pipeline stage `pp_rank`: even split, the remainder to the first stages."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConfigError(f"invalid pipeline stage {pp_rank} of {pp_size}")
    if pp_size > num_layers:
        raise ConfigError(f"pipeline-parallel size {pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


@dataclass(frozen=True)
class RankPosition:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"invalid tensor-parallel rank {self.tp_rank} of {self.tp_size}")
        if self.pp_size < 1 or not 0 <= self.pp_rank < self.pp_size:
            raise ConfigError(f"invalid pipeline stage {self.pp_rank} of {self.pp_size}")

    @classmethod
    def of(cls, global_rank: int, tp_size: int, pp_size: int) -> RankPosition:
        return cls(global_rank % tp_size, tp_size, global_rank // tp_size, pp_size)

    @property
    def rank(self) -> int:
        """Global rank inside the worker: stage-major."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_ranks(self, pp_rank: int | None = None) -> list[int]:
        """Global ranks of one stage's TP group (this rank's stage by default)."""
        stage = self.pp_rank if pp_rank is None else pp_rank
        return [stage * self.tp_size + t for t in range(self.tp_size)]

    def describe(self) -> str:
        return f"rank {self.rank} (tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}/{self.pp_size})"


def check_shape(
    num_heads: int, num_kv_heads: int, num_layers: int, tp_size: int, pp_size: int, intermediate_size: int | None = None
) -> None:
    """Raise ConfigError unless a model of these head/layer/MLP sizes can run as tp x pp ranks."""
    if num_heads % tp_size:
        raise ConfigError(f"num_heads ({num_heads}) is not divisible by tensor-parallel size {tp_size}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ConfigError(
            f"num_kv_heads ({num_kv_heads}) and tensor-parallel size {tp_size}: one must divide the other"
        )
    if intermediate_size is not None and intermediate_size % tp_size:
        raise ConfigError(f"intermediate_size ({intermediate_size}) is not divisible by tensor-parallel size {tp_size}")
    if pp_size > num_layers:
        raise ConfigError(f"pipeline-parallel size {pp_size} exceeds the model's {num_layers} layers")
