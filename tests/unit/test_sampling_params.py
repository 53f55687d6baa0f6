"""SamplingParams validation: every bad value raises InvalidSamplingParamsError naming the field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from common.errors import InvalidRequestError, InvalidSamplingParamsError
from common.sampling_params import MAX_LOGPROBS, MAX_SEED, SamplingParams

BAD = [
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", "16"),
    ("max_tokens", 16.0),
    ("max_tokens", True),
    ("max_tokens", None),
    ("temperature", -1.0),
    ("temperature", -1e-9),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.7"),
    ("temperature", None),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_p", "0.9"),
    ("top_k", -1),
    ("top_k", -3),
    ("top_k", 2.5),
    ("top_k", "5"),
    ("top_k", False),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", math.nan),
    ("min_p", -math.inf),
    ("min_p", "0.1"),
    ("seed", -1),
    ("seed", MAX_SEED + 1),
    ("seed", 1.0),
    ("seed", "42"),
    ("seed", True),
    ("stop", ("",)),
    ("stop", ["ok", ""]),
    ("stop", [3]),
    ("stop", 5),
    ("stop", None),
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", [1, -2]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", ["1"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 7),
    ("stop_token_ids", "12"),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", 2.0),
    ("logprobs", "3"),
    ("logprobs", True),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("include_stop_str_in_output", 0),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_raises_with_field_name(field: str, value: Any) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)
    assert isinstance(info.value, InvalidRequestError)


@pytest.mark.parametrize(
    ("field", "value", "expected_text"),
    [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("temperature", -1.0, "temperature must be >= 0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -3, "top_k must be >= 0 (0 disables it), got -3"),
    ],
)
def test_messages_say_what_to_change(field: str, value: Any, expected_text: str) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=expected_text.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{field: value})


GOOD = [
    {},
    {"max_tokens": 1},
    {"temperature": 0},
    {"temperature": 0.0},
    {"temperature": 2},
    {"temperature": 100.0},
    {"top_p": 1e-6},
    {"top_p": 1},
    {"top_k": 0},
    {"top_k": 1},
    {"top_k": 10**9},
    {"min_p": 0},
    {"min_p": 1},
    {"min_p": 0.05},
    {"seed": 0},
    {"seed": MAX_SEED},
    {"stop": ["\n", "###"]},
    {"stop": "END"},
    {"stop_token_ids": [0, 2, 50000]},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
    {"ignore_eos": True, "include_stop_str_in_output": True, "skip_special_tokens": False},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[repr(k) for k in GOOD])
def test_good_values_accepted(kwargs: dict) -> None:
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        if k not in ("stop", "stop_token_ids"):
            assert getattr(p, k) == v


def test_sequences_normalised_to_tuples_and_hashable() -> None:
    # lists and a bare string, as a decoded JSON body gives them (the fields are typed as the stored tuples)
    body: dict[str, Any] = {"stop": ["a", "bc"], "stop_token_ids": [3, 4]}
    p = SamplingParams(**body)
    assert p.stop == ("a", "bc")
    assert p.stop_token_ids == (3, 4)
    bare: dict[str, Any] = {"stop": "x"}
    assert SamplingParams(**bare).stop == ("x",)
    assert hash(p) == hash(SamplingParams(stop=("a", "bc"), stop_token_ids=(3, 4)))


def test_numbers_stored_as_float() -> None:
    p = SamplingParams(temperature=1, top_p=1, min_p=0)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float) and isinstance(p.min_p, float)


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-7}, True),
        ({"temperature": 1.0, "top_k": 1}, True),
        ({"temperature": 1.0}, False),
        ({"temperature": 0.01, "top_k": 2}, False),
        ({"temperature": 0.7, "top_p": 0.1}, False),
    ],
)
def test_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy
