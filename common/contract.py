"""The router-worker contract: everything that crosses between the router and a worker, in one module.

    router --prefill(rid, prompt_ids, params)----------> P    returns PrefillResult
           <---------------------------------------------      (first chunk + KVHandle)
    router --decode(rid, prompt_ids, params, result)---> D    yields StreamChunk...

What crosses (Ray pickles it between processes; msgspec Structs and dataclasses, no torch, so the
router can import all of it):

- the worker's remote methods: `WorkerAPI` (what `router/workers.py` calls, by name, typed; deploy
  calls `profile` with a `ProfilePlan` and gets `StepTiming`s back);
- messages: `StreamChunk`, `PrefillResult` (+ `KVHandle`), `WorkerStatus`, `KVEventsReply`,
  `ModelInfo` (below), KV events and snapshots (`KVEventBatch`, `KVSnapshot`, from
  common/kv_events.py), `SamplingParams` (common/sampling_params.py), the tokenizer (`PromptTokenizer`:
  what the router uses of the engine's pickled tokenizer);
- `Role` and `Health`: the worker roles and health states (string enums: they equal the strings
  earlier versions sent);
- errors: `EngineError` and its kinds (bad input, the client's to fix) and `WorkerError` and its
  kinds (a worker failed the request), from common/errors.py;
- `WIRE_VERSION`: a change to any of the above is a new version. Every worker reports its version in
  `ModelInfo.wire_version`; `check_wire_version` refuses another one, naming both
  (deploy.cluster.check_workers_agree calls it when workers start and when one joins).

The router imports worker-facing types from this module only (tests/unit/test_contract.py).
"""

from __future__ import annotations

import enum
from typing import Any, AsyncIterator, Protocol, Sequence

import msgspec

from common.errors import (
    AdmissionTimeoutError,
    ConfigError,
    EngineError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    KVTransferFailedError,
    OutOfKVCacheError,
    PromptTooLongError,
    WorkerError,
    WorkerShuttingDownError,
)
from common.kv_events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    KVSnapshot,
    decode_event_batch,
    first_gap,
)
from common.perf_model import PerfEstimate
from common.sampling_params import MAX_LOGPROBS, SamplingParams

__all__ = [
    "WIRE_VERSION", "acceptance_length", "Role", "Health", "WireVersionError", "check_wire_version", "WorkerAPI",
    "PromptTokenizer", "ProfilePlan", "StepTiming",
    "LogprobEntry", "StreamChunk", "KVHandle", "PrefillResult", "WorkerStatus", "KVEventsReply", "ModelInfo",
    "PerfEstimate", "SamplingParams", "MAX_LOGPROBS", "KVEventBatch", "KVSnapshot", "KVEventDecodeError",
    "AllCleared", "BlockRemoved", "BlockStored", "decode_event_batch", "first_gap",
    "EngineError", "InvalidRequestError", "InvalidSamplingParamsError", "PromptTooLongError", "OutOfKVCacheError",
    "ConfigError", "WorkerError", "KVTransferFailedError", "AdmissionTimeoutError", "WorkerShuttingDownError",
]  # fmt: skip

WIRE_VERSION = 8  # 1: first version (issue 3); 2: WorkerStatus.incarnation, KVHandle.issued_at, prior_ids (issue 7)
#                  3: WorkerStatus.perf (issue 16)
#                  4: speculative counters on StreamChunk / WorkerStatus, ModelInfo.speculative and .wire_version
#                     (issue 19); checked when workers start and join (deploy.cluster.check_workers_agree)
#                  5: WorkerAPI.profile, ProfilePlan, StepTiming (issue 20)
#                  6: WorkerStatus.live_step / live_steps: the step model refitted from live steps (issue 20)
#                  7: WorkerStatus.widened_steps, lent_s, tpot_slack_s, ProfilePlan.threads: sharing a host's
#                     cores (issue 16)
#                  8: WorkerStatus.live_busy, live_decode: the host's load beside live_step's steps and the
#                     decode step they typically were (issue 20)


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"  # one worker does both phases


class Health(enum.StrEnum):
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNKNOWN = "UNKNOWN"  # the router has no status from the worker yet


class WireVersionError(ConfigError):
    """A worker speaks another version of this contract."""


def check_wire_version(theirs: int, who: str = "a worker") -> None:
    if theirs != WIRE_VERSION:
        raise WireVersionError(
            f"{who} speaks wire version {theirs or '< 4'}, this router {WIRE_VERSION}: run one "
            "Tandem version on every node (common/contract.py)"
        )


def acceptance_length(steps: int, accepted: int) -> float | None:
    """Speculative decoding: tokens produced per verification step (each step's accepted proposals plus
    the target's own token), 1 + accepted / steps; None before any verification."""
    return 1.0 + accepted / steps if steps else None


class PromptTokenizer(Protocol):
    """What the router uses of the engine's tokenizer (the worker pickles its own to the router)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class LogprobEntry(msgspec.Struct, frozen=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # best first


class StreamChunk(msgspec.Struct):
    """One or more consecutive tokens of one request, as streamed by a worker."""

    request_id: str
    token_ids: list[int]
    text: str  # incremental text; never splits a multi-byte character
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | None = None  # the stop string or str(token id) that ended it
    logprobs: list[LogprobEntry] = []
    prompt_tokens: int = 0  # set on the last chunk
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (last chunk)
    kv_transfer_s: float = 0.0  # decode: time spent pulling the KV cache (last chunk)
    kv_transfer_bytes: int = 0  # decode: bytes pulled (last chunk)
    error: str | None = None  # message when finish_reason == "error"
    # speculative decoding (last chunk): the request's verification steps, tokens proposed and accepted
    spec_steps: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0

    def merge(self, other: StreamChunk) -> None:
        """Append a later chunk of the same request to this one (streams coalesce under load)."""
        self.token_ids.extend(other.token_ids)
        self.text += other.text
        self.logprobs.extend(other.logprobs)
        for name in (
            "finished",
            "finish_reason",
            "stop_reason",
            "prompt_tokens",
            "cached_tokens",
            "kv_transfer_s",
            "kv_transfer_bytes",
            "error",
            "spec_steps",
            "spec_proposed",
            "spec_accepted",
        ):
            value = getattr(other, name)
            if value:
                setattr(self, name, value)


class KVHandle(msgspec.Struct, frozen=True):
    """Where a prefill worker keeps a request's prompt KV until decode pulls it."""

    agent_name: str  # the prefill worker's leader (rank 0) transport agent; names the worker to its peers
    block_ids: list[int]  # P's blocks, in token order
    num_tokens: int  # prompt tokens whose KV those blocks hold
    lease_s: float  # how long P keeps them after prefill, if nobody pulls or releases
    issued_at: float = 0.0  # P's wall clock (time.time()) when the lease began: D ends its pull before expiry
    trace_context: dict[str, str] = {}  # W3C traceparent of P's span: decode's transfer span links to it


class PrefillResult(msgspec.Struct, frozen=True):
    first: StreamChunk  # token 1; finished=True when it already ended the request
    kv: KVHandle | None  # None when first.finished (P freed the blocks)
    prefill_s: float  # P's time from receipt to token 1 (its own queueing included)
    worker_id: str
    cached_tokens: int = 0  # prompt tokens P found in its prefix cache


class WorkerStatus(msgspec.Struct, frozen=True):
    worker_id: str
    role: str  # a Role
    health: str  # a Health
    kv_blocks_total: int
    kv_blocks_free: int  # cached-but-evictable blocks count as free
    running: int
    waiting: int
    leased: int  # prefill: prompts whose KV waits to be pulled
    node_id: str
    device: str
    block_size: int
    dtype: str
    transfers_in_flight: int = 0  # decode: pulls not yet done
    prefill_tokens: int = 0  # tokens still to compute before a first token (queued + running prefill)
    max_num_seqs: int = 0  # the scheduler's limit on running requests (0: not reported)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0  # ... of which found there (hit rate = hit / query)
    spec_steps: int = 0  # speculative decoding since start: verification steps, tokens proposed, accepted
    spec_proposed: int = 0
    spec_accepted: int = 0
    widened_steps: int = 0  # steps run on cores other workers on the host left idle or lent, since start
    lent_s: float = 0.0  # seconds this worker paused so a peer's prefill could use its core, since start
    # a lending decode worker (worker_core/core_share.py LendBudget): the smallest TPOT slack of its running
    # requests (s; TPOT_SLACK_IDLE_S when none runs); None where the worker does not judge it
    tpot_slack_s: float | None = None
    incarnation: str = ""  # this worker process (its KV publisher epoch): a new one means Ray restarted it
    perf: PerfEstimate = msgspec.field(default_factory=PerfEstimate)  # step times measured while serving
    # the planner's step model (planner/model.py StepModel coefficients: base, per prompt token, per attention
    # pair, per decode row, per context token) refitted from this worker's steps after its warm-up; () until then
    live_step: tuple[float, ...] = ()
    live_steps: int = 0  # steps behind live_step
    # other workers of this host stepping while those steps ran (mean per step): live_step includes
    # their contention, which a planner that models contention itself takes out again (planner/policy.py)
    live_busy: float = 0.0
    # (rows, context per row): the median decode-only step behind live_step, where the fit has its steps; ()
    live_decode: tuple[float, ...] = ()


class KVEventsReply(msgspec.Struct, frozen=True):
    """One answer to a router's `kv_events(after_seq, timeout_s)` long poll."""

    epoch: str  # the worker's publisher instance; a change means "re-sync from a snapshot"
    events: bytes  # common.kv_events.encode_event_batch (versioned); may hold no event (timeout)
    status: WorkerStatus  # the worker's load as of this reply


class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    fingerprint: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    kv_capacity_tokens: int  # blocks * block_size of this worker's cache
    speculative: str = ""  # EngineCore.speculative_description(): every worker of a cluster must agree
    wire_version: int = 0  # the worker's WIRE_VERSION (0: older than version 4, which added this field)


# One engine step as `tandem profile` measured it: (prompt tokens, attention pairs, decode rows, decode context,
# seconds); the first four are planner.model.StepShape's fields (engine.scheduler.SchedulerOutput.features).
StepTiming = tuple[int, float, int, int, float]


class ProfilePlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker's `profile` measures (worker_core/profiling.py runs it; the module says how).

    Every size is capped by the worker: its token budget (max_num_batched_tokens), max_num_seqs, the
    model's context and its KV capacity; points that cannot fit are left out, not shrunk silently.
    """

    warmup_steps: int = 3  # steps of a first short request, run and not recorded
    prefill_lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)  # prompts alone, one chunk each
    prefill_repeats: int = 2  # each prompt length this many times (distinct prompts)
    cached: tuple[tuple[int, int], ...] = ((256, 64), (1024, 32), (1024, 256), (1920, 128))  # (cached, new)
    decode_contexts: tuple[int, ...] = (64, 512, 1536)  # tokens each decode row's prompt holds
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # requests decoding together
    decode_steps: int = 4  # steps timed per (context, batch)
    mixed: tuple[tuple[int, int], ...] = ((4, 512), (16, 128), (32, 32))  # (decode batch, prompt beside it)
    seed: int = 0  # of the synthetic token ids
    # torch threads of the sweep (0: the worker's own): more than its own measures a step widened onto cores a
    # peer lends (worker_core/core_share.py); the caller makes sure they are idle
    threads: int = 0

    @classmethod
    def quick(cls) -> ProfilePlan:
        """A few points of each kind, for tests and a first look (`tandem profile --quick`)."""
        return cls(
            warmup_steps=2,
            prefill_lengths=(16, 64, 256),
            prefill_repeats=1,
            cached=((128, 32),),
            decode_contexts=(32, 256),
            decode_batches=(1, 4, 8),
            decode_steps=2,
            mixed=((4, 64),),
        )


class WorkerAPI(Protocol):
    """The remote methods of a worker actor (worker_core/actor.py and the role classes) that the router and
    deploy call; `router/workers.py` calls them through Ray by these names. Decode and generate stream
    (Ray generators); a prefill worker answers decode with nothing (it has no such method), and so on:
    `ROLE_METHODS` says which role answers which request method."""

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None,
        prior_ids: list[int],
    ) -> PrefillResult: ...

    def decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prefill: PrefillResult | None,
        trace_ctx: dict[str, str] | None,
        prior_ids: list[int],
    ) -> AsyncIterator[StreamChunk]: ...

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None,
        prior_ids: list[int],
    ) -> AsyncIterator[StreamChunk]: ...

    async def abort(self, request_id: str) -> bool: ...

    async def release(self, request_id: str) -> bool: ...

    async def status(self) -> WorkerStatus: ...

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply: ...

    async def kv_snapshot(self) -> KVSnapshot: ...

    async def wait_idle(self, timeout_s: float) -> bool: ...

    async def profile(self, plan: ProfilePlan) -> list[StepTiming]: ...

    async def model_info(self) -> ModelInfo: ...

    async def get_tokenizer(self) -> PromptTokenizer: ...

    async def handshake_payload(self) -> bytes: ...

    async def add_peer(self, payload: bytes) -> str: ...

    async def remove_peer(self, leader_agent: str) -> bool: ...


ROLE_METHODS: dict[Role, frozenset[str]] = {  # the request methods each role's actor answers
    Role.PREFILL: frozenset({"prefill", "release", "generate", "abort"}),
    Role.DECODE: frozenset({"decode", "generate", "abort"}),
}
