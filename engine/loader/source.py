"""`ModelSource`: a loaded-but-not-materialised model, whatever file it came from.

A source holds the parsed `ModelConfig`, the `Tokenizer`, a fingerprint of the
weights, and streams the weights on demand (`iter_weights`), file by file, under
Hugging Face Llama names, so the model code never sees file formats:

    model.embed_tokens.weight                          [vocab, hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   [out, in]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       [out]      (qwen2 only)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    [out, in]
    model.layers.{i}.{input,post_attention}_layernorm.weight [hidden]
    model.norm.weight                                  [hidden]
    lm_head.weight                                     [vocab, hidden] (absent when tied)

Also here: `expected_weight_shapes(config)` (that name -> shape table, used to
check a checkpoint before any tensor is read) and the fingerprint helper.

This module knows no file format: the format modules (hf_dir.py, gguf_file.py) import
it, never the other way round. Each builds its `ModelSource` with its own weight
reader (`read_weights=iter_hf_weights` / `iter_gguf_weights`), which `iter_weights`
calls; the reader is a module-level function, so a source still pickles (by reference)
to other processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import ModelLoadError, UnsupportedModelError
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

FORMATS = ("hf", "gguf")
_SAMPLES_PER_FILE = 16  # evenly spaced chunks hashed per weight file
_SAMPLE_BYTES = 4096
_FULL_HASH_BELOW = 32 << 20  # files smaller than this are hashed whole

# a format's weight streamer: (path, config) -> (hf_name, tensor) pairs, lazily
WeightReader = Callable[[str, ModelConfig], Iterator[tuple[str, "torch.Tensor"]]]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are, and everything known about it without reading them.

    `fingerprint` is a hex sha256 over the config, the tensor names/shapes/dtypes,
    the tokenizer, the file sizes and evenly spaced samples of the weight bytes: it
    is cheap (files over 32 MiB are sampled, not read whole) and differs between
    two checkpoints of the same shape. `read_weights` is the format module's weight
    streamer (keyword-only; not part of equality or repr).
    """

    path: str
    format: str  # "hf" | "gguf"
    config: ModelConfig
    tokenizer: Tokenizer = dataclasses.field(repr=False, compare=False)
    fingerprint: str = ""
    read_weights: WeightReader = dataclasses.field(repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")

    def iter_weights(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield `(hf_name, tensor)` pairs, lazily, one file at a time.

        Tensors keep their stored dtype (quantized GGUF tensors come out float32);
        `lm_head.weight` is not yielded when the embeddings are tied.
        """
        return self.read_weights(self.path, self.config)


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model needs, with its shape (HF naming, `[out, in]`)."""
    hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if config.attention_bias:
            shapes[prefix + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[prefix + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[prefix + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        shapes[prefix + "mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, config.intermediate_size)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_weight_shapes(found: Mapping[str, tuple[int, ...]], config: ModelConfig, where: str) -> None:
    """Raise if `found` (name -> shape, after skipping ignorable names) does not fit `config`.

    Missing or mis-shaped tensors raise `ModelLoadError`; tensors the supported
    architectures do not have raise `UnsupportedModelError`.
    """
    expected = expected_weight_shapes(config)
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise UnsupportedModelError(
            f"{where} has {len(unexpected)} tensor(s) a {config.architecture} model does not use, e.g. "
            f"{', '.join(unexpected[:5])}"
        )
    missing = sorted(set(expected) - set(found), key=_natural_key)
    if missing:
        raise ModelLoadError(f"{where} lacks {len(missing)} tensor(s) the config needs, e.g. {', '.join(missing[:5])}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(
                f"{where}: tensor {name} has shape {list(found[name])}, the config needs {list(shape)}"
            )


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def compute_fingerprint(
    fmt: str,
    config: ModelConfig,
    tensors: Iterable[tuple[str, tuple[int, ...], str]],
    files: Iterable[str],
    extra: bytes = b"",
) -> str:
    """sha256 over config, tensor table, `extra` bytes, and size + bytes of each file
    (all bytes below 32 MiB, else 16 evenly spaced 4 KiB samples)."""
    digest = hashlib.sha256()
    digest.update(fmt.encode())
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for name, shape, dtype in sorted(tensors):
        digest.update(f"{name}:{list(shape)}:{dtype};".encode())
    digest.update(extra)
    for path in files:
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size};".encode())
        try:
            with open(path, "rb") as handle:
                if size < _FULL_HASH_BELOW:
                    digest.update(handle.read())
                    continue
                for index in range(_SAMPLES_PER_FILE):
                    handle.seek(max(0, (size - _SAMPLE_BYTES) * index // max(1, _SAMPLES_PER_FILE - 1)))
                    digest.update(handle.read(_SAMPLE_BYTES))
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()
