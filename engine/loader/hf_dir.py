"""Loading a Hugging Face model directory (config.json + safetensors + tokenizer).

Reading path of `load_hf_dir(directory)`:

1. `config.json` -> `parse_hf_config` -> `ModelConfig` (llama, mistral, qwen2;
   both the transformers v4 `rope_theta`/`rope_scaling` keys and the v5
   `rope_parameters` dict), with `generation_config.json` eos ids merged in;
2. the weight files: `model.safetensors.index.json` (sharded), else
   `model.safetensors`, else every `*.safetensors`; only their headers are read
   here, to check names and shapes against the config and to fingerprint them;
3. the tokenizer (`hf_tokenizer.load_hf_tokenizer`).

`iter_hf_weights` later streams the tensors file by file with `safe_open`.
Every problem raises `ModelLoadError` (missing/corrupt file, naming it) or
`UnsupportedModelError` (architecture or feature we do not run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from common.errors import ConfigError, ModelLoadError, UnsupportedModelError
from engine.config import ModelConfig, RopeScaling
from engine.loader.hf_tokenizer import load_hf_tokenizer, read_json
from engine.loader.source import ModelSource, check_weight_shapes, compute_fingerprint

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(directory: str | Path) -> ModelSource:
    """Parse and check an HF model directory; no tensor data is read."""
    directory = Path(directory)
    config_file = directory / "config.json"
    raw = read_json(config_file)
    generation_file = directory / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else {}
    files = find_weight_files(directory)
    tensors = {}
    for file in files:
        tensors.update(_read_header(file))
    extra_eos = _eos_ids(raw.get("eos_token_id"), config_file) + _eos_ids(
        generation.get("eos_token_id"), generation_file
    )
    tokenizer = load_hf_tokenizer(directory, extra_eos)
    config = parse_hf_config(raw, str(config_file), eos_token_ids=tokenizer.eos_token_ids, name=directory.name)
    found = {name: shape for name, (shape, _) in tensors.items() if _keep(name, config)}
    check_weight_shapes(found, config, str(directory))
    table = [(name, shape, dtype) for name, (shape, dtype) in tensors.items()]
    extra = b"".join(
        (directory / name).read_bytes()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        if (directory / name).is_file()
    )
    fingerprint = compute_fingerprint("hf", config, table, [str(f) for f in files], extra)
    return ModelSource(str(directory), "hf", config, tokenizer, fingerprint, read_weights=iter_hf_weights)


def _int(raw: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelLoadError(f"{where} has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{where}: {key} must be an integer, found {value!r}")
    return value


def _eos_ids(value: Any, where: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{where}: eos_token_id must be an integer or a list of integers, found {value!r}")
    return list(values)


def _architecture(raw: dict[str, Any], where: str) -> str:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    supported = (
        f"supported: {', '.join(HF_ARCHITECTURES)} (model_type {', '.join(sorted(set(HF_ARCHITECTURES.values())))})"
    )
    if architectures:
        if isinstance(architectures, list) and architectures[0] in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[architectures[0]]
        raise UnsupportedModelError(
            f"{where}: architecture {architectures!r} (model_type {model_type!r}) is not supported; {supported}"
        )
    if model_type in HF_ARCHITECTURES.values():
        return str(model_type)
    raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported; {supported}")


def _rope(raw: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelLoadError(f"{where}: rope_theta must be a positive number, found {theta!r}")
    if not scaling:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{where}: rope scaling must be an object, found {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"{where}: rope type {rope_type!r} is not supported; supported: default, llama3")
    try:
        return float(theta), RopeScaling(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: llama3 rope scaling is incomplete or invalid: {exc!r}") from exc


def _sliding_window(raw: dict[str, Any], architecture: str, where: str) -> int | None:
    if architecture == "mistral":
        window = raw.get("sliding_window")
        return int(window) if window is not None else None
    if architecture == "qwen2":
        layer_types = raw.get("layer_types") or []
        if raw.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise UnsupportedModelError(f"{where}: Qwen2 sliding-window layers are not supported")
    return None


def parse_hf_config(
    raw: dict[str, Any], where: str, *, eos_token_ids: tuple[int, ...] = (), name: str = ""
) -> ModelConfig:
    """`ModelConfig` from a config.json dict (`where` names the file in errors)."""
    architecture = _architecture(raw, where)
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported; supported: silu")
    if raw.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
    if architecture == "llama" and raw.get("attention_bias"):
        raise UnsupportedModelError(f"{where}: attention_bias=true (bias on o_proj too) is not supported for llama")
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    if heads < 1:
        raise ModelLoadError(f"{where}: num_attention_heads must be >= 1, found {heads}")
    if hidden % heads and raw.get("head_dim") is None:
        raise ModelLoadError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    theta, scaling = _rope(raw, where)
    eps = raw.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ModelLoadError(f"{where}: rms_norm_eps must be a positive number, found {eps!r}")
    bos = raw.get("bos_token_id")
    try:
        return ModelConfig(
            architecture=architecture,
            vocab_size=_int(raw, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size", where),
            num_layers=_int(raw, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=_int(raw, "num_key_value_heads", where, heads),
            head_dim=_int(raw, "head_dim", where) if raw.get("head_dim") is not None else hidden // heads,
            rms_norm_eps=float(eps),
            rope_theta=theta,
            max_position_embeddings=_int(raw, "max_position_embeddings", where, 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=architecture == "qwen2",
            rope_scaling=scaling,
            sliding_window=_sliding_window(raw, architecture, where),
            bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
            eos_token_ids=tuple(eos_token_ids),
            name=str(raw.get("_name_or_path") or name),
        )
    except ConfigError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc


def find_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of `directory`, in load order; `ModelLoadError` if none or one is missing."""
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_file} has no weight_map")
        files = [directory / name for name in sorted(set(map(str, weight_map.values())))]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"shard {file.name} listed in {index_file.name} not found in {directory}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no model.safetensors (or model.safetensors.index.json) in {directory}; "
            "pytorch_model.bin checkpoints are not supported, convert them to safetensors"
        )
    return files


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors header, validated by `safe_open`."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            out = {}
            for name in handle.keys():
                sliced = handle.get_slice(name)
                out[name] = (tuple(sliced.get_shape()), str(sliced.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {exc}") from exc


def _keep(name: str, config: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES):
        return False
    return not (name == "lm_head.weight" and config.tie_word_embeddings)


def iter_hf_weights(directory: str | Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream `(name, tensor)` from the directory's safetensors files, one file at a time."""
    for file in find_weight_files(Path(directory)):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if _keep(name, config):
                        yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{file} could not be read: {exc}") from exc
