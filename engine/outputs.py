"""What the engine hands back: per-step deltas and finished completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.contract import acceptance_length
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
    # speculative decoding, with the finishing output only: the request's verification steps, tokens proposed
    # and tokens accepted (acceptance length = 1 + accepted / steps)
    spec_steps: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def acceptance_length(self) -> float | None:
        return acceptance_length(self.spec_steps, self.spec_accepted)


def merge_step_outputs(outs: list[StepOutput]) -> StepOutput:
    """One request's outputs of one step (speculative decoding emits several tokens) as one delta."""
    if len(outs) == 1:
        return outs[0]
    first, last = outs[0], outs[-1]
    return StepOutput(
        request_id=first.request_id,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        new_logprobs=[lp for o in outs for lp in o.new_logprobs],
        kv_block_ids=last.kv_block_ids,
        num_cached_tokens=first.num_cached_tokens,
        arrival_time=first.arrival_time,
        first_scheduled_time=first.first_scheduled_time,
        first_token_time=first.first_token_time,
        spec_steps=last.spec_steps,
        spec_proposed=last.spec_proposed,
        spec_accepted=last.spec_accepted,
    )


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
    acceptance_length: float | None = None  # speculative decoding: mean tokens per verification step

    def to_dict(self) -> dict:
        d: dict[str, object] = {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.token_ids),
            "cached_tokens": self.num_cached_tokens,
        }
        if self.acceptance_length is not None:
            d["acceptance_length"] = round(self.acceptance_length, 4)
        if self.logprobs is not None:
            d["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t, p] for t, p in lp.top]}
                for lp in self.logprobs
            ]
        return d
