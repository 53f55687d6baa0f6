"""ModelShard: what one model rank holds: its weights and its slice of the KV cache.

A worker of tp x pp ranks has one shard per rank (one process each). A shard of
`RankPosition(tp_rank, tp, pp_rank, pp)` holds

    layers   stage_layers(num_layers, pp, pp_rank)          (pipeline stage)
    weights  its column/row/vocab slice of those layers     (engine/model/linear.py)
    KV heads ParallelContext.kv_head_range(num_kv_heads)     (split, or replicated
                                                              when tp > num_kv_heads)
    KV cache [its layers, K|V, num_blocks, ...] for those heads

Every rank of a worker has the same num_blocks (one block pool, in the leader), so
a block id means the same tokens on every rank. With tp = pp = 1 a shard is the
whole model; `LocalExecutor` runs it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.config import EngineConfig, ModelConfig
from engine.device import resolve_device, resolve_dtype
from engine.kv_cache import KVCacheSpec, KVOrder, allocate_kv_cache, blocks_for_budget
from engine.loader.source import ModelSource
from engine.model.attention import AttentionMetadata
from engine.model.llama import LlamaModel
from engine.model.parallel import SINGLE_RANK, ParallelContext, RankPosition, check_shape, stage_layers


@dataclass
class ModelInputs:
    """What every rank needs for one step (picklable; built once by the leader)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    md: AttentionMetadata
    logits_indices: torch.Tensor  # [rows to sample]

    def to(self, device: torch.device) -> ModelInputs:
        if self.input_ids.device == device:
            return self
        return ModelInputs(
            self.input_ids.to(device), self.positions.to(device), self.md.to(device), self.logits_indices.to(device)
        )


def rank_kv_spec(
    cfg: ModelConfig, config: EngineConfig, pos: RankPosition, dtype: torch.dtype, device: str, num_blocks: int = 1
) -> KVCacheSpec:
    """The KV cache descriptor of the rank at `pos` (pure: start-up validation calls it too)."""
    layer_start, layer_end = stage_layers(cfg.num_layers, pos.pp_size, pos.pp_rank)
    head_start, head_end = ParallelContext(pos.tp_rank, pos.tp_size).kv_head_range(cfg.num_kv_heads)
    return KVCacheSpec(
        num_layers=layer_end - layer_start,
        layer_start=layer_start,
        total_layers=cfg.num_layers,
        num_kv_heads=head_end - head_start,
        head_start=head_start,
        total_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=config.cache.block_size,
        num_blocks=num_blocks,
        dtype=dtype,
        order=KVOrder(config.cache.kv_order),
        device=device,
    )


class ModelShard:
    """One rank's model slice and KV cache. `allocate(num_blocks)` before `forward`."""

    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        pos: RankPosition = RankPosition(),
        pc: ParallelContext = SINGLE_RANK,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        cfg = source.config
        par = config.parallel
        if (pos.tp_size, pos.pp_size) != (par.tensor_parallel_size, par.pipeline_parallel_size):
            raise ValueError(
                f"{pos.describe()} does not fit the configured tp={par.tensor_parallel_size} "
                f"pp={par.pipeline_parallel_size}"
            )
        check_shape(cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, pos.tp_size, pos.pp_size, cfg.intermediate_size)
        self.config = config
        self.pos = pos
        self.model_config = cfg
        self.device = device or resolve_device(config.device)
        # the leader resolves "auto" once and hands every rank the same dtype (their caches must agree)
        self.dtype = dtype or resolve_dtype(config.dtype, self.device, cfg.hidden_size, cfg.intermediate_size)
        layers = stage_layers(cfg.num_layers, pos.pp_size, pos.pp_rank)
        self.model = LlamaModel(cfg, dtype=self.dtype, device=self.device, pc=pc, layer_range=layers)
        self.model.load_weights(source.iter_weights())
        self.model.eval()
        self.kv_spec = rank_kv_spec(cfg, config, pos, self.dtype, str(self.device))
        self.kv_cache: torch.Tensor | None = None

    def max_blocks(self) -> int:
        """Blocks this rank's cache budget holds (the leader takes the minimum over ranks)."""
        cc = self.config.cache
        return cc.num_blocks or blocks_for_budget(cc.kv_cache_memory_bytes, self.kv_spec.bytes_per_block)

    def allocate(self, num_blocks: int) -> KVCacheSpec:
        self.kv_spec = replace(self.kv_spec, num_blocks=num_blocks)
        self.kv_cache = allocate_kv_cache(self.kv_spec)
        return self.kv_spec

    def forward(self, inputs: ModelInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, H] on a non-last stage, logits [rows, V] (float32) on the last.

        The first stage embeds inputs.input_ids; later stages take `hidden` from the stage before.
        """
        if self.kv_cache is None:
            raise RuntimeError("ModelShard.forward before allocate()")
        x = inputs.input_ids if self.pos.is_first_stage else hidden
        return self.model(x, inputs.positions, self.kv_cache, inputs.md, self.kv_spec.order, inputs.logits_indices)
