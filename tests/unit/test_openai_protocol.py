"""The OpenAI request models and their translation into tandem.v1 requests, and the one outcome table."""

from __future__ import annotations

import grpc
import pydantic
import pytest

from router.errors import OUTCOMES, AdmissionError, Outcome, RequestValidationError, WorkerFailedError, status_for
from router.http_app import _pydantic_message
from router.openai_protocol import ChatCompletionRequest, CompletionRequest


def test_every_outcome_has_a_grpc_code_and_an_http_status():
    assert set(OUTCOMES) == set(Outcome)
    assert {o.name: (s.grpc_code.name, s.http_status) for o, s in OUTCOMES.items()} == {
        "OK": ("OK", 200),
        "INVALID_ARGUMENT": ("INVALID_ARGUMENT", 400),
        "UNAUTHENTICATED": ("UNAUTHENTICATED", 401),
        "NOT_FOUND": ("NOT_FOUND", 404),
        "RESOURCE_EXHAUSTED": ("RESOURCE_EXHAUSTED", 429),
        "UNAVAILABLE": ("UNAVAILABLE", 503),
        "DEADLINE_EXCEEDED": ("DEADLINE_EXCEEDED", 504),
        "CANCELLED": ("CANCELLED", 499),
        "INTERNAL": ("INTERNAL", 500),
    }
    assert all(o.value == s.grpc_code.name for o, s in OUTCOMES.items())
    assert status_for(AdmissionError("full")) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert status_for(WorkerFailedError("boom")) == (grpc.StatusCode.INTERNAL, "boom")
    assert status_for(KeyError("x"))[0] == grpc.StatusCode.INTERNAL


def test_completion_prompts_times_n_with_seeds_and_options():
    req = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": ["a", "b"],
            "n": 2,
            "seed": 7,
            "max_tokens": 5,
            "temperature": 0.5,
            "stop": "x",
            "logprobs": 2,
            "presence_penalty": 1.0,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "best_of": 2,
        }
    )
    subs = req.requests("cmpl-1")
    assert [(i, r.request_id, r.prompt, r.sampling.seed) for i, r in subs] == [
        (0, "cmpl-1-0", "a", 7),
        (1, "cmpl-1-1", "a", 8),
        (2, "cmpl-1-2", "b", 7),
        (3, "cmpl-1-3", "b", 8),
    ]
    s = subs[0][1].sampling
    assert (s.max_tokens, s.temperature, list(s.stop), s.logprobs, s.ignore_eos) == (5, 0.5, ["x"], 2, True)
    assert s.presence_penalty == 1.0 and s.HasField("repetition_penalty") and not s.HasField("frequency_penalty")
    ids = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).requests("c")
    assert len(ids) == 1 and list(ids[0][1].token_ids.ids) == [1, 2, 3] and ids[0][1].sampling.max_tokens == 16
    many = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).requests("c")
    assert [list(r.token_ids.ids) for _, r in many] == [[1, 2], [3]]


def test_chat_messages_roles_parts_and_max_tokens():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 3,
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    [(_, r)] = req.requests("chat-1")
    assert [(m.role, m.content) for m in r.chat.messages] == [("system", "sys"), ("user", "ab")]
    assert r.sampling.max_tokens == 9 and r.sampling.logprobs == 4  # max_completion_tokens wins
    [(_, r)] = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    ).requests("c")
    assert not r.sampling.HasField("max_tokens") and not r.sampling.HasField("logprobs")  # the path fills it


@pytest.mark.parametrize(
    "cls, body, param",
    [
        (ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content",
        ),
        (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (CompletionRequest, {"prompt": [], "n": 1}, "prompt"),
        (CompletionRequest, {"prompt": "x", "best_of": 3}, "best_of"),
        (CompletionRequest, {"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_what_tandem_does_not_do_is_refused_by_name(cls, body, param):
    with pytest.raises(RequestValidationError) as e:
        cls.model_validate({"model": "m", **body}).requests("r")
    assert e.value.param == param


def test_off_values_of_unsupported_fields_pass():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": None,
            "logit_bias": {},
            "store": False,
            "response_format": {"type": "text"},
            "tool_choice": "none",
        }
    )
    assert len(req.requests("r")) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),  # strict: a bool is not an int
        ({"model": "m", "prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"model": "m", "prompt": "x", "bogus": 1}, "unknown field 'bogus'"),
        ({"prompt": "x"}, "model is required"),
    ],
)
def test_schema_errors_name_the_field(body, message):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate(body)
    text, param = _pydantic_message(e.value)
    assert message in text and param is not None and param.split(".")[0] in message
