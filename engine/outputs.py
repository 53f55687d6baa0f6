"""What the engine hands back: per-step deltas and finished completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass
class StepOutput:
    """Tokens a request produced in one engine step (for streaming)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    kv_block_ids: list[int] | None = None  # prefill role: the leased blocks holding the prompt's KV
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (set with token 1)
    # with a request's first token: time.monotonic() of its arrival, first schedule and first token
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class CompletionOutput:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0

    def to_dict(self) -> dict:
        d = {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.token_ids),
            "cached_tokens": self.num_cached_tokens,
        }
        if self.logprobs is not None:
            d["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t, p] for t, p in lp.top]} for lp in self.logprobs
            ]
        return d
