"""Request validation: every bad input a client can send, and the message it gets back.

The tokenizer is a tiny word-level one built in memory (64 words, a two-line chat
template that refuses an assistant-first chat), so these tests need no model files.
Messages are checked by fragment: they must name the field and say what to change.
"""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from common.contract import ModelInfo
from engine.tokenizer import Tokenizer
from router.validation import MAX_REQUEST_ID_LEN, ModelFacts, RequestValidationError, RequestValidator
from tandem_api.v1 import generation_pb2 as pb

VOCAB = 64
TEMPLATE = (
    "{% if messages[0].role == 'assistant' %}{{ raise_exception('the first message must not be the assistant') }}"
    "{% endif %}{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    words = ["<unk>", "<s>", "</s>", "system", "user", "assistant"] + [f"w{i}" for i in range(VOCAB - 6)]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TEMPLATE)


@pytest.fixture
def validator(tokenizer: Tokenizer) -> RequestValidator:
    ids = iter(range(1000))
    return RequestValidator(
        ModelFacts(vocab_size=VOCAB, max_model_len=32, kv_capacity_tokens=24),
        tokenizer,
        new_request_id=lambda: f"gen-{next(ids)}",
    )


def tokens(*ids: int, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(ids)), sampling=pb.SamplingOptions(**sampling))


def tokens_with(*ids: int, request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=list(ids)))


def chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))


def refused(validator: RequestValidator, request: pb.GenerateRequest, in_flight=()) -> str:
    with pytest.raises(RequestValidationError) as info:
        validator.validate(request, in_flight)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_valid_inputs_and_defaults(validator: RequestValidator, tokenizer: Tokenizer) -> None:
    got = validator.validate(pb.GenerateRequest(prompt="w1 w2 w3"))
    assert got.prompt_token_ids == tokenizer.encode("w1 w2 w3") and got.input_kind == "prompt"
    assert (got.params.max_tokens, got.params.temperature, got.params.top_p, got.params.seed) == (16, 1.0, 1.0, None)
    assert got.request_id == "gen-0" and validator.validate(tokens(7)).request_id == "gen-1"
    assert "w1" not in repr(got)  # reprs show lengths, never the prompt
    messages = [("system", "w1"), ("user", "w2 w3")]
    got = validator.validate(chat(*messages))
    assert got.prompt_token_ids == tokenizer.encode_chat([{"role": r, "content": c} for r, c in messages])
    got = validator.validate(tokens_with(0, VOCAB - 1, request_id="mine"))
    assert got.request_id == "mine" and got.prompt_token_ids == [0, VOCAB - 1]


def test_sampling_fields_map_and_float32_rounding(validator: RequestValidator) -> None:
    got = validator.validate(
        tokens(
            5,
            max_tokens=4,
            temperature=0.7,
            top_p=0.9,
            top_k=3,
            min_p=0.05,
            seed=2**40,
            stop=["w9", "w10"],
            stop_token_ids=[2, 9],
            ignore_eos=True,
            logprobs=0,
        )
    ).params
    assert (got.max_tokens, got.temperature, got.top_p, got.top_k, got.min_p) == (4, 0.7, 0.9, 3, 0.05)
    assert (got.seed, got.stop, got.stop_token_ids, got.ignore_eos, got.logprobs) == (
        2**40,
        ("w9", "w10"),
        (2, 9),
        True,
        0,
    )
    assert validator.validate(tokens(5, temperature=0.0)).params.greedy


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (pb.GenerateRequest(), "no input: set one of prompt, token_ids or chat"),
        (pb.GenerateRequest(prompt=""), "prompt is empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids is empty"),
        (pb.GenerateRequest(chat=pb.ChatMessages()), "chat has no messages"),
        (
            chat(("user", "w1"), ("robot", "w2")),
            "chat.messages[1]: unknown role 'robot' (allowed: system, user, assistant)",
        ),
        (chat(("", "w1")), "unknown role ''"),
        (chat(("assistant", "w1")), "the first message must not be the assistant"),
        (tokens(1, VOCAB), f"token_ids.ids[1] = {VOCAB} is outside the vocabulary [0, {VOCAB})"),
        (tokens(-1), f"token_ids.ids[0] = -1 is outside the vocabulary [0, {VOCAB})"),
    ],
)
def test_bad_inputs(validator: RequestValidator, request_, fragment: str) -> None:
    assert fragment in refused(validator, request_)


def test_text_that_tokenizes_to_nothing(validator: RequestValidator) -> None:
    assert "prompt tokenizes to no tokens" in refused(validator, pb.GenerateRequest(prompt="   "))


@pytest.mark.parametrize(
    "sampling, fragment",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": -3}, "max_tokens must be >= 1, got -3"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": 2.0}, "min_p must be in [0, 1], got 2.0"),
        ({"min_p": -0.5}, "min_p must be in [0, 1]"),
        ({"seed": -1}, "seed must be in 0.."),
        ({"logprobs": -1}, "logprobs must be in 0..20"),
        ({"logprobs": 21}, "logprobs must be in 0..20"),
        ({"stop": ["w1", ""]}, "stop[1] is an empty string"),
        ({"stop_token_ids": [3, -1]}, f"sampling.stop_token_ids[1] = -1 is outside the vocabulary [0, {VOCAB})"),
        ({"stop_token_ids": [VOCAB]}, f"sampling.stop_token_ids[0] = {VOCAB} is outside the vocabulary"),
    ],
)
def test_bad_sampling(validator: RequestValidator, sampling: dict, fragment: str) -> None:
    message = refused(validator, tokens(1, 2, **sampling))
    assert fragment in message and message.startswith("sampling")


def test_lengths(validator: RequestValidator) -> None:  # context 32, smallest KV cache 24 tokens
    assert "prompt has 32 tokens but the model's context is 32; shorten the prompt" in refused(
        validator, tokens(*[1] * 32, max_tokens=1)
    )
    message = refused(validator, tokens(*[1] * 20, max_tokens=13))
    assert "prompt (20 tokens) + max_tokens (13) exceeds the model's context of 32" in message
    assert "lower max_tokens to at most 12" in message
    message = refused(validator, tokens(*[1] * 20, max_tokens=5))
    assert "smallest worker holds (24 tokens); lower max_tokens to at most 4" in message
    assert "shorten the prompt" in refused(validator, tokens(*[1] * 24, max_tokens=1))
    validator.validate(tokens(*[1] * 20, max_tokens=4))  # exactly the KV capacity fits


def test_request_ids(validator: RequestValidator) -> None:
    assert f"at most {MAX_REQUEST_ID_LEN}" in refused(validator, tokens_with(1, request_id="x" * 257))
    validator.validate(tokens_with(1, request_id="x" * MAX_REQUEST_ID_LEN))
    assert "printable" in refused(validator, tokens_with(1, request_id="a\nb"))
    message = refused(validator, tokens_with(1, request_id="busy"), in_flight={"busy"})
    assert "request_id 'busy' is already in flight; use a unique id" in message
    # "busy"'s first retry runs on the workers as "busy~retry1": a client may not take that id
    assert "must not contain '~retry'" in refused(
        validator, tokens_with(1, request_id="busy~retry1"), in_flight={"busy"}
    )
    validator.validate(tokens_with(1, request_id="a~b-retry"))  # "~" alone is fine


def test_model_facts() -> None:
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        ModelFacts(vocab_size=0, max_model_len=8, kv_capacity_tokens=8)
    info = ModelInfo(
        name="m", fingerprint="f", vocab_size=64, max_model_len=32, eos_token_ids=[2], kv_capacity_tokens=100
    )
    facts = ModelFacts.from_model_infos([info, ModelInfo(**{**_fields(info), "kv_capacity_tokens": 48})])
    assert facts == ModelFacts(vocab_size=64, max_model_len=32, kv_capacity_tokens=48)
    with pytest.raises(ValueError, match="workers serve different models"):
        ModelFacts.from_model_infos([info, ModelInfo(**{**_fields(info), "fingerprint": "g"})])
    with pytest.raises(ValueError, match="at least one"):
        ModelFacts.from_model_infos([])


def _fields(info: ModelInfo) -> dict:
    return {name: getattr(info, name) for name in info.__struct_fields__}


def test_operator_caps_on_prompt_tokens_and_max_tokens(tokenizer: Tokenizer) -> None:
    capped = RequestValidator(
        ModelFacts(vocab_size=VOCAB, max_model_len=32, kv_capacity_tokens=24),
        tokenizer,
        max_prompt_tokens=4,
        max_tokens=3,
    )
    assert capped.validate(tokens(7, 8, 9, 10, max_tokens=3)).prompt_token_ids == [7, 8, 9, 10]
    assert refused(capped, tokens(7, 8, 9, 10, 11, max_tokens=2)) == (
        "prompt has 5 tokens; this server allows at most 4 per request; shorten the prompt"
    )
    assert refused(capped, tokens(7, max_tokens=4)) == "max_tokens is 4; this server allows at most 3 per request"
