"""The Llama-family decoder (Llama, SmolLM2, TinyLlama, Mistral, Qwen2).

One module serves all three architectures: they differ only in data (Qwen2 has
a bias on q/k/v, Llama 3 scales rope, some tie the head to the embedding). A
model instance holds one pipeline stage (a layer range) of one tensor-parallel
rank; with the defaults it is the whole model on one rank.

Per layer, per step (T tokens flattened):

    h ── rms_norm ── qkv ── rope(q,k) ── write K,V to cache ── paged attention ── o_proj ──(+)── rms_norm ── gate|up ── silu*mul ── down ──(+)──>
    └──────────────────────────────────────────────────────────────────────────────────────┘  └──────────────────────────────────────────────┘
"""

from __future__ import annotations

import os
import re
from typing import Iterable, cast

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelLoadError
from engine.config import ModelConfig
from engine.kv_cache import KVOrder
from engine.model.attention import (
    TRITON_ON_CPU,
    AttentionMetadata,
    DecodeGroup,
    cache_geometry,
    paged_attention,
    write_kv,
)
from engine.model.cpu_kernels import MAX_HEAD_DIM, CpuKernels, cpu_kernels
from engine.model.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.model.linear import LinearBase, MergedColumnLinear, QKVLinear, RowParallelLinear
from engine.model.parallel import SINGLE_RANK, ParallelContext
from engine.model.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, *, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # HF normalises in float32, casts back, then scales in the model dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


NATIVE_DECODE_ENV = "TANDEM_NATIVE_DECODE"  # 0: decode steps run layer by layer in Python (the same kernels and bits)
# float32 decode steps of up to this many rows run in the native call on the packed kernel even where the per-layer
# path sends them to oneDNN (over F32_AVX2_KERNEL_MAX_ROWS on AVX2): 13-17 % faster at 48-96 rows there
# (docs/BENCHMARKS.md, "A decode step in one native call"); the packed kernel's sums do not depend on the batch
NATIVE_DECODE_F32_MAX_ROWS = 96


def _one_table(groups: list[DecodeGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode groups' block tables and context lengths as one [rows, max_blocks] table and [rows] lengths."""
    groups = sorted(groups, key=lambda g: g.start)
    lens = [g.context_lens() for g in groups]
    if len(groups) == 1:
        return groups[0].block_table.long().contiguous(), lens[0].long().contiguous()
    width = max(g.block_table.shape[1] for g in groups)
    table = torch.cat([F.pad(g.block_table, (0, width - g.block_table.shape[1])) for g in groups])
    return table.long().contiguous(), torch.cat(lens).long().contiguous()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, device, pc: ParallelContext):
        super().__init__()
        kw = dict(dtype=dtype, device=device, pc=pc)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, **kw
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, **kw)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, **kw)
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self._k: CpuKernels | None = None  # once finalize() finds float32 on a CPU with the kernels built

    def finalize(self) -> None:
        w = self.input_layernorm.weight
        if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and self.head_dim <= MAX_HEAD_DIM:
            self._k = cpu_kernels()

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        md: AttentionMetadata,
        order: KVOrder,
    ) -> torch.Tensor:
        if self._k is not None:
            return self._forward_cpu_kernels(h, cos, sin, cache, md, order)
        t = h.shape[0]
        d = self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(h))
        nq, nkv = self.num_heads, self.num_kv_heads
        qk = apply_rope(qkv[:, : (nq + nkv) * d].view(t, nq + nkv, d), cos, sin)
        q, k = qk[:, :nq], qk[:, nq:]
        v = qkv[:, (nq + nkv) * d :].view(t, nkv, d)
        write_kv(cache[0], cache[1], k, v, md, order)
        attn = paged_attention(q, k, v, cache[0], cache[1], md, order, self.scale)
        h = h + self.o_proj(attn)
        gu = self.gate_up_proj(self.post_attention_layernorm(h))
        inter = gu.shape[-1] // 2
        return h + self.down_proj(F.silu(gu[:, :inter]) * gu[:, inter:])

    def _forward_cpu_kernels(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        md: AttentionMetadata,
        order: KVOrder,
    ) -> torch.Tensor:
        """The same layer on the native CPU kernels (float32 or bfloat16): about 10 calls where torch makes about 40.

        Norms, SiLU * up and rope are single kernels; rope rotates q and k inside the fused qkv row; the residual
        adds ride on o_proj and down_proj; decode rows attend over the cache blocks in place.
        """
        k_ = self._k
        if k_ is None:
            raise RuntimeError("the native layer path runs only after finalize() found the CPU kernels")
        t, d = h.shape[0], self.head_dim
        nq, nkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(k_.rms_norm(h, self.input_layernorm.weight, self.eps))
        k_.rope_(qkv, nq + nkv, cos, sin)
        qk = qkv[:, : (nq + nkv) * d].view(t, nq + nkv, d)
        q, k = qk[:, :nq], qk[:, nq:]
        v = qkv[:, (nq + nkv) * d :].view(t, nkv, d)
        write_kv(cache[0], cache[1], k, v, md, order)
        attn = paged_attention(q, k, v, cache[0], cache[1], md, order, self.scale, kernels=k_, q_rows=qkv)
        h = self.o_proj(attn, residual=h)
        gu = self.gate_up_proj(k_.rms_norm(h, self.post_attention_layernorm.weight, self.eps))
        return self.down_proj(k_.silu_mul(gu), residual=h)


class LlamaModel(nn.Module):
    """Embedding (first stage) -> layers [layer_start, layer_end) -> norm + head (last stage)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        pc: ParallelContext = SINGLE_RANK,
        layer_range: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.layer_start, self.layer_end = layer_range or (0, cfg.num_layers)
        self.is_first = self.layer_start == 0
        self.is_last = self.layer_end == cfg.num_layers
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device, pc=pc)
            if self.is_first
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, dtype=dtype, device=device, pc=pc) for _ in range(self.layer_start, self.layer_end)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device) if self.is_last else None
        self.lm_head = (
            ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device, pc=pc) if self.is_last else None
        )
        if self.lm_head is not None and cfg.tie_word_embeddings and self.embed_tokens is not None:
            self.lm_head.tie_to(self.embed_tokens)
        self.rope = RotaryEmbedding(cfg, dtype, device)
        self._native: torch.Tensor | None | bool = False  # the decode-layers call's weight addresses; False: unchecked
        self._native_ptrs: tuple[int, torch.Tensor] | None = None  # (the KV cache's address, its full address table)

    def _decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, m) for m in self.layers]

    def _native_weights(self) -> torch.Tensor | None:
        """[layers, 12] int64 weight addresses for `CpuKernels.decode_layers` (columns 10, 11, the caches, filled per
        step), taken once after load_weights (whatever replaces a packed weight or a layer's kernels later must set
        `_native = False` again), or None where a decode step cannot run its layers in one native call: no CPU kernels, tensor
        parallelism, a linear without a packed weight, or NATIVE_DECODE_ENV=0."""
        if self._native is not False:
            return self._native  # type: ignore[return-value]
        layers = self._decoder_layers()
        self._native = None
        if os.environ.get(NATIVE_DECODE_ENV, "1") == "0" or not layers:
            return None
        k = layers[0]._k
        if k is None or any(layer._k is not k or layer.qkv_proj.pc.tp_size != 1 for layer in layers):
            return None
        rows = []
        for layer in layers:
            linears = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
            if any(lin._packed is None or lin._kernel is None for lin in linears):
                return None
            addr = [layer.input_layernorm.weight.data_ptr()]
            for i, lin in enumerate(linears):
                if i == 2:
                    addr.append(layer.post_attention_layernorm.weight.data_ptr())
                assert lin._packed is not None
                addr += [lin._packed.data_ptr(), lin.bias.data_ptr() if lin.bias is not None else 0]
            rows.append(addr + [0, 0])
        self._native = torch.tensor(rows, dtype=torch.int64)
        return self._native

    def _native_decode(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        order,
    ) -> bool:
        """Run a decode-only step's layers in one native call, h updated in place; False where it does not apply (a
        prefill chunk in the step, more rows than the packed kernel takes: 12 in bf16, NATIVE_DECODE_F32_MAX_ROWS or
        more in float32): the per-layer path runs instead. Up to the per-layer path's own kernel limit the two give
        the same bits; above it (float32 on AVX2, 33 to 96 rows) the native call keeps the packed kernel where the
        per-layer path uses oneDNN, so the logits differ by float32 rounding."""
        t = h.shape[0]
        if md.prefills or md.num_decode != t or not md.decode_groups or h.dtype not in (torch.float32, torch.bfloat16):
            return False
        if TRITON_ON_CPU:  # TANDEM_PAGED_ATTENTION=triton: decode rows go to the Triton kernels, layer by layer
            return False
        weights = self._native_weights()
        if weights is None:
            return False
        first = cast(DecoderLayer, self.layers[0])
        limit = first.qkv_proj._kernel_max_rows
        if h.dtype == torch.float32:
            limit = max(limit, NATIVE_DECODE_F32_MAX_ROWS)
        if t > limit or not h.is_contiguous():
            return False
        if self._native_ptrs is None or self._native_ptrs[0] != kv_cache.data_ptr():  # once per KV cache
            ptrs = weights.clone()
            ptrs[:, 10] = torch.tensor([kv_cache[i][0].data_ptr() for i in range(len(self.layers))])
            ptrs[:, 11] = torch.tensor([kv_cache[i][1].data_ptr() for i in range(len(self.layers))])
            self._native_ptrs = (kv_cache.data_ptr(), ptrs)
        ptrs = self._native_ptrs[1]
        table, lens = _one_table(md.decode_groups)
        strides, block_size = cache_geometry(kv_cache[0][0], order)
        assert first._k is not None
        first._k.decode_layers(
            ptrs,
            h,
            cos,
            sin,
            md.slot_block,
            md.slot_offset,
            strides,
            table,
            lens,
            block_size,
            first.num_heads,
            first.num_kv_heads,
            first.head_dim,
            first.down_proj.in_features,
            first.eps,
            first.scale,
        )
        return True

    @torch.inference_mode()
    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        order: KVOrder,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, hidden states [T, H] otherwise.

        Returns hidden states [T, H] on a middle stage, logits [len(logits_indices), V] on the last.
        """
        h = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # None: not the first stage
        cos, sin = self.rope.tables(positions)
        if not (h.device.type == "cpu" and self._native_decode(h, cos, sin, kv_cache, md, order)):
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, kv_cache[i], md, order)
        if self.norm is None or self.lm_head is None:  # not the last stage
            return h
        if logits_indices is not None:
            h = h[logits_indices]
        return self.lm_head(self.norm(h)).float()

    # ---- weights -------------------------------------------------------------------------------------------------

    _LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
    _STACKED = {
        "self_attn.q_proj": ("qkv_proj", "q"),
        "self_attn.k_proj": ("qkv_proj", "k"),
        "self_attn.v_proj": ("qkv_proj", "v"),
        "mlp.gate_proj": ("gate_up_proj", 0),
        "mlp.up_proj": ("gate_up_proj", 1),
        "self_attn.o_proj": ("o_proj", None),
        "mlp.down_proj": ("down_proj", None),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors, keeping only this rank's shards of this stage's layers."""
        seen: set[str] = set()
        for name, tensor in weights:
            target = self._route(name)
            if target is None:
                continue
            module, param_name, shard_id = target
            param = getattr(module, param_name)
            loader = getattr(module, "weight_loader", None)
            src = tensor.to(param.dtype)
            if loader is not None and param_name in ("weight", "bias"):
                loader(param, src, shard_id)
            else:
                LinearBase._copy(param.data, src, name)
            seen.add(f"{id(module)}.{param_name}.{shard_id}")
        expected = self._expected_keys()
        missing = sorted(expected - seen)
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors this model needs, e.g. {missing[0]}")
        for m in self.modules():
            if isinstance(m, (LinearBase, ParallelLMHead, DecoderLayer)):
                m.finalize()
        self._native, self._native_ptrs = False, None  # finalize() made new packed weights: addresses taken again

    def _route(self, name: str):
        if name == "model.embed_tokens.weight":
            if self.embed_tokens is not None:
                return self.embed_tokens, "weight", None
            if self.lm_head is not None and self.cfg.tie_word_embeddings:
                return self.lm_head, "weight", None  # tied head on a last stage without the embedding
            return None
        if name == "lm_head.weight":
            return (
                (self.lm_head, "weight", None)
                if self.lm_head is not None and not self.cfg.tie_word_embeddings
                else None
            )
        if name == "model.norm.weight":
            return (self.norm, "weight", None) if self.norm is not None else None
        m = self._LAYER.fullmatch(name)
        if m is None:
            return None  # e.g. rotary inv_freq buffers
        idx = int(m.group(1))
        if not self.layer_start <= idx < self.layer_end:
            return None
        layer = self.layers[idx - self.layer_start]
        rest = m.group(2)
        module_path, _, param_name = rest.rpartition(".")
        if module_path in self._STACKED:
            attr, shard = self._STACKED[module_path]
            return getattr(layer, attr), param_name, shard
        if module_path in ("input_layernorm", "post_attention_layernorm"):
            return getattr(layer, module_path), param_name, None
        raise ModelLoadError(f"unexpected tensor in checkpoint: {name}")

    def _expected_keys(self) -> set[str]:
        keys: set[str] = set()
        if self.embed_tokens is not None:
            keys.add(f"{id(self.embed_tokens)}.weight.None")
        if self.lm_head is not None:
            if not self.cfg.tie_word_embeddings:
                keys.add(f"{id(self.lm_head)}.weight.None")
            elif self.embed_tokens is None:
                keys.add(f"{id(self.lm_head)}.weight.None")
            keys.add(f"{id(self.norm)}.weight.None")
        for layer in self.layers:
            for shard in ("q", "k", "v"):
                keys.add(f"{id(layer.qkv_proj)}.weight.{shard}")
                if self.cfg.attention_bias:
                    keys.add(f"{id(layer.qkv_proj)}.bias.{shard}")
            for part in (0, 1):
                keys.add(f"{id(layer.gate_up_proj)}.weight.{part}")
            for mod in (layer.o_proj, layer.down_proj):
                keys.add(f"{id(mod)}.weight.None")
            for mod in (layer.input_layernorm, layer.post_attention_layernorm):
                keys.add(f"{id(mod)}.weight.None")
        return keys
