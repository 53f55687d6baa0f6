"""From a `GenerateRequest` to what the workers take: (request id, prompt token ids, SamplingParams).

Everything a client can get wrong is caught here, before any worker sees the
request, and raised as `RequestValidationError` (INVALID_ARGUMENT) with a message
naming the field and what to change. The checks mirror `EngineCore.validate` so a
request that passes here is not refused by a worker for its shape:

    input      exactly one of prompt | token_ids | chat; none of them empty
    chat       roles system | user | assistant; template errors pass through
    token ids  every id in [0, vocab_size)
    length     prompt < max_model_len; prompt + max_tokens <= max_model_len
    KV cache   prompt + max_tokens <= the smallest worker's KV capacity (tokens)
    sampling   every SamplingParams error, message passed through; stop_token_ids in the vocabulary
    id         <= 256 printable characters, no "~retry" (retries' ids), not already in flight
               (empty: the router makes one)

Decisions:
- Float fields arrive as proto `float` (32-bit); they are rounded to 7 significant
  digits (`0.7f` -> 0.7, not 0.699999988...), so a request sent over gRPC samples
  exactly like the same numbers given to the offline `LLM`.
- Tokenizing runs inline on the event loop: the Rust tokenizer encodes a few
  thousand tokens in about a millisecond, less than a thread hop would cost at
  that size, and gRPC's 4 MiB message cap bounds the worst case.
- Defaults (max_tokens 16, temperature 1.0, ...) are SamplingParams', as the
  proto documents.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from common.contract import InvalidRequestError, InvalidSamplingParamsError, ModelInfo, PromptTokenizer, SamplingParams
from router.errors import RequestValidationError
from tandem_api.v1 import generation_pb2 as pb

__all__ = ["ModelFacts", "RequestValidationError", "RequestValidator", "ValidatedRequest", "MAX_REQUEST_ID_LEN"]

MAX_REQUEST_ID_LEN = 256
# A retried request's workers know it as "<id>~retry<n>" (router/server.py): a client id of that shape could
# be another request's attempt on the same workers (its abort, bookkeeping and engine id would collide).
RETRY_ID_MARKER = "~retry"
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ModelFacts:
    """What the router must know about the served model to judge a request."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # the smallest worker's KV cache, in tokens (blocks * block_size)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_model_len", "kv_capacity_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelFacts.{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_model_infos(cls, infos: Sequence[ModelInfo]) -> ModelFacts:
        """Facts of a cluster from every worker's `model_info()`; they must serve the same model."""
        if not infos:
            raise ValueError("ModelFacts.from_model_infos needs at least one worker's ModelInfo")
        first = infos[0]
        for info in infos[1:]:
            if (info.fingerprint, info.vocab_size, info.max_model_len) != (
                first.fingerprint,
                first.vocab_size,
                first.max_model_len,
            ):
                raise ValueError(
                    f"workers serve different models: {first.name} ({first.fingerprint}, vocab {first.vocab_size}, "
                    f"context {first.max_model_len}) vs {info.name} ({info.fingerprint}, vocab {info.vocab_size}, "
                    f"context {info.max_model_len})"
                )
        return cls(first.vocab_size, first.max_model_len, min(i.kv_capacity_tokens for i in infos))


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    input_kind: str  # "prompt" | "token_ids" | "chat" (for logs; never the prompt itself)

    def __repr__(self) -> str:  # lengths only: prompts are user data
        return (
            f"ValidatedRequest(id={self.request_id!r}, {self.input_kind}, "
            f"prompt_tokens={len(self.prompt_token_ids)}, "
            f"max_tokens={self.params.max_tokens})"
        )


def _default_ids() -> Callable[[], str]:
    prefix, counter = os.urandom(4).hex(), itertools.count()
    return lambda: f"req-{prefix}-{next(counter)}"


def _f32(value: float) -> float:
    """A proto float (32-bit) as the decimal the client most likely wrote."""
    return float(f"{value:.7g}")


class RequestValidator:
    """Validates requests against one model's facts; `tokenizer` comes from a worker."""

    def __init__(
        self,
        facts: ModelFacts,
        tokenizer: PromptTokenizer,
        new_request_id: Callable[[], str] | None = None,
        max_prompt_tokens: int | None = None,
        max_tokens: int | None = None,
    ):
        """`max_prompt_tokens` / `max_tokens`: the operator's per-request caps (None: the model's limits only)."""
        self.facts = facts
        self.tokenizer = tokenizer
        self._new_id = new_request_id or _default_ids()
        self.max_prompt_tokens, self.max_tokens = max_prompt_tokens, max_tokens

    def validate(
        self, request: pb.GenerateRequest, in_flight: Container[str] = (), fill_max_tokens: bool = False
    ) -> ValidatedRequest:
        """The request ready for the workers, or `RequestValidationError` saying what to change.
        `fill_max_tokens`: an unset max_tokens means the rest of the context (and of the smallest KV
        cache, and the server's cap), as OpenAI's chat API has it, instead of the default 16."""
        request_id = self._request_id(request.request_id, in_flight)
        params = self.sampling_params(request.sampling)
        kind = request.WhichOneof("input")
        if self.max_tokens is not None and params.max_tokens > self.max_tokens:
            raise RequestValidationError(
                f"max_tokens is {params.max_tokens}; this server allows at most {self.max_tokens} per request"
            )
        prompt = self.prompt_token_ids(request)
        if self.max_prompt_tokens is not None and len(prompt) > self.max_prompt_tokens:
            raise RequestValidationError(
                f"prompt has {len(prompt)} tokens; this server allows at most "
                f"{self.max_prompt_tokens} per request; shorten the prompt"
            )
        if fill_max_tokens and not request.sampling.HasField("max_tokens"):
            room = min(self.facts.max_model_len, self.facts.kv_capacity_tokens) - len(prompt)
            if self.max_tokens is not None:
                room = min(room, self.max_tokens)
            if room >= 1:
                params = dataclasses.replace(params, max_tokens=room)
        self.check_fits(len(prompt), params.max_tokens)
        return ValidatedRequest(request_id, prompt, params, kind or "")

    # -- parts -----------------------------------------------------------------------------

    def _request_id(self, request_id: str, in_flight: Container[str]) -> str:
        if not request_id:
            return self._new_id()
        if len(request_id) > MAX_REQUEST_ID_LEN:
            raise RequestValidationError(
                f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LEN} are allowed"
            )
        if not request_id.isprintable():
            raise RequestValidationError("request_id must contain printable characters only (no control characters)")
        if RETRY_ID_MARKER in request_id:
            raise RequestValidationError(
                f"request_id must not contain {RETRY_ID_MARKER!r} (the router names "
                "retries of a request so); choose another id (or leave it empty)"
            )
        if request_id in in_flight:
            raise RequestValidationError(
                f"request_id {request_id!r} is already in flight; use a unique id (or leave it empty)"
            )
        return request_id

    def sampling_params(self, s: pb.SamplingOptions) -> SamplingParams:
        kwargs: dict = {}
        for name in ("max_tokens", "top_k", "seed", "logprobs"):
            if s.HasField(name):
                kwargs[name] = getattr(s, name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if s.HasField(name):
                kwargs[name] = _f32(getattr(s, name))
        vocab = self.facts.vocab_size
        for i, token_id in enumerate(s.stop_token_ids):
            if not 0 <= token_id < vocab:
                raise RequestValidationError(
                    f"sampling.stop_token_ids[{i}] = {token_id} is outside the vocabulary [0, {vocab})"
                )
        try:
            return SamplingParams(
                stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, **kwargs
            )
        except InvalidSamplingParamsError as exc:
            raise RequestValidationError(f"sampling: {exc}") from None

    def prompt_token_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise RequestValidationError("the request has no input: set one of prompt, token_ids or chat")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise RequestValidationError("token_ids.ids is empty: send at least one token id")
            vocab = self.facts.vocab_size
            for i, token_id in enumerate(ids):
                if not 0 <= token_id < vocab:
                    raise RequestValidationError(
                        f"token_ids.ids[{i}] = {token_id} is outside the vocabulary [0, {vocab})"
                    )
            return ids
        try:
            if kind == "prompt":
                if not request.prompt:
                    raise RequestValidationError("prompt is empty: send some text (or use token_ids / chat)")
                ids = self.tokenizer.encode(request.prompt)
            else:
                ids = self.tokenizer.encode_chat(self._chat_messages(request.chat))
        except InvalidRequestError as exc:
            raise RequestValidationError(f"{kind}: {exc}") from None
        if not ids:
            raise RequestValidationError(f"{kind} tokenizes to no tokens: send more text")
        return ids

    @staticmethod
    def _chat_messages(chat: pb.ChatMessages) -> list[dict[str, str]]:
        if not chat.messages:
            raise RequestValidationError("chat has no messages: send at least one")
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                raise RequestValidationError(
                    f"chat.messages[{i}]: unknown role {m.role!r} (allowed: {', '.join(CHAT_ROLES)})"
                )
            messages.append({"role": m.role, "content": m.content})
        return messages

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """The prompt and its completion fit the model's context and the smallest KV cache."""
        n, context, kv = prompt_tokens, self.facts.max_model_len, self.facts.kv_capacity_tokens
        if n >= context:
            raise RequestValidationError(
                f"prompt has {n} tokens but the model's context is {context}; shorten the prompt"
            )
        if n + max_tokens > context:
            raise RequestValidationError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {context}; "
                f"lower max_tokens to at most {context - n}"
            )
        if n + max_tokens > kv:
            fix = f"lower max_tokens to at most {kv - n}" if kv - n >= 1 else "shorten the prompt"
            raise RequestValidationError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs more KV cache than the smallest worker "
                f"holds ({kv} tokens); {fix}"
            )
