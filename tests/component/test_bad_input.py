"""Bad input through the real engine: a typed error that says what to change, and no trace left.

Every bad call must raise the typed error from `common.errors` (message naming
the problem and the fix), admit nothing, and leave the engine exactly as
usable as before: the same greedy output for a reference prompt and a clean
`leak_check()` (no request queued, every KV block free).

Model: a tiny random llama (vocab 512, context 256), float32, 64 blocks of 16.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from common.errors import (
    EngineError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelLoadError,
    OutOfKVCacheError,
    PromptTooLongError,
    UnsupportedModelError,
)
from common.sampling_params import SamplingParams
from engine.llm import LLM, PromptInput
from engine.request import Request
from tests.helpers.tiny_models import make_tiny_gguf_model, make_tiny_hf_model

CONTEXT = 256
VOCAB = 512
REF_PROMPT = [17, 301, 42, 99, 5, 250, 7]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("bad-input"), "llama", vocab_size=VOCAB, max_position_embeddings=CONTEXT
    )


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", num_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[int]:
    (out,) = llm.generate(REF_PROMPT, GREEDY)
    assert len(out.token_ids) >= 1
    return out.token_ids


def assert_engine_clean_and_correct(llm: LLM, reference: list[int]) -> None:
    """Nothing queued, every block free, and the reference prompt still gives the same greedy tokens."""
    sched = llm.engine.scheduler
    assert not sched.waiting and not sched.running and not sched.requests
    llm.engine.leak_check()
    (out,) = llm.generate(REF_PROMPT, GREEDY)
    assert out.token_ids == reference
    llm.engine.leak_check()


def long_ids(n: int) -> list[int]:
    return [(7 * i + 3) % VOCAB for i in range(n)]


def batch(*prompts: PromptInput) -> list[PromptInput]:
    """A batch that mixes text and token-id prompts."""
    return list(prompts)


# (id, bad call, error type, substrings the message must contain)
BadCall = Callable[[LLM], object]
CASES: list[tuple[str, BadCall, type[EngineError], tuple[str, ...]]] = [
    ("empty-text", lambda llm: llm.generate(""), InvalidRequestError, ("empty",)),
    ("empty-ids-in-batch", lambda llm: llm.generate([[]]), InvalidRequestError, ("empty",)),
    ("empty-batch", lambda llm: llm.generate([]), InvalidRequestError, ("at least one prompt",)),
    (
        "prompt-longer-than-context",
        lambda llm: llm.generate(long_ids(CONTEXT + 40)),
        PromptTooLongError,
        (str(CONTEXT + 40), str(CONTEXT), "shorten"),
    ),
    (
        "prompt-equal-to-context",
        lambda llm: llm.generate(long_ids(CONTEXT)),
        PromptTooLongError,
        (str(CONTEXT), "shorten"),
    ),
    (
        "prompt-plus-max-tokens",
        lambda llm: llm.generate(long_ids(200), SamplingParams(max_tokens=100)),
        PromptTooLongError,
        ("max_tokens", "at most 56"),
    ),
    (
        "max-tokens-0",
        lambda llm: llm.generate("hi", SamplingParams(max_tokens=0)),
        InvalidSamplingParamsError,
        ("max_tokens", ">= 1"),
    ),
    (
        "max-tokens-negative",
        lambda llm: llm.generate("hi", SamplingParams(max_tokens=-3)),
        InvalidSamplingParamsError,
        ("max_tokens", ">= 1"),
    ),
    (
        "temperature-negative",
        lambda llm: llm.generate("hi", SamplingParams(temperature=-0.5)),
        InvalidSamplingParamsError,
        ("temperature", ">= 0"),
    ),
    (
        "top-p-0",
        lambda llm: llm.generate("hi", SamplingParams(top_p=0.0)),
        InvalidSamplingParamsError,
        ("top_p", "(0, 1]"),
    ),
    (
        "top-p-1.5",
        lambda llm: llm.generate("hi", SamplingParams(top_p=1.5)),
        InvalidSamplingParamsError,
        ("top_p", "(0, 1]"),
    ),
    (
        "top-k-negative",
        lambda llm: llm.generate("hi", SamplingParams(top_k=-1)),
        InvalidSamplingParamsError,
        ("top_k", ">= 0"),
    ),
    ("token-id-too-big", lambda llm: llm.generate([1, 2, VOCAB]), InvalidRequestError, (str(VOCAB), "vocabulary")),
    ("token-id-negative", lambda llm: llm.generate([[5, -1, 6]]), InvalidRequestError, ("-1", "vocabulary")),
    # a float among the token ids: ill-typed on purpose (cast), the engine must refuse it
    ("token-id-not-int", lambda llm: llm.generate(cast(Any, [[5, 2.5, 6]])), InvalidRequestError, ("token ids",)),
    (
        "engine-token-id-bool",
        lambda llm: llm.engine.add_request([True, 6], GREEDY),
        InvalidRequestError,
        ("integers", "bool"),
    ),
    (
        "params-count-mismatch",
        lambda llm: llm.generate(["a", "b"], [GREEDY]),
        InvalidRequestError,
        ("2 prompts", "1 sampling params"),
    ),
    (
        "batch-last-too-long",
        lambda llm: llm.generate(batch("hello there", REF_PROMPT, long_ids(CONTEXT + 1)), GREEDY),
        PromptTooLongError,
        ("shorten",),
    ),
    (
        "batch-last-bad-token",
        lambda llm: llm.generate(batch(REF_PROMPT, "fine", [3, VOCAB + 7]), GREEDY),
        InvalidRequestError,
        (str(VOCAB + 7), "vocabulary"),
    ),
    (
        "batch-last-empty",
        lambda llm: llm.generate(batch(REF_PROMPT, [4, 5], ""), GREEDY),
        InvalidRequestError,
        ("empty",),
    ),
]


@pytest.mark.parametrize(("bad", "error", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_raises_typed_error_and_admits_nothing(
    llm: LLM,
    reference: list[int],
    monkeypatch: pytest.MonkeyPatch,
    bad: BadCall,
    error: type[EngineError],
    needles: tuple[str, ...],
) -> None:
    admitted: list[str] = []
    real_add = llm.engine.scheduler.add

    def recording_add(req: Request) -> None:
        admitted.append(req.request_id)
        real_add(req)

    monkeypatch.setattr(llm.engine.scheduler, "add", recording_add)
    with pytest.raises(error) as info:
        bad(llm)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert admitted == [], "a bad batch must admit nothing, not even its good prompts"
    monkeypatch.undo()
    assert_engine_clean_and_correct(llm, reference)


def test_prompt_plus_max_tokens_exactly_at_context_is_accepted(llm: LLM, reference: list[int]) -> None:
    """The boundary of the check above: n + max_tokens == context runs to the end."""
    prompt = long_ids(CONTEXT - 6)
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert_engine_clean_and_correct(llm, reference)


def test_duplicate_request_id_is_refused_and_first_request_unharmed(llm: LLM, reference: list[int]) -> None:
    engine = llm.engine
    engine.add_request(REF_PROMPT, GREEDY, request_id="dup")
    first = engine.get_request("dup")
    assert first is not None
    with pytest.raises(InvalidRequestError, match="'dup' is already in use"):
        engine.add_request([9, 8, 7], GREEDY, request_id="dup")
    assert engine.get_request("dup") is first and len(engine.scheduler.requests) == 1
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert first.output_token_ids == reference
    assert_engine_clean_and_correct(llm, reference)


def test_request_larger_than_kv_cache_raises_out_of_kv_cache(model_dir: Path) -> None:
    small = LLM(str(model_dir), dtype="float32", num_blocks=4, block_size=16)  # 64 tokens of KV in all
    with pytest.raises(OutOfKVCacheError) as info:
        small.generate(long_ids(40), SamplingParams(max_tokens=40))  # needs ceil(80 / 16) = 5 blocks
    message = str(info.value)
    assert "5 KV blocks" in message and "has 4" in message and "max_tokens" in message
    small.engine.leak_check()
    (out,) = small.generate(long_ids(40), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 24  # exactly 4 blocks still fits
    small.engine.leak_check()


# ---- models that cannot be loaded --------------------------------------------------------------------------------


def test_unknown_model_path_names_the_path() -> None:
    with pytest.raises(ModelLoadError, match="/nonexistent") as info:
        LLM("/nonexistent", dtype="float32")
    assert not isinstance(info.value, UnsupportedModelError)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_safetensors_names_the_file(model_dir: Path, tmp_path: Path, damage: str) -> None:
    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"\xff" * 64 + data[64:])  # header length and header destroyed
    with pytest.raises(ModelLoadError) as info:
        LLM(str(broken), dtype="float32")
    assert "model.safetensors" in str(info.value)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf_model(tmp_path_factory.mktemp("gguf"), "llama", vocab_size=VOCAB)


def test_tiny_gguf_loads(tiny_gguf: Path) -> None:
    """Control for the corrupt cases below: the undamaged file loads and generates."""
    llm = LLM(str(tiny_gguf), dtype="float32", num_blocks=16)
    (out,) = llm.generate(REF_PROMPT, GREEDY)
    assert len(out.token_ids) >= 1
    llm.engine.leak_check()


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage"])
def test_corrupt_gguf_raises_model_load_error(tiny_gguf: Path, tmp_path: Path, damage: str) -> None:
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf.read_bytes()
    if damage == "truncate-data":
        broken.write_bytes(data[: len(data) - 4096])
    elif damage == "truncate-header":
        broken.write_bytes(data[:100])
    else:
        broken.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError) as info:
        LLM(str(broken), dtype="float32", num_blocks=16)
    assert "broken.gguf" in str(info.value)


def test_unsupported_architecture_names_what_was_found(model_dir: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(model_dir, tmp_path / "gpt2ish"))
    config_file = other / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        LLM(str(other), dtype="float32")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "supported" in message and "LlamaForCausalLM" in message


def test_unsupported_model_type_without_architectures(model_dir: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(model_dir, tmp_path / "gpt2ish"))
    config_file = other / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "gpt2"
    config.pop("architectures", None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LLM(str(other), dtype="float32")


def test_numpy_integer_token_ids_are_accepted_as_ints(llm: LLM, reference: list[int]) -> None:
    import numpy as np

    rid = llm.engine.add_request(list(np.array(REF_PROMPT, dtype=np.int64)), GREEDY)  # np.int64 items
    req = llm.engine.get_request(rid)
    assert req is not None
    assert all(type(t) is int for t in req.prompt_token_ids)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert req.output_token_ids == reference
    assert_engine_clean_and_correct(llm, reference)


def test_duplicate_ids_within_one_batch_admit_nothing(llm: LLM, reference: list[int]) -> None:
    with pytest.raises(InvalidRequestError, match="distinct"):
        llm.engine.add_requests([(REF_PROMPT, GREEDY, "same"), ([4, 5, 6], GREEDY, "same")])
    assert_engine_clean_and_correct(llm, reference)
