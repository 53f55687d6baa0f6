"""Tiny random-weight models built on the fly, for tests (no hub access).

    make_tiny_hf_model(tmp_path, "llama")            -> Path of an HF directory
    make_tiny_hf_model(tmp_path, "qwen2", tie_word_embeddings=True, max_shard_size="2MB")
    make_tiny_gguf_model(tmp_path, "llama")          -> Path of a .gguf file (same weights
                                                        as the HF dir written next to it)

The models are real `transformers` models (seeded, float32 by default: hidden 64,
4 layers, 8 heads, 4 KV heads, intermediate 128) so that transformers can serve
as the oracle on the same directory. They use the real SmolLM2 tokenizer
(vocab 49,152, ChatML chat template), rebuilt from the shipped GGUF by our own
`engine.loader.gguf_tokenizer` and saved as tokenizer.json + tokenizer_config.json;
a `vocab_size` override below 49,152 (>= 252) cuts that tokenizer to its first
`vocab_size` tokens (faster to build, load and, for GGUF, to parse).

Overrides are transformers config kwargs (`num_key_value_heads=2`,
`tie_word_embeddings=True`, `rope_parameters={...}`, ...) plus:
`seed` (0), `dtype` ("float32" | "bfloat16" | "float16"), `max_shard_size`
(e.g. "1MB": sharded checkpoint with model.safetensors.index.json),
`chat_template` (str, or None for a model without one), `name` (folder name).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.loader import default_model_path
from engine.loader.gguf_tokenizer import build_gguf_tokenizer

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}}
_UNSET = object()


@lru_cache(maxsize=1)
def smollm2_tokenizer_metadata() -> dict[str, Any]:
    """The `tokenizer.*` metadata of the shipped SmolLM2 GGUF (read once per process)."""
    from gguf import GGUFReader

    reader = GGUFReader(default_model_path())
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


_MIN_VOCAB = 252  # ids 0..251 hold the 17 control tokens and every byte-level character


@lru_cache(maxsize=4)
def tokenizer_metadata(vocab_size: int = 49152) -> dict[str, Any]:
    """SmolLM2's tokenizer metadata, cut to its first `vocab_size` tokens when smaller.

    The cut keeps every merge whose parts and result survive, which is still a
    complete byte-level BPE (merged tokens come after their parts). Small
    vocabularies make GGUF files that parse in milliseconds instead of ~2 s.
    """
    meta = smollm2_tokenizer_metadata()
    tokens = meta["tokenizer.ggml.tokens"]
    if vocab_size >= len(tokens):
        return meta
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} to keep every byte token, got {vocab_size}")
    kept = set(tokens[:vocab_size])
    merges = []
    for merge in meta["tokenizer.ggml.merges"]:
        left, _, right = merge.partition(" ")
        if left in kept and right in kept and left + right in kept:
            merges.append(merge)
    return {
        **meta,
        "tokenizer.ggml.tokens": tokens[:vocab_size],
        "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:vocab_size],
        "tokenizer.ggml.merges": merges,
    }


@lru_cache(maxsize=4)
def _tokenizer_files(vocab_size: int) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) of the SmolLM2 tokenizer."""
    tokenizer = build_gguf_tokenizer(tokenizer_metadata(vocab_size), "SmolLM2 GGUF")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # keeps tokenizer.json's pipeline as is
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": tokenizer.chat_template,
    }
    return tokenizer.backend.to_str(), config


def _unique_dir(base: Path, name: str) -> Path:
    path, n = base / name, 1
    while path.exists():
        n += 1
        path = base / f"{name}-{n}"
    return path


def make_tiny_hf_model(tmp_path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """Build, seed and save a tiny `arch` model ("llama", "mistral", "qwen2"); return its directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    seed = overrides.pop("seed", 0)
    dtype = getattr(torch, overrides.pop("dtype", "float32"))
    max_shard_size = overrides.pop("max_shard_size", None)
    chat_template = overrides.pop("chat_template", _UNSET)
    out = _unique_dir(Path(tmp_path), overrides.pop("name", f"tiny-{arch}"))
    config = classes[arch](**{**TINY_DEFAULTS, **_ARCH_DEFAULTS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype).eval()
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)

    tokenizer_json, tokenizer_config = _tokenizer_files(config.vocab_size)
    tokenizer_config = dict(tokenizer_config)
    if chat_template is None:
        tokenizer_config.pop("chat_template")
    elif chat_template is not _UNSET:
        tokenizer_config["chat_template"] = chat_template
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return out


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the loader undoes)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_BLOCK_NAMES[rest]}"


def make_tiny_gguf_model(tmp_path: Path, arch: str = "llama", ggml_type: str = "F32", **overrides: Any) -> Path:
    """A tiny GGUF (llama or qwen2 arch; "mistral" is written as llama, as llama.cpp does).

    The HF directory with the same weights is written next to it
    (`<file>.gguf` and `<file>-hf/`), so both loaders can be compared.
    `ggml_type` ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", ... any type gguf-py can
    quantize; not the K-quants) applies to the 2-D weights; norms and biases stay F32.
    """
    import gguf
    from safetensors.torch import load_file

    overrides.setdefault("dtype", "float32")
    stem, n = overrides.pop("name", f"tiny-{arch}-gguf"), 1
    base = stem
    while (Path(tmp_path) / f"{base}.gguf").exists() or (Path(tmp_path) / f"{base}-hf").exists():
        n += 1
        base = f"{stem}-{n}"
    hf_dir = make_tiny_hf_model(tmp_path, arch, name=f"{base}-hf", **overrides)
    config = json.loads((hf_dir / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    gguf_arch = "qwen2" if arch == "qwen2" else "llama"
    path = Path(tmp_path) / f"{base}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_name(hf_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    meta = tokenizer_metadata(config["vocab_size"])
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(bool(meta["tokenizer.ggml.add_bos_token"]))
    writer.add_chat_template(meta["tokenizer.chat_template"])
    quant = getattr(gguf.GGMLQuantizationType, ggml_type)
    for name, tensor in tensors.items():
        array = tensor.float().numpy()
        if gguf_arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, heads)
        elif gguf_arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, kv_heads)
        if quant != gguf.GGMLQuantizationType.F32 and array.ndim == 2:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    set_kv: dict[str, tuple[Any, Any]] | None = None,
    drop_kv: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
) -> Path:
    """Copy a GGUF with edits: another `arch`, keys set (`{key: (value, GGUFValueType)}`) or dropped,
    tensors dropped. Tensors are copied as stored (quantized ones stay quantized)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch or str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv or key in (set_kv or {}):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    for key, (value, vtype) in (set_kv or {}).items():
        writer.add_key_value(key, value, vtype)
    for tensor in reader.tensors:
        if tensor.name in drop_tensors:
            continue
        data = np.array(tensor.data)
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)
