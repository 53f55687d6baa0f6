"""Token-budget scheduler: continuous batching, chunked prefill, preemption.

Each step hands out `{request: num_new_tokens}` under two limits:
`max_num_batched_tokens` (the token budget) and `max_num_seqs` (running requests).
"Prefill" and "decode" are not separate phases: a request simply has
`num_tokens - num_computed_tokens` tokens left to compute (1 while decoding).

Order of a step:
1. RUNNING requests, oldest first, each gets min(left, budget) tokens. If the
   KV cache cannot hold them, the NEWEST running request is preempted (blocks
   freed, progress reset, sent back to the head of the waiting queue) until it
   fits; a request that has to preempt itself waits for the next step.
2. WAITING requests, first come first served, join while budget and seats
   remain. The first schedule of a request looks up its prefix in the cache;
   with chunked prefill a long prompt takes what budget is left and continues
   next step. A waiting request that does not fit stops admission (FCFS).
With `prefill_join_tokens` set (served workers), prompt tokens in both stages
go to the oldest prompt first and later prompts join only whole and short
(common/prefill_share.py: TTFT first); decode rows are not affected. With
`ttft_target_s` set, a waiting prompt that would miss it (by this worker's
measured prefill speed) yields its turn to one that can still meet it (SLO
triage, ibid.).

The scheduler never touches tensors; the runner executes its output.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.prefill_share import PrefillShare, hopeless, meetable_first
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus

PREFILL_SPEED_MIN_TOKENS = 64  # SLO triage: prefill steps with fewer prompt tokens do not set its speed


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    spec_slots: int = 0  # of num_new_tokens, slots for proposed tokens (the engine shrinks to what is proposed)

    @property
    def start(self) -> int:
        """Position of the first token computed this step."""
        return self.request.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decoding(self) -> int:
        """Requests computing one token (decoding, or a prompt with one token left) or verifying proposals."""
        return sum(1 for s in self.scheduled if s.num_new_tokens == 1 or s.spec_slots)

    def features(self) -> tuple[int, float, int, int]:
        """What the step computes, as the features of the performance model (planner.model.StepShape; the
        engine does not import the planner): (prompt tokens, attention pairs, decode rows, decode context).

        Call once proposals are attached (num_new_tokens final). A prefill chunk of n tokens after ctx
        computed ones adds n prompt tokens and n * (ctx + (n + 1) / 2) query-key pairs. A request computing
        one token, and each token of a verification (1 + proposed tokens, each its own row attending to the
        cache up to its position), is a decode row, as the model runner batches them; a row's context is
        the tokens its attention reads, itself included (position + 1, as planner/sim_worker.py counts)."""
        tokens = rows = context = 0
        pairs = 0.0
        for s in self.scheduled:
            n, ctx = s.num_new_tokens, s.request.num_computed_tokens
            if n == 1 or s.spec_slots:
                rows += n
                context += n * ctx + n * (n + 1) // 2
            else:
                tokens += n
                pairs += n * (ctx + (n + 1) / 2)
        return tokens, pairs, rows, context


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.spec_tokens = 0  # proposed tokens a decoding request may verify per step (0: no speculation)
        self.spec_disable_batch_size = 0  # ... unless more requests than this are decoding (0: never off)
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache (first schedule), since start
        self.prefix_hit_tokens = 0  # ... of which found there
        # SLO triage: seconds per prompt token of this worker's recent prefill steps (EngineCore measures them;
        # 0 until then: only a request already past its target counts as lost)
        self.prefill_token_s = 0.0

    def count_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_query_tokens += prompt_tokens
        self.prefix_hit_tokens += hit_tokens

    # ---- queue management ----------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus, reason: FinishReason) -> None:
        """Take a request out of the queues and give its blocks back (any state, idempotent)."""
        if request.status.finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = status
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)

    def hand_off(self, request: Request) -> None:
        """Prefill role: take a request out of the queues but keep its blocks (they are leased).

        The engine now owns the lease; `KVCacheManager.free` ends it.
        """
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.KV_LEASED
        self.requests.pop(request.request_id, None)

    def add_remote(self, request: Request) -> None:
        """Decode role: known, but not schedulable until its prompt KV has arrived."""
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV

    def resume_remote(self, request: Request) -> None:
        """Decode role: the prompt KV is in place; join the queue like any waiting request."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED, FinishReason.ABORT)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kept: list[Request] = []
        queue = list(self.running)
        k_max = self._spec_tokens_this_step()
        prompts = PrefillShare(self.config.prefill_join_tokens)
        while queue and budget > 0:
            req = queue.pop(0)
            left = req.num_tokens - req.num_computed_tokens
            k = 0
            if left > 1:  # a chunked prompt continues
                n = prompts.take(left, budget)
                if not n:
                    kept.append(req)  # still running: its prompt continues in a later step
                    continue
            else:
                # a seeded random request speculates whatever the batch: its draws (hence its tokens) then
                # depend on its seed and prompt only, never on how many others were decoding beside it
                k_req = self.spec_tokens if req.params.seed is not None and not req.params.greedy else k_max
                k = self._spec_slots(req, k_req, budget) if k_req else 0
                n = min(left + k, budget)
            while True:
                blocks = self.kv.allocate(req.request_id, req.token_ids, req.num_computed_tokens, n)
                if blocks is not None:
                    break
                victim = queue.pop() if queue else req  # newest not-yet-scheduled running request
                self._preempt(victim, out)
                if victim is req:
                    break
            if blocks is None:
                break
            kept.append(req)
            out.scheduled.append(ScheduledRequest(req, n, blocks, k))
            budget -= n
        # running requests left unscheduled (budget ran out) stay running
        self.running = kept + [r for r in queue]

        target = self.config.ttft_target_s
        now = self.clock() if target else 0.0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if target:  # SLO triage: a prompt that can still meet the target goes before those that cannot
                meetable_first(self.waiting, lambda r: self._lost(r, now, target))
            req = self.waiting[0]
            hit = None
            if req.num_computed_tokens == 0:
                hit = self.kv.lookup_prefix(req.token_ids)
            computed = hit.num_tokens if hit is not None else req.num_computed_tokens
            left = req.num_tokens - computed
            if left > budget and not self.config.enable_chunked_prefill:
                break
            n = prompts.take(left, budget) if left > 1 else 1
            if not n:
                break
            blocks = self.kv.allocate(req.request_id, req.token_ids, computed, n, prefix_hit=hit)
            if blocks is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
                req.first_scheduled_time = self.clock()
                self.count_prefix_lookup(req.num_prompt_tokens, computed)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, blocks))
            budget -= n
        return out

    def observe_prefill(self, prompt_tokens: int, seconds: float) -> None:
        """A step that computed `prompt_tokens` prompt tokens took `seconds` (EngineCore, after each step): the
        triage's speed, an average over recent steps of at least PREFILL_SPEED_MIN_TOKENS prompt tokens."""
        if prompt_tokens >= PREFILL_SPEED_MIN_TOKENS and seconds > 0:
            rate = seconds / prompt_tokens
            self.prefill_token_s = rate if not self.prefill_token_s else 0.7 * self.prefill_token_s + 0.3 * rate

    def _lost(self, req: Request, now: float, target: float) -> bool:
        if req.num_output_tokens:
            return False
        return hopeless(
            now - req.arrival_time, (req.num_tokens - req.num_computed_tokens) * self.prefill_token_s, target
        )

    def _spec_tokens_this_step(self) -> int:
        """Proposal slots per decoding request this step: 0 when speculation is off or the decode batch is large."""
        k = self.spec_tokens
        if k and self.spec_disable_batch_size:
            decoding = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
            if decoding > self.spec_disable_batch_size:
                return 0
        return k

    @staticmethod
    def _spec_slots(req: Request, k_max: int, budget: int) -> int:
        """Slots for proposed tokens: at most the request's adapted `spec_k`, never more than it can still
        emit (one token of each step is the target's own), nor past the token budget. A prefill-role
        request hands off after token 1."""
        if req.kv_handoff:
            return 0
        k = min(k_max, req.spec_k) if req.spec_k else k_max
        return max(0, min(k, req.params.max_tokens - req.num_output_tokens - 1, budget - 1))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.draft_computed = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)
        out.preempted.append(req)
