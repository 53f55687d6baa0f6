"""A request inside the engine: its tokens, progress and state.

Life cycle (states are `RequestStatus`):

    WAITING ──schedule──> RUNNING ──stop / length / abort──> FINISHED_*
       ^                     │
       └──── PREEMPTED <─────┘  (blocks ran out: KV dropped, recomputed later)

    Disaggregated serving adds two roles (see EngineCore):

    prefill:  WAITING ─> RUNNING ─token 1─> KV_LEASED ──release_kv──> (gone, blocks freed)
              (the prompt's blocks stay held until decode has pulled them)
    decode:   add_remote_request ─token 1 replayed─> WAITING_FOR_REMOTE_KV
              ─allocate_remote_kv─> (blocks allocated, transfer in flight)
              ─finish_remote_kv─> WAITING (prompt counted as computed) ─> RUNNING ...

`token_ids` is prompt + output so far. `num_computed_tokens` counts tokens whose
KV is in the cache; the scheduler hands out the next `num_tokens - num_computed`
(or a chunk of them). After a preemption `num_computed_tokens` drops to 0 and
the prompt+output is prefilled again; the sampler state carries on.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from common.contract import acceptance_length
from common.sampling_params import SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import SamplingState, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    KV_LEASED = "kv_leased"  # prefill role: done computing, blocks held for a decode worker to pull
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until scheduled
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    text: str = ""  # output text so far (cut at a stop string)
    sent_text_len: int = 0  # characters of `text` already streamed
    checked_text_len: int = 0  # characters of `text` already searched for stop strings
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None  # first time the scheduler gave it tokens to compute
    first_token_time: float | None = None
    kv_handoff: bool = False  # prefill role: after token 1, keep the blocks leased instead of decoding on
    # speculative decoding (engine/spec_decode/): this step's proposed tokens (not in token_ids until accepted)
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: object = None  # draft proposer, random rows: [len(spec_token_ids), V] the draft sampled from
    draft_sampling: object = None  # draft proposer, seeded random requests: the draft's own SamplingState
    spec_k: int = 0  # proposals allowed next step (adapted to what was accepted; 0: num_speculative_tokens)
    draft_computed: int = 0  # draft proposer: positions whose draft KV is valid (reset by preemption)
    spec_steps: int = 0  # verification steps, tokens proposed, tokens accepted (acceptance length =
    spec_proposed: int = 0  # (accepted + steps) / steps tokens per verification step)
    spec_accepted: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def acceptance_length(self) -> float | None:
        return acceptance_length(self.spec_steps, self.spec_accepted)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:  # lengths only, never prompt text or token ids
        return (
            f"Request(id={self.request_id!r}, prompt_len={self.num_prompt_tokens}, "
            f"output_len={self.num_output_tokens}, computed={self.num_computed_tokens}, status={self.status.name})"
        )
