"""EngineCore: one engine, any role. step() = schedule -> run model -> sample -> outputs.

    add_request ──validate──> Scheduler.waiting
    step():
        out    = scheduler.schedule()            # {request: num_new_tokens}, blocks allocated
        logits = runner.execute(prepare(out))    # KV written for every scheduled token
        commit computed blocks to the prefix cache (KV events queued)
        tokens = sampler(logits, states)         # only for requests at the end of their tokens
        append, detokenize, check stop (stop ids, eos, max_tokens, stop strings) -> StepOutput
        finished requests free their blocks

Bad input raises a typed error from `common.errors` before anything is admitted,
so a rejected request leaves no trace in the queues or the block pool.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import time
from typing import Callable, Sequence

import torch

from common.errors import ConfigError, InvalidRequestError, OutOfKVCacheError, PromptTooLongError
from common.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.cpu_memory import keep_freed_memory
from engine.cuda_graphs import one_rank_executor
from engine.detokenizer import IncrementalDetokenizer
from engine.device import resolve_device
from engine.kv_cache_manager import KVCacheManager
from engine.loader import load_model_source
from engine.loader.source import ModelSource
from engine.model_runner import ModelRunner
from engine.outputs import StepOutput
from engine.request import FinishReason, Request, RequestStatus
from engine.sampler import Sampler, SamplingState
from engine.scheduler import Scheduler
from engine.shard import ModelShard
from engine.spec_decode import describe, make_proposer, verify_step
from engine.stop_checker import find_stop

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource | None = None,
        executor=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`executor`: a DistributedExecutor for a tp x pp worker (its ranks already started, caches
        allocated); None builds the whole model here (tp = pp = 1)."""
        self.config = config
        self.source = source or load_model_source(config.model)
        cfg = self.source.config
        self.model_config = cfg
        self.tokenizer = self.source.tokenizer
        if executor is None:
            if config.parallel.world_size > 1:
                raise ConfigError(
                    f"tp={config.parallel.tensor_parallel_size} pp={config.parallel.pipeline_parallel_size} needs "
                    "rank processes: start it as a worker (worker_core.ranks) or pass a DistributedExecutor"
                )
            device = resolve_device(config.device)
            if device.type == "cpu":
                keep_freed_memory()  # temporaries reused instead of page-faulted in every step
            torch.manual_seed(config.seed)
            shard = ModelShard(config, self.source, device=device)
            shard.allocate(shard.max_blocks())
            executor = one_rank_executor(shard, cfg.max_position_embeddings)
        self.executor = executor
        self.device = executor.shard.device
        self.dtype = executor.shard.dtype
        self.kv_spec = executor.kv_spec
        num_blocks = self.kv_spec.num_blocks
        cc = config.cache
        self.kv_manager = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.clock = clock  # every timestamp the engine takes (arrival, first schedule, first token)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, clock)
        spec = config.speculative
        self.scheduler.spec_tokens = spec.num_speculative_tokens if spec.enabled else 0
        self.scheduler.spec_disable_batch_size = spec.disable_batch_size
        self.last_step_shape: tuple[int, int] = (0, 0)  # (prompt tokens, decode sequences) of the last step
        # ... as (prompt tokens, attention pairs, decode rows, decode context): SchedulerOutput.features
        self.last_step_features: tuple[int, float, int, int] = (0, 0.0, 0, 0)
        self.runner = ModelRunner(executor, self.kv_spec, self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(config.seed)
        self.sampler = Sampler(gen)
        self.proposer = make_proposer(config, cfg.vocab_size, self.device, self.dtype, num_blocks, gen)
        self.spec_steps = 0  # verification steps, tokens proposed, tokens accepted since start (all requests)
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.max_model_len = cfg.max_position_embeddings
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self._ids = itertools.count()
        self.leases: dict[str, Request] = {}  # prefill role: KV_LEASED requests by id
        log.info(
            "engine ready: %s, %s, %d KV blocks of %d tokens",
            cfg.name or cfg.architecture,
            self.dtype,
            num_blocks,
            cc.block_size,
        )

    @property
    def kv_cache(self) -> torch.Tensor:
        """This process's KV cache tensor (rank 0's slice in a tp x pp worker)."""
        return self.executor.kv_cache

    @property
    def model(self):
        return self.executor.shard.model

    def close(self) -> None:
        """Stop the other ranks of a tp x pp worker (no-op for one rank)."""
        self.executor.close()

    # ---- requests ------------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        kv_handoff: bool = False,
        prior_output_ids: Sequence[int] = (),
    ) -> str:
        """Queue one request. `prior_output_ids`: output it already produced elsewhere (a request resumed
        after its worker died): they are replayed (`resume`) and the prompt + them is prefilled, so the
        next token sampled is the one an undisturbed run samples next (greedy; seeded random too)."""
        return self.add_requests(
            [(prompt_token_ids, params, request_id)], kv_handoff=kv_handoff, prior_output_ids=[prior_output_ids]
        )[0]

    def add_requests(
        self,
        batch: Sequence[tuple[Sequence[int], SamplingParams, str | None]],
        *,
        kv_handoff: bool = False,
        prior_output_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[str]:
        """Admit a batch all-or-nothing: every request is validated (and resumed output replayed) before
        any is queued.

        kv_handoff (prefill role): after token 1 the request stops here and its blocks stay
        leased (status KV_LEASED) until `release_kv`; its StepOutput carries the block ids.
        prior_output_ids: per request, output it already produced elsewhere (see `add_request`).
        """
        ids = [rid if rid is not None else f"req-{next(self._ids)}" for _, _, rid in batch]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("request ids within one batch must be distinct")
        for (prompt, params, _), rid in zip(batch, ids):
            self.validate(prompt, params, rid)
        priors = prior_output_ids if prior_output_ids is not None else [()] * len(batch)
        requests = [
            self._new_request(rid, [int(t) for t in prompt], params, kv_handoff, prior)  # plain ints, once
            for (prompt, params, _), rid, prior in zip(batch, ids, priors)
        ]
        for req in requests:
            self.scheduler.add(req)
        return ids

    def _new_request(
        self,
        rid: str,
        tokens: list[int],
        params: SamplingParams,
        kv_handoff: bool = False,
        prior_output_ids: Sequence[int] = (),
    ) -> Request:
        req = Request(
            request_id=rid,
            arrival_time=self.clock(),
            prompt_token_ids=tokens,
            params=params,
            sampling=SamplingState.create(params, tokens),
            detokenizer=IncrementalDetokenizer(self.tokenizer, tokens, params.skip_special_tokens),
            kv_handoff=kv_handoff,
        )
        if prior_output_ids:
            self.resume(req, prior_output_ids)
        return req

    def resume(self, req: Request, prior_output_ids: Sequence[int]) -> None:
        """Replay output a request already streamed (not yet in the scheduler): each token goes through
        the detokenizer and stop checks as when it was sampled, and a seeded generator is advanced by its
        draw, so text, state and later draws equal an undisturbed run. The tokens become part of what
        is prefilled (like a request preempted for recompute). Refuses output that already ends it."""
        if len(prior_output_ids) >= req.params.max_tokens:
            raise InvalidRequestError(
                f"{len(prior_output_ids)} tokens already produced leave none of "
                f"max_tokens={req.params.max_tokens}; nothing to resume"
            )
        vocab = self.model_config.vocab_size
        handoff, req.kv_handoff = req.kv_handoff, False  # a replayed token never hands the KV off
        now = self.clock()
        try:
            for tid in prior_output_ids:
                if not 0 <= tid < vocab:
                    raise InvalidRequestError(f"prior output token id {tid} is outside the vocabulary [0, {vocab})")
                req.sampling.advance(vocab, self.device)
                out = self._append_token(req, int(tid), None, now)
                if out.finished:
                    raise InvalidRequestError(
                        "the prior output already ends the request (a stop token, EOS or "
                        "stop string in it); nothing to resume"
                    )
        finally:
            req.kv_handoff = handoff
        req.first_token_time = None  # the engine's timings describe this run's own first token

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty: send at least one token")
        vocab = self.model_config.vocab_size
        wrong_type = next(
            (t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None
        )
        if wrong_type is not None:
            raise InvalidRequestError(
                f"prompt token ids must be integers, got {type(wrong_type).__name__} {wrong_type!r}"
            )
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {int(bad)} is outside the vocabulary [0, {vocab})")
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {n} tokens but the model's context is {self.max_model_len}; shorten the prompt"
            )
        if n + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of "
                f"{self.max_model_len}; lower max_tokens to at most {self.max_model_len - n}"
            )
        if not self.kv_manager.can_fit(n + params.max_tokens):
            need = -(-(n + params.max_tokens) // self.kv_spec.block_size)
            raise OutOfKVCacheError(
                f"request needs {need} KV blocks but the cache has {self.kv_spec.num_blocks}; "
                "lower max_tokens or raise kv_cache_memory_bytes"
            )
        if request_id in self.scheduler.requests or request_id in self.leases:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")

    def abort_request(self, request_id: str) -> bool:
        """Abort in any state; a KV lease is released. Frees the blocks at once.

        Decode role: never abort a request whose KV transfer may still be writing into
        its blocks (poll the transfer out of PENDING first); the blocks would be reused.
        """
        return self.scheduler.abort(request_id) is not None or self.release_kv(request_id)

    # ---- disaggregated roles ---------------------------------------------------------------------------------------
    #
    #   prefill: add_request(kv_handoff=True) -> step() ... token 1 -> StepOutput(kv_block_ids=...)
    #            -> (decode pulls) -> release_kv(id)
    #   decode:  add_remote_request(prompt, params, id, token 1)   (token 1 replayed, not re-sent)
    #            -> allocate_remote_kv(id) -> (transfer into those blocks) -> finish_remote_kv(id)
    #            -> step() decodes from token 2 on

    def release_kv(self, request_id: str) -> bool:
        """Prefill role: end a KV lease (decode pulled the blocks, or the lease expired)."""
        req = self.leases.pop(request_id, None)
        if req is None:
            return False
        self.kv_manager.free(request_id)
        req.status = RequestStatus.FINISHED_LENGTH
        return True

    def add_remote_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        first_token: int,
        prior_output_ids: Sequence[int] = (),
    ) -> StepOutput:
        """Decode role: admit a request whose prompt was prefilled elsewhere, with its token 1.

        Token 1 goes through the same stop checks and detokenizer as any token (so the
        text and state equal a single-engine run); its StepOutput is returned for the
        caller to inspect, not to stream (the prefill side streamed it). A seeded
        request's generator is advanced by the one draw token 1 took.
        Returns with the request in WAITING_FOR_REMOTE_KV, or finished if token 1 ended it.

        A resumed request (`prior_output_ids`, see `resume`) is prefilled as prompt + prior output
        on P, so its "token 1" is the token after them and the KV pulled covers both.
        """
        self.validate(prompt_token_ids, params, request_id)
        if not 0 <= first_token < self.model_config.vocab_size:
            raise InvalidRequestError(f"first token id {first_token} is outside the vocabulary")
        req = self._new_request(
            request_id, [int(t) for t in prompt_token_ids], params, prior_output_ids=prior_output_ids
        )
        self.scheduler.add_remote(req)
        req.sampling.advance(self.model_config.vocab_size, self.device)
        return self._append_token(req, int(first_token), None, self.clock())

    def allocate_remote_kv(self, request_id: str) -> tuple[list[int], int] | None:
        """Decode role: blocks for the prompt's KV, minus what the local prefix cache holds.

        Returns (block ids to fill, index of the first one in the prompt's block list),
        or None, changing nothing, while the pool cannot hold them (retry after a step).
        """
        req = self.scheduler.requests[request_id]
        if req.status is not RequestStatus.WAITING_FOR_REMOTE_KV:
            raise InvalidRequestError(f"request {request_id!r} is {req.status.name}, not waiting for remote KV")
        n = req.num_tokens - 1  # the prompt (and a resumed request's prior output): all but P's token
        hit = self.kv_manager.lookup_prefix(req.token_ids)  # prompt + token 1: may cover every full prompt block
        blocks = self.kv_manager.allocate(request_id, req.token_ids, hit.num_tokens, n - hit.num_tokens, hit)
        if blocks is None:
            return None
        req.num_cached_tokens = hit.num_tokens
        self.scheduler.count_prefix_lookup(n, hit.num_tokens)
        return blocks[hit.num_blocks :], hit.num_blocks

    def finish_remote_kv(self, request_id: str) -> None:
        """Decode role: the prompt's KV has landed; the request joins the batch at token 2."""
        req = self.scheduler.requests[request_id]
        req.num_computed_tokens = req.num_tokens - 1
        self.kv_manager.commit(request_id, req.token_ids, req.num_computed_tokens)
        self.scheduler.resume_remote(req)

    def speculative_description(self) -> str:
        """What this engine speculates with ("" when off): the workers of one cluster must agree."""
        return describe(self.config.speculative, self.proposer)

    def counts(self) -> tuple[int, int, int]:
        """(running, waiting incl. waiting for remote KV, leased) requests."""
        s = self.scheduler
        return len(s.running), len(s.requests) - len(s.running), len(self.leases)

    def pending_prefill_tokens(self) -> int:
        """Tokens still to compute before a first (or, after preemption, next) token: the prefill load.

        A request in decode computes one token per step and counts 0; so do a decode-role
        request waiting for remote KV (its prompt arrives by transfer) and a leased one.
        """
        skip = (RequestStatus.WAITING_FOR_REMOTE_KV, RequestStatus.KV_LEASED)
        total = 0
        for r in self.scheduler.requests.values():
            left = r.num_tokens - r.num_computed_tokens
            if left > 1 and r.status not in skip:
                total += left
        return total

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_request(self, request_id: str) -> Request | None:
        return self.scheduler.requests.get(request_id)

    # ---- one step ------------------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        t0 = self.clock()
        out = self.scheduler.schedule()
        if not out.scheduled:
            self.last_step_shape, self.last_step_features = (0, 0), (0, 0.0, 0, 0)
            return []
        spec = [s for s in out.scheduled if s.spec_slots]
        if spec and self.proposer is not None:  # slots are only handed out when speculation is configured
            self.proposer.propose(spec)
            for s in spec:
                s.num_new_tokens = 1 + len(s.request.spec_token_ids)
        # what the performance models time this step by (the worker's StepTimes; `tandem profile`)
        self.last_step_features = out.features()
        self.last_step_shape = (self.last_step_features[0], out.num_decoding)
        batch = self.runner.prepare(out)
        logits = self.runner.execute(batch)
        for s in batch.order:
            if s.request.spec_token_ids:
                continue  # computed tokens known after verification
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv_manager.commit(req.request_id, req.token_ids, req.num_computed_tokens)
        outputs: list[StepOutput] = []
        if batch.sample and not any(s.request.spec_token_ids for s in spec):  # one logits row per request
            now = self.clock()
            sampled = self.sampler(logits, [s.request.sampling for s in batch.sample], vocab_limit=None)
            for s, tid, lp in zip(batch.sample, sampled.token_ids, sampled.logprobs):
                outputs.append(self._append_token(s.request, tid, lp, now))
        elif batch.sample:
            outputs = self._sample_and_verify(batch, logits)
        for s in spec:
            req = s.request
            req.spec_token_ids, req.spec_draft_probs = [], None
            if not req.status.finished:  # blocks only rejected proposals reached go back to the pool
                self.kv_manager.trim(req.request_id, req.num_tokens)
        self.scheduler.observe_prefill(self.last_step_features[0], self.clock() - t0)  # the SLO triage's speed
        return outputs

    def _sample_and_verify(self, batch, logits: torch.Tensor) -> list[StepOutput]:
        """Some requests verify proposals (k + 1 logits rows, spec_decode.verify_step); the rest sample."""
        now = self.clock()
        offsets = [0]
        for n in batch.sample_rows:
            offsets.append(offsets[-1] + n)
        plain = [i for i, s in enumerate(batch.sample) if not s.request.spec_token_ids]
        outputs = []
        if plain:  # one row each
            sampled = self.sampler(
                logits[[offsets[i] for i in plain]], [batch.sample[i].request.sampling for i in plain]
            )
            for i, tid, lp in zip(plain, sampled.token_ids, sampled.logprobs):
                outputs.append(self._append_token(batch.sample[i].request, tid, lp, now))
        verified, steps, proposed, accepted = verify_step(
            self.sampler, self.kv_manager, self.proposer, self.scheduler.spec_tokens, self._append_token,
            batch, logits, offsets, now,
        )  # fmt: skip
        self.spec_steps += steps
        self.spec_proposed += proposed
        self.spec_accepted += accepted
        return outputs + verified

    def _append_token(self, req: Request, tid: int, lp, now: float) -> StepOutput:
        """Append one sampled token and decide whether the request stops.

        Order of the checks: stop_token_ids, then EOS (unless ignore_eos), then
        max_tokens, then stop strings (which also cut the text). While stop
        strings are set, the last len(longest stop) - 1 characters are held back
        from the stream so that text later cut by a stop is never sent.
        """
        req.token_ids.append(tid)
        req.sampling.record(tid)
        first = req.first_token_time is None
        if first:
            req.first_token_time = now
        if lp is not None:
            req.logprobs.append(lp)
        p = req.params
        if req.detokenizer is not None:
            req.text += req.detokenizer.push(tid)
        reason: FinishReason | None = None
        if tid in p.stop_token_ids:
            reason, req.stop_reason = FinishReason.STOP, tid
        elif not p.ignore_eos and tid in self.eos_token_ids:
            reason, req.stop_reason = FinishReason.STOP, tid
        elif req.num_output_tokens >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and req.detokenizer is not None:
            req.text += req.detokenizer.flush()
        if p.stop:
            hit = find_stop(req.text, len(req.text) - req.checked_text_len, p.stop, p.include_stop_str_in_output)
            req.checked_text_len = len(req.text)
            if hit is not None:
                cut, stop = hit
                req.text = req.text[:cut]
                reason, req.stop_reason = FinishReason.STOP, stop
        if reason is None and p.stop:
            visible = max(req.sent_text_len, len(req.text) - (max(map(len, p.stop)) - 1))
        else:
            visible = len(req.text)
        delta = req.text[req.sent_text_len : visible]
        req.sent_text_len = visible
        kv_block_ids = None
        if reason is not None:
            status = RequestStatus.FINISHED_LENGTH if reason is FinishReason.LENGTH else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish(req, status, reason)
        elif req.kv_handoff:
            kv_block_ids = self.kv_manager.block_ids(req.request_id)
            self.scheduler.hand_off(req)
            self.leases[req.request_id] = req
        return StepOutput(
            request_id=req.request_id,
            new_token_ids=[tid],
            new_text=delta,
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            stop_reason=req.stop_reason,
            new_logprobs=[lp] if lp is not None else [],
            kv_block_ids=kv_block_ids,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            # the request's speculative counters with its last output only
            spec_steps=req.spec_steps if reason is not None else 0,
            spec_proposed=req.spec_proposed if reason is not None else 0,
            spec_accepted=req.spec_accepted if reason is not None else 0,
            # engine timings with its first token only
            arrival_time=req.arrival_time if first else None,
            first_scheduled_time=req.first_scheduled_time if first else None,
            first_token_time=now if first else None,
        )

    # ---- checks --------------------------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        self.kv_manager.check_integrity()

    def leak_check(self) -> None:
        """No request left anywhere, every block free, every ref count zero (tests call this after each scenario)."""
        if self.scheduler.has_unfinished() or self.scheduler.requests:
            raise AssertionError(f"requests still queued: {list(self.scheduler.requests.values())}")
        if self.leases:
            raise AssertionError(f"KV leases still held: {list(self.leases.values())}")
        self.kv_manager.leak_check()
