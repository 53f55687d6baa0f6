"""Loading a GGUF file (llama.cpp's single-file format) with the `gguf` package.

`load_gguf_file(path)` reads only the metadata and tensor table:

- config from `{arch}.*` keys (block_count, embedding_length, ...), for
  `general.architecture` `llama` (also Mistral conversions) and `qwen2`;
  tied embeddings when there is no `output.weight` tensor;
- the tokenizer from `tokenizer.*` keys (`gguf_tokenizer.build_gguf_tokenizer`);
- checks: every tensor's bytes lie inside the file (truncation), names and
  shapes fit the config.

`iter_gguf_weights` then maps names to HF naming and dequantizes tensor by
tensor with `gguf.quants.dequantize` (numpy) to float32 (F16/BF16 stay as
stored). GGUF shapes are stored in ggml order (fastest dimension first), so the
HF shape is the reverse. llama.cpp's converter permutes the rows of Q and K of
`llama` models for its rope kernel; we undo it:

    rows = n_head * head_dim, viewed as (n_head, 2, head_dim/2) by llama.cpp
    un-permute: reshape (n_head, head_dim/2, 2, cols) -> swap axes 1, 2 -> reshape back

(K uses n_kv_head). Qwen2 files are stored unpermuted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError, ModelLoadError, UnsupportedModelError
from engine.config import ModelConfig
from engine.loader.gguf_reader import gguf_metadata as _metadata
from engine.loader.gguf_reader import open_gguf as _open
from engine.loader.gguf_tokenizer import build_gguf_tokenizer
from engine.loader.source import ModelSource, check_weight_shapes, compute_fingerprint

GGUF_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name, None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(match.group(1))}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def _key(meta: dict[str, Any], key: str, path: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if value is None:
        raise ModelLoadError(f"{path} has no metadata {key!r}")
    return value


def _check_architecture(meta: dict[str, Any], path: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: general.architecture {arch!r} is not supported; supported: llama (incl. Mistral), qwen2"
        )
    return str(arch)


def parse_gguf_config(
    meta: dict[str, Any], tensor_names: set[str], path: str, eos_token_ids: tuple[int, ...]
) -> ModelConfig:
    """`ModelConfig` from GGUF metadata (`path` names the file in errors)."""
    arch = _check_architecture(meta, path)
    hidden = int(_key(meta, f"{arch}.embedding_length", path))
    heads = int(_key(meta, f"{arch}.attention.head_count", path))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // max(heads, 1)))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial rotary (rope dim {rope_dim} of head dim {head_dim}) is not supported"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        kind = scaling if scaling not in ("none", None) else "rope_freqs (Llama 3.1 style)"
        raise UnsupportedModelError(
            f"{path}: GGUF rope scaling {kind!r} is not supported; load the HF directory instead"
        )
    tokens = meta.get("tokenizer.ggml.tokens") or []
    try:
        return ModelConfig(
            architecture=str(arch),
            vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(_key(meta, f"{arch}.feed_forward_length", path)),
            num_layers=int(_key(meta, f"{arch}.block_count", path)),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(_key(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(_key(meta, f"{arch}.context_length", path)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2",
            bos_token_id=int(meta["tokenizer.ggml.bos_token_id"])
            if meta.get("tokenizer.ggml.bos_token_id") is not None
            else None,
            eos_token_ids=eos_token_ids,
            name=str(meta.get("general.name", Path(path).stem)),
        )
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def load_gguf_file(path: str | Path) -> ModelSource:
    """Parse and check a GGUF file; tensor data is not dequantized here."""
    path = str(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    reader = _open(path)
    meta = _metadata(reader)
    _check_architecture(meta, path)
    tokenizer = build_gguf_tokenizer(meta, path)
    names = {str(t.name) for t in reader.tensors}
    config = parse_gguf_config(meta, names, path, tokenizer.eos_token_ids)
    found: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        name = hf_name(str(tensor.name))
        if name is None:
            raise UnsupportedModelError(
                f"{path}: tensor {tensor.name} has no counterpart in a {config.architecture} model"
            )
        found[name] = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    check_weight_shapes(found, config, path)
    table = [(str(t.name), tuple(int(d) for d in t.shape.tolist()), t.tensor_type.name) for t in reader.tensors]
    with open(path, "rb") as handle:
        header = handle.read(int(reader.data_offset))  # metadata + tensor infos, tokenizer included
    fingerprint = compute_fingerprint("gguf", config, table, [path], header)
    return ModelSource(path, "gguf", config, tokenizer, fingerprint, read_weights=iter_gguf_weights)


def _to_torch(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in HF shape (F32/F16/BF16 as stored, others float32)."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    if kind == GGMLQuantizationType.F32:
        out = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    elif kind == GGMLQuantizationType.F16:
        out = torch.from_numpy(np.array(tensor.data, dtype=np.float16))
    elif kind == GGMLQuantizationType.BF16:
        out = torch.from_numpy(np.array(tensor.data).view(np.int16).copy()).view(torch.bfloat16)
    else:
        try:
            values = quants.dequantize(tensor.data, kind)
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"GGUF tensor type {kind.name} of {tensor.name} cannot be dequantized") from exc
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out.reshape(shape)


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rope permutation of a Q or K weight (or bias) along dim 0."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(path: str | Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream `(hf_name, tensor)` from a GGUF file, dequantizing one tensor at a time."""
    reader = _open(str(path))
    permuted = config.architecture in _PERMUTED_ARCHITECTURES
    for tensor in reader.tensors:
        name = hf_name(str(tensor.name))
        if name is None:
            raise UnsupportedModelError(f"{path}: tensor {tensor.name} has no counterpart in the model")
        weight = _to_torch(tensor)
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_rows(weight, config.num_heads).contiguous()
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_rows(weight, config.num_kv_heads).contiguous()
        yield name, weight
