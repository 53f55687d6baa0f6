"""The OpenAI API as the HTTP door takes it: request models, and their translation into tandem.v1
`GenerateRequest`s (one per choice) that the request path validates like any gRPC request.

Fields, as OpenAI and vLLM define them:

    both      model (the served model's name or path), max_tokens, temperature, top_p, seed, stop,
              n (choices of one prompt; choice j gets seed + j, and all but the first are routed once
              the first has its first token, so they hit the prefix cache the first one filled),
              stream, stream_options.include_usage, frequency_penalty, presence_penalty, user;
              vLLM's extensions top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids
    /v1/completions       prompt: a string, a list of strings, token ids, or a list of token id lists
                          (choice index = prompt index * n + j); logprobs: 0..20 top tokens
    /v1/chat/completions  messages (roles system | developer | user | assistant; content a string or
                          text parts), max_completion_tokens (wins over max_tokens; neither: the rest
                          of the context), logprobs (bool) + top_logprobs (0..20)

A field Tandem does not implement (tools, response_format, logit_bias, echo, suffix, ...) set to
anything but its "off" value is a 400 that names it; an unknown field is a 400 too. Nothing is
silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.contract import MAX_LOGPROBS
from router.errors import RequestValidationError
from tandem_api.v1 import generation_pb2 as pb

# OpenAI fields Tandem does not implement -> the values that mean "off" (accepted, as clients send them)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "best_of": (None,),
    "min_tokens": (None, 0),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None
    # the fields of UNSUPPORTED the request set, taken out before the schema is checked (set only here)
    unsupported: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _set_aside_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data["unsupported"] = {name: data.pop(name) for name in UNSUPPORTED if name in data}
        return data

    def check_supported(self) -> None:
        for name, value in self.unsupported.items():
            off = UNSUPPORTED[name]
            if name == "best_of" and value == self.n:
                continue  # best_of == n is plain sampling
            if not any(value == o and type(value) is type(o) for o in off):
                raise UnsupportedField(name)
        if self.n < 1:
            raise RequestValidationError(f"n must be >= 1, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise RequestValidationError("stream_options is only allowed with stream: true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int | None, logprobs: int | None, seed_offset: int) -> pb.SamplingOptions:
        s = pb.SamplingOptions(ignore_eos=self.ignore_eos)
        if max_tokens is not None:
            s.max_tokens = max_tokens
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, value)
        if self.seed is not None:
            s.seed = self.seed + seed_offset
        if self.stop is not None:
            s.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.stop_token_ids:
            s.stop_token_ids.extend(self.stop_token_ids)
        if logprobs is not None:
            s.logprobs = logprobs
        return s


class UnsupportedField(RequestValidationError):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not supported by Tandem; remove it from the request", param=name)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None

    def requests(self, request_id: str) -> list[tuple[int, pb.GenerateRequest]]:
        """(choice index, GenerateRequest) for every prompt x n."""
        self.check_supported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestValidationError(
                f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}", param="logprobs"
            )
        prompts: list[str | list[int]]
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [[x for x in p if isinstance(x, int)]]
        else:
            prompts = [x for x in p if isinstance(x, (str, list))]
        if not prompts:
            raise RequestValidationError("prompt is an empty list: send at least one prompt", param="prompt")
        out = []
        for i, prompt in enumerate(prompts):
            for j in range(self.n):
                index = i * self.n + j
                r = pb.GenerateRequest(
                    request_id=f"{request_id}-{index}",
                    sampling=self.sampling(self.max_tokens if self.max_tokens is not None else 16, self.logprobs, j),
                )
                if isinstance(prompt, str):
                    r.prompt = prompt
                else:
                    r.token_ids.ids.extend(prompt)
                out.append((index, r))
        return out


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def requests(self, request_id: str) -> list[tuple[int, pb.GenerateRequest]]:
        self.check_supported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestValidationError("top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise RequestValidationError(
                    f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {self.top_logprobs}", param="top_logprobs"
                )
        if not self.messages:
            raise RequestValidationError("messages is empty: send at least one message", param="messages")
        chat = pb.ChatMessages()
        for i, m in enumerate(self.messages):
            role = CHAT_ROLES.get(m.role)
            if role is None:
                raise RequestValidationError(
                    f"messages[{i}].role {m.role!r} is not supported (allowed: {', '.join(CHAT_ROLES)})",
                    param=f"messages[{i}].role",
                )
            chat.messages.add(role=role, content=self._text(i, m))
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        out = []
        for j in range(self.n):
            r = pb.GenerateRequest(request_id=f"{request_id}-{j}", sampling=self.sampling(max_tokens, logprobs, j))
            r.chat.CopyFrom(chat)
            out.append((j, r))
        return out

    @staticmethod
    def _text(i: int, m: ChatMessage) -> str:
        if m.content is None:
            return ""
        if isinstance(m.content, str):
            return m.content
        texts = []
        for k, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise RequestValidationError(
                    f"messages[{i}].content[{k}] is of type {part.type!r}; Tandem serves "
                    "text only (parts of type 'text')",
                    param=f"messages[{i}].content",
                )
            texts.append(part.text)
        return "".join(texts)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    root: str | None = None
    max_model_len: int | None = None
    permission: list = Field(default_factory=list)
