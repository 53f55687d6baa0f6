"""Loading GGUF files: config from metadata, un-permuted and dequantized weights, errors.

Oracles: the HF directory a tiny GGUF was written from (same weights), transformers'
own GGUF loader, and (slow) transformers on the real SmolLM2 Q4_1 GGUF. Also the
sentencepiece-style ("llama" tokenizer model) GGUF tokenizer vs transformers', on a
vocabulary trained on the fly (the byte-level one is in test_tokenizer.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ModelLoadError, UnsupportedModelError
from engine.loader import default_model_path, load_model_source
from engine.loader.gguf_file import unpermute_rows
from engine.loader.gguf_tokenizer import build_gguf_tokenizer
from tests.helpers.tiny_models import llama_cpp_permute, make_tiny_gguf_model, rewrite_gguf

VT = gguf.GGUFValueType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gguf")
    small = 512  # a cut SmolLM2 vocabulary: the metadata parses in milliseconds
    return {
        "llama": make_tiny_gguf_model(base, "llama", num_key_value_heads=2, vocab_size=small),
        "qwen2-q8": make_tiny_gguf_model(base, "qwen2", ggml_type="Q8_0", vocab_size=small),
        "llama-tied": make_tiny_gguf_model(
            base, "llama", tie_word_embeddings=True, num_hidden_layers=2, vocab_size=small
        ),
    }


def _hf_twin(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + "-hf")


def test_llama_gguf_equals_its_hf_weights_after_unpermuting(tiny: dict[str, Path]) -> None:
    source = load_model_source(str(tiny["llama"]))
    twin = load_model_source(str(_hf_twin(tiny["llama"])))
    assert source.format == "gguf" and twin.format == "hf"
    for field in (
        "architecture",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_ids",
    ):
        assert getattr(source.config, field) == getattr(twin.config, field), field
    assert source.config.rms_norm_eps == pytest.approx(twin.config.rms_norm_eps, rel=1e-6)  # stored as f32
    ours, reference = dict(source.iter_weights()), dict(twin.iter_weights())
    assert set(ours) == set(reference) and "lm_head.weight" in ours
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape and torch.equal(ours[name], tensor), name


def test_quantized_qwen2_gguf(tiny: dict[str, Path]) -> None:
    source = load_model_source(str(tiny["qwen2-q8"]))
    assert source.config.architecture == "qwen2" and source.config.attention_bias
    ours = dict(source.iter_weights())
    reference = dict(load_model_source(str(_hf_twin(tiny["qwen2-q8"]))).iter_weights())
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32
        if tensor.ndim == 1:  # norms and biases are stored as F32: exact, and not permuted (qwen2)
            assert torch.equal(ours[name], tensor), name
        else:  # Q8_0: within one quantization step of the original
            step = tensor.abs().max() / 127
            assert (ours[name] - tensor).abs().max() <= step, name
            assert not torch.equal(ours[name], tensor), name


@pytest.mark.parametrize(
    ("key", "ggml_type", "stored"),
    [
        ("llama", "F32", torch.float32),
        ("qwen2-q8", "Q8_0", torch.float32),
        (None, "F16", torch.float16),
        (None, "BF16", torch.bfloat16),
        (None, "Q4_1", torch.float32),
    ],
)
def test_tiny_ggufs_match_transformers_gguf_loader(
    tiny: dict[str, Path], tmp_path: Path, key: str | None, ggml_type: str, stored: torch.dtype
) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny[key] if key else make_tiny_gguf_model(tmp_path, "llama", ggml_type=ggml_type, vocab_size=512)
    ours = dict(load_model_source(str(path)).iter_weights())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference = model.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == (stored if tensor.ndim == 2 else torch.float32), name  # as stored / dequantized
        assert torch.equal(ours[name].float(), tensor), name


def test_tied_when_there_is_no_output_tensor(tiny: dict[str, Path]) -> None:
    source = load_model_source(str(tiny["llama-tied"]))
    assert source.config.tie_word_embeddings and source.config.num_layers == 2
    assert "lm_head.weight" not in dict(source.iter_weights())


@settings(deadline=None, max_examples=40)
@given(n_head=st.integers(1, 6), half_dim=st.integers(1, 8), cols=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_unpermute_inverts_llama_cpp_permute(n_head: int, half_dim: int, cols: int, seed: int) -> None:
    rows = n_head * half_dim * 2
    shape = (rows, cols) if cols else (rows,)  # weights and biases
    original = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(original, n_head)
    restored = unpermute_rows(torch.from_numpy(permuted), n_head)
    assert torch.equal(restored, torch.from_numpy(original))
    if half_dim > 1:
        assert not np.array_equal(permuted, original)  # the permutation is not the identity here


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gguf_names_the_file(tiny: dict[str, Path], tmp_path: Path, keep: float) -> None:
    data = tiny["llama-tied"].read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="broken.gguf") as info:
        load_model_source(str(broken))
    assert not isinstance(info.value, UnsupportedModelError)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10])
def test_garbage_gguf_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        load_model_source(str(path))


def test_unsupported_architecture(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = rewrite_gguf(tiny["llama-tied"], tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(UnsupportedModelError, match="'phi3'.*llama"):
        load_model_source(str(path))


def test_unsupported_tokenizer_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = rewrite_gguf(tiny["llama-tied"], tmp_path / "t5tok.gguf", set_kv={"tokenizer.ggml.model": ("t5", VT.STRING)})
    with pytest.raises(UnsupportedModelError, match="'t5'.*gpt2"):
        load_model_source(str(path))


@pytest.mark.parametrize(
    ("set_kv", "drop_tensors", "match"),
    [
        ({"llama.rope.scaling.type": ("yarn", VT.STRING)}, (), "yarn"),
        ({"llama.rope.dimension_count": (4, VT.UINT32)}, (), "partial rotary"),
    ],
)
def test_unsupported_features(
    tiny: dict[str, Path], tmp_path: Path, set_kv: dict, drop_tensors: tuple, match: str
) -> None:
    path = rewrite_gguf(tiny["llama-tied"], tmp_path / "x.gguf", set_kv=set_kv, drop_tensors=drop_tensors)
    with pytest.raises(UnsupportedModelError, match=match):
        load_model_source(str(path))


def test_missing_tensor_and_missing_metadata(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = rewrite_gguf(tiny["llama-tied"], tmp_path / "a.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model_source(str(path))
    path = rewrite_gguf(tiny["llama-tied"], tmp_path / "b.gguf", drop_kv=("llama.block_count",))
    with pytest.raises(ModelLoadError, match="llama.block_count"):
        load_model_source(str(path))


def test_fingerprint_differs_between_ggufs(tiny: dict[str, Path]) -> None:
    prints = {load_model_source(str(p)).fingerprint for p in tiny.values()}
    assert len(prints) == 3
    assert load_model_source(str(tiny["llama"])).fingerprint == load_model_source(str(tiny["llama"])).fingerprint


def test_smollm2_config_from_metadata() -> None:
    source = load_model_source(None)
    config = source.config
    assert source.format == "gguf" and source.path == default_model_path()
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == ("llama", 30, 9, 3)
    assert (config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size) == (576, 64, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings and config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert source.tokenizer.add_bos_token is False and source.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_weights_bit_identical_to_transformers() -> None:
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path())
    ours = dict(load_model_source(str(path)).iter_weights())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference = model.state_dict()
    reference.pop("lm_head.weight")  # tied to the embeddings
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name


# -- sentencepiece-style ("llama" tokenizer model) GGUF ------------------------------------


def _sentencepiece_metadata() -> dict[str, Any]:
    from tokenizers import SentencePieceBPETokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello tokenizers! Sentencepiece style byte fallback test.",
        "lorem ipsum dolor sit amet, consectetur adipiscing elit",
    ] * 20
    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(corpus, vocab_size=200, min_frequency=1, show_progress=False, special_tokens=["<unk>"])
    model = json.loads(trainer.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    return {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 128,
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.merges": [" ".join(pair) for pair in model["merges"]],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def _write_metadata_gguf(path: Path, meta: dict[str, Any]) -> None:
    writer = gguf.GGUFWriter(str(path), meta["general.architecture"])
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("merges", ["from_file", "from_scores"])
def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path: Path, merges: str) -> None:
    from transformers import AutoTokenizer

    meta = _sentencepiece_metadata()
    if merges == "from_scores":
        del meta["tokenizer.ggml.merges"]
    _write_metadata_gguf(tmp_path / "sp.gguf", meta)
    ours = build_gguf_tokenizer(meta, "sp.gguf")
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    texts = [
        "Hello world",
        "The quick brown fox",
        "  two leading",
        "unknown: 你好 😀 Ω",
        "<s>hello</s> there",
        "",
        "a\nb\tc",
    ]
    for text in texts:
        assert ours.encode(text) == reference.encode(text), text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    assert ours.add_bos_token and ours.encode("hi")[0] == 1
    assert ours.decode(ours.encode("unknown: 你好 😀 Ω")) == "unknown: 你好 😀 Ω"  # byte fallback round-trips
