"""Where a request runs: KV-aware choice of decode and prefill workers, and conditional disaggregation.

`Router.route(request_id, prompt_ids)` decides, without any I/O:

    1. hash the prompt's full blocks (common/block_hash.py, per pool block size)
    2. decode worker D: the cheapest eligible one by `decode_cost` (policy kv), or the
       pool's round_robin / least_loaded choice
    3. local or remote prefill (conditional disaggregation), in this order:
         threshold 0                                  -> remote (local prefill disabled)
         uncached prompt on D <= threshold            -> local  ("short")
         no eligible prefill worker                   -> local  ("no prefill worker")
         every prefill worker has >= max_prefill_queue_tokens queued -> local ("saturated")
         otherwise                                    -> remote
    4. remote: prefill worker P, the cheapest by `prefill_cost` (policy kv) or the
       pool's load-blind choice

and books what it sent (a `Ticket`): P's queued prefill tokens, the KV blocks in flight
to D, and the blocks each worker will hold once it has the prompt (`PredictedBlocks`),
so the next request of a burst sees them before any KV event arrives. The server
reports progress: `prefill_done` (P returned token 1), `first_token` (D streamed: its
pull or its local prefill is done; the predictions are dropped, real KV events have
replaced them) and `close` (always; idempotent).

Costs, selection and ties: router/costs.py. Placement by SLO: router/placement.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from common.block_hash import BlockHash, hash_full_blocks
from router.costs import (
    CostWeights,
    DecodeTerms,
    PrefillTerms,
    ReuseMeter,
    decode_cost,
    decode_formula,
    decode_terms,
    need_blocks,
    prefill_cost,
    prefill_formula,
    prefill_terms,
    rendezvous,
    select,
)
from router.indexer import Indexer, PredictedBlocks
from router.placement import PlacementOption, place_by_slo
from router.pools import Decision, Policy, WorkerPool, WorkerSlot
from router.workers import WorkerClient

decision_log = logging.getLogger("router.decisions")


@dataclass(frozen=True)
class RoutingConfig:
    policy: Policy = Policy.KV
    temperature: float = 0.0
    conditional_prefill_threshold: int = 0  # tokens; 0 disables local prefill
    max_prefill_queue_tokens: int = 16384  # a prefill worker with this many queued is saturated
    weights: CostWeights = CostWeights()
    slo_ttft_s: float = 0.0  # placement by SLO (with slo_tpot_s; 0 and 0: off): see place_by_slo
    slo_tpot_s: float = 0.0

    @property
    def slo_placement(self) -> bool:
        """Placement by SLO decides remote / local / whole-on-prefill unless the operator fixed it by a threshold."""
        return (self.slo_ttft_s > 0 or self.slo_tpot_s > 0) and self.conditional_prefill_threshold == 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if self.temperature < 0:
            raise ValueError(f"router temperature must be >= 0, got {self.temperature}")
        if self.conditional_prefill_threshold < 0:
            raise ValueError(
                f"conditional_prefill_threshold must be >= 0 tokens (0 disables local prefill), "
                f"got {self.conditional_prefill_threshold}"
            )
        if self.max_prefill_queue_tokens < 1:
            raise ValueError(f"max_prefill_queue_tokens must be >= 1, got {self.max_prefill_queue_tokens}")
        if self.slo_ttft_s < 0 or self.slo_tpot_s < 0:
            raise ValueError(
                f"SLO targets must be >= 0 (0: none), got ttft {self.slo_ttft_s} s, tpot {self.slo_tpot_s} s"
            )


@dataclass(frozen=True)
class KVDecision:
    """A KV-aware choice: every candidate's terms (filled into the formula on demand) and the pick."""

    role: str
    terms: tuple[PrefillTerms, ...] | tuple[DecodeTerms, ...]
    weights: CostWeights
    chosen: str
    temperature: float

    @property
    def formulas(self) -> tuple[str, ...]:
        return tuple(
            prefill_formula(t, self.weights) if isinstance(t, PrefillTerms) else decode_formula(t, self.weights)
            for t in self.terms
        )

    def describe(self) -> str:
        t = f" T={self.temperature:g}" if self.temperature else ""
        return f"{self.role} kv{t}: " + "; ".join(self.formulas) + f" -> {self.chosen}"


@dataclass
class Route:
    """Where one request goes, and why."""

    request_id: str
    decode: WorkerClient
    prefill: WorkerClient | None  # None: the decode worker prefills locally
    reason: str  # e.g. "remote: 412 uncached tokens on decode-0 > threshold 64"
    decode_decision: KVDecision | Decision
    prefill_decision: KVDecision | Decision | None = None
    kind: str = ""  # the reason as a metric label: local short|no_prefill_worker|saturated|aggregated,
    #                 remote long|disabled
    decode_cached_blocks: int = 0  # leading prompt blocks D holds (index or predicted)
    prefill_cached_blocks: int = 0  # ... that P holds (remote only)

    @property
    def local(self) -> bool:
        return self.prefill is None

    def describe(self) -> str:
        parts = [f"{self.request_id}: {self.decode_decision.describe()}"]
        if self.prefill_decision is not None:
            parts.append(self.prefill_decision.describe())
        parts.append(self.reason)
        return " | ".join(parts)


@dataclass
class Ticket:
    """What routing one request booked on the workers' router-side load."""

    p_slot: WorkerSlot | None = None
    p_tokens: int = 0
    d_slot: WorkerSlot | None = None
    d_blocks: int = 0  # KV in flight to D (remote prefill)
    d_tokens: int = 0  # local prefill tokens on D
    predicted: list[PredictedBlocks] = field(default_factory=list)

    def prefill_done(self) -> None:
        if self.p_slot is not None:
            self.p_slot.prefill_tokens -= self.p_tokens
            self.p_tokens = 0

    def first_token(self, key: str) -> None:
        self.prefill_done()
        if self.d_slot is not None:
            self.d_slot.kv_blocks_in -= self.d_blocks
            self.d_slot.prefill_tokens -= self.d_tokens
            self.d_blocks = self.d_tokens = 0
        for p in self.predicted:
            p.drop(key)
        self.predicted.clear()


class PoolIndex:
    """A pool's prefix index (fed by KV events) and the blocks routed to it but not yet reported."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.indexer = Indexer(pool.block_size)
        self.predicted = PredictedBlocks()
        self.reuse = ReuseMeter()

    def hashes(self, prompt_ids: Sequence[int], cache: dict[int, list[BlockHash]]) -> list[BlockHash]:
        bs = self.pool.block_size
        if bs not in cache:
            cache[bs] = hash_full_blocks(prompt_ids, bs)
        return cache[bs]

    def overlap(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """worker -> leading blocks it holds or will hold (reported by events, or routed there)."""
        held = self.indexer.find_matches(hashes)
        for wid, n in self.predicted.find_matches(hashes).items():
            if n > held.get(wid, 0):
                held[wid] = n
        return held

    def forget(self, worker_id: str) -> None:
        """A worker died or left: nothing it held can be hit any more."""
        self.indexer.remove_worker(worker_id)
        self.predicted.drop_worker(worker_id)


class Router:
    """Chooses (P, D) per request over a prefill pool (None: aggregated) and a decode pool."""

    def __init__(
        self,
        decode: WorkerPool,
        prefill: WorkerPool | None = None,
        config: RoutingConfig = RoutingConfig(),
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.rng = rng if rng is not None else random.Random()
        self.decode = PoolIndex(decode)
        self.prefill = PoolIndex(prefill) if prefill is not None else None
        self._tickets: dict[str, Ticket] = {}

    @property
    def aggregated(self) -> bool:
        return self.prefill is None

    def index_of(self, pool: WorkerPool) -> PoolIndex:
        for ix in (self.decode, self.prefill):
            if ix is not None and ix.pool is pool:
                return ix
        raise KeyError(f"no index for the {pool.role} pool")

    def forget(self, worker_id: str) -> None:
        for ix in (self.decode, self.prefill):
            if ix is not None:
                ix.forget(worker_id)

    # -- routing ---------------------------------------------------------------------------------

    def route(
        self, request_id: str, prompt_ids: Sequence[int], exclude: Collection[str] = (), retry: bool = False
    ) -> Route:
        """Choose D, then P or local, for one request; `exclude`: workers that already failed it.

        `retry`: a later attempt of a request routed before (its prompt is not new evidence of reuse)."""
        cfg = self.config
        n = len(prompt_ids)
        cache: dict[int, list[BlockHash]] = {}
        d_ix = self.decode
        d_hashes = d_ix.hashes(prompt_ids, cache)
        d_overlap = d_ix.overlap(d_hashes)
        if self.aggregated:  # every worker prefills: choose by the prefill cost
            d_slot, d_decision = self._choose_prefill(d_ix, n, d_hashes, d_overlap, exclude)
        else:
            d_slot, d_decision = self._choose_decode(d_ix, n, d_overlap, exclude)
        d_cached = d_overlap.get(d_slot.worker_id, 0)
        d_uncached = PrefillTerms(d_slot.worker_id, n, d_cached, d_ix.pool.block_size, 0).uncached_tokens
        local = self._local_reason(d_slot.worker_id, d_uncached, exclude)
        placed = remote_why = None
        p_ix = None if local is not None else self.prefill
        if p_ix is not None:  # choose P before booking anything: choosing may raise (no eligible worker)
            p_hashes = p_ix.hashes(prompt_ids, cache)
            p_overlap = p_ix.overlap(p_hashes)
            p_slot, p_decision = self._choose_prefill(p_ix, n, p_hashes, p_overlap, exclude)

        # where the request runs whole when it is not split: D (local prefill), or P (placement by SLO)
        host_slot, host_ix, host_hashes, host_uncached, host_cached, host_decision = (
            d_slot,
            d_ix,
            d_hashes,
            d_uncached,
            d_cached,
            d_decision,
        )
        if p_ix is not None and cfg.slo_placement:
            p_cached = p_overlap.get(p_slot.worker_id, 0)
            p_uncached = PrefillTerms(p_slot.worker_id, n, p_cached, p_ix.pool.block_size, 0).uncached_tokens
            placed = self._place(d_slot, d_uncached, p_slot, p_uncached)
            if placed is not None and placed[0].kind == "local":
                p_ix, local = None, ("slo_local", f"local: {placed[1]}")
            elif placed is not None and placed[0].kind == "whole":
                host_slot, host_ix, host_hashes, host_uncached, host_cached, host_decision = (
                    p_slot,
                    p_ix,
                    p_hashes,
                    p_uncached,
                    p_cached,
                    p_decision,
                )
                p_ix, local = None, ("slo_whole", f"whole on {p_slot.worker_id}: {placed[1]}")
            elif placed is not None:
                remote_why = ("slo_remote", placed[1])
        ticket = Ticket(d_slot=host_slot, predicted=[host_ix.predicted])
        host_ix.predicted.add(request_id, host_slot.worker_id, host_hashes)
        if p_ix is None:
            assert local is not None
            ticket.d_tokens = host_uncached
            host_slot.prefill_tokens += host_uncached
            route = Route(
                request_id,
                host_slot.client,
                None,
                local[1],
                host_decision,
                kind=local[0],
                decode_cached_blocks=host_cached,
            )
        else:
            p_terms = PrefillTerms(p_slot.worker_id, n, p_overlap.get(p_slot.worker_id, 0), p_ix.pool.block_size, 0)
            ticket.p_slot, ticket.p_tokens = p_slot, p_terms.uncached_tokens
            p_slot.prefill_tokens += p_terms.uncached_tokens
            ticket.d_blocks = need_blocks(n, d_cached, d_ix.pool.block_size)
            d_slot.kv_blocks_in += ticket.d_blocks
            p_ix.predicted.add(request_id, p_slot.worker_id, p_hashes)
            ticket.predicted.append(p_ix.predicted)
            threshold = cfg.conditional_prefill_threshold
            kind, why = (
                "long" if threshold else "disabled",
                f"{d_uncached} uncached tokens on {d_slot.worker_id} > threshold {threshold}"
                if threshold
                else "local prefill disabled (threshold 0)",
            )
            if remote_why is not None:
                kind, why = remote_why
            route = Route(
                request_id,
                d_slot.client,
                p_slot.client,
                f"remote: {why}",
                d_decision,
                p_decision,
                kind=kind,
                decode_cached_blocks=d_cached,
                prefill_cached_blocks=p_terms.cached_blocks,
            )
        self._tickets[request_id] = ticket
        if not retry:  # booked: this prompt now counts as evidence of reuse, once (not per attempt or failed try)
            reuse_ix = self.decode if self.aggregated else self.prefill
            if reuse_ix is not None:
                reuse_ix.reuse.observe(reuse_ix.hashes(prompt_ids, cache))
        if decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug(route.describe())
        return route

    def _place(
        self, d_slot: WorkerSlot, d_uncached: int, p_slot: WorkerSlot, p_uncached: int
    ) -> tuple[PlacementOption, str] | None:
        """Placement by SLO: (the chosen option, the reason with every option's figures), or None while either
        worker's performance model is not ready (the fixed choice, remote, stands)."""
        cfg = self.config
        if d_slot.status is None or p_slot.status is None:
            return None
        # the same model on both: a line one worker has not measured (P never decodes in a disaggregated
        # pool, D may never prefill) comes from the other
        pd = d_slot.status.perf.completed_by(p_slot.status.perf)
        pp = p_slot.status.perf.completed_by(d_slot.status.perf)
        if not (pd.ready and pp.ready):
            return None
        d_run, p_run = d_slot.in_flight, p_slot.in_flight
        p_ttft = pp.prefill_s(p_slot.prefill_tokens + p_uncached)
        remote = PlacementOption("remote", d_slot.worker_id, p_ttft, pd.tpot_s(d_run + 1))
        whole = PlacementOption("whole", p_slot.worker_id, p_ttft + pp.per_seq_s * p_run, pp.tpot_s(p_run + 1))
        local = PlacementOption(
            "local",
            d_slot.worker_id,
            pd.prefill_s(d_slot.prefill_tokens + d_uncached) + pd.per_seq_s * d_run,
            pd.tpot_s(d_run + 1),
            stall_s=pd.prefill_s(d_uncached),
            stalled=d_run,
            slack_s=d_slot.status.tpot_slack_s,
        )
        options = (remote, whole, local)
        chosen = place_by_slo(options, cfg.slo_ttft_s, cfg.slo_tpot_s)
        why = "; ".join(o.describe(cfg.slo_ttft_s, cfg.slo_tpot_s) for o in options)
        verdict = "meets" if chosen.meets(cfg.slo_ttft_s, cfg.slo_tpot_s) else "nothing meets the targets"
        return chosen, f"SLO placement ({why}) -> {chosen.kind} ({verdict})"

    def _local_reason(self, d_id: str, d_uncached: int, exclude: Collection[str] = ()) -> tuple[str, str] | None:
        """(kind, reason) when D prefills locally, else None. With no prefill worker to take it (all
        down, draining or failed this request), D prefills whatever the threshold: a request never
        fails for want of P while a decode worker can run it whole."""
        if self.prefill is None:
            return "aggregated", f"local: aggregated ({d_uncached} uncached tokens on {d_id})"
        eligible = self.prefill.pool.eligible(exclude)
        if not eligible:
            return "no_prefill_worker", f"local: no healthy prefill worker ({d_uncached} uncached tokens on {d_id})"
        threshold = self.config.conditional_prefill_threshold
        if threshold == 0:
            return None
        if d_uncached <= threshold:
            return "short", f"local: {d_uncached} uncached tokens on {d_id} <= threshold {threshold}"
        limit = self.config.max_prefill_queue_tokens
        least = min(s.prefill_tokens for s in eligible)
        if least >= limit:
            return "saturated", f"local: prefill pool saturated (least queued {least} >= {limit} tokens)"
        return None

    def _choose_prefill(
        self, ix: PoolIndex, n: int, hashes: Sequence[BlockHash], overlap: dict[str, int], exclude: Collection[str] = ()
    ) -> tuple[WorkerSlot, KVDecision | Decision]:
        bs = ix.pool.block_size
        # the rendezvous key: the first block no worker holds (the last one if some worker holds them all)
        key = hashes[min(max(overlap.values(), default=0), len(hashes) - 1)] if hashes else None
        reuse = ix.reuse.share  # of the prompts before this one (this one's own match is in `overlap`)
        return self._choose(
            ix.pool,
            lambda s: prefill_terms(s, n, overlap.get(s.worker_id, 0), bs, ix.indexer.num_blocks(s.worker_id), reuse),
            prefill_cost,
            exclude,
            home_key=key,
        )

    def _choose_decode(
        self, ix: PoolIndex, n: int, overlap: dict[str, int], exclude: Collection[str] = ()
    ) -> tuple[WorkerSlot, KVDecision | Decision]:
        bs = ix.pool.block_size
        return self._choose(
            ix.pool, lambda s: decode_terms(s, n, overlap.get(s.worker_id, 0), bs), decode_cost, exclude
        )

    def _choose(
        self, pool: WorkerPool, terms_of, cost, exclude: Collection[str] = (), home_key: bytes | None = None
    ) -> tuple[WorkerSlot, KVDecision | Decision]:
        """The pool's load-blind choice, or (policy kv) the cheapest eligible worker by `cost(terms_of(slot))`."""
        if self.config.policy is not Policy.KV:
            client, decision = pool.choose(self.config.policy, exclude)
            return pool.slot(client.worker_id), decision
        slots = pool.eligible(exclude)
        if not slots:
            raise pool.no_worker_error(exclude)
        w = self.config.weights
        terms = [terms_of(s) for s in slots]
        home = None
        if home_key is not None:

            def home(tied: list[int]) -> int:
                return tied[rendezvous(home_key, [slots[i].worker_id for i in tied])]

        pick = select([cost(t, w) for t in terms], self.config.temperature, self.rng, home)
        return slots[pick], KVDecision(pool.role, tuple(terms), w, slots[pick].worker_id, self.config.temperature)

    # -- progress of a routed request ----------------------------------------------------------------

    def prefill_done(self, request_id: str) -> None:
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.prefill_done()

    def first_token(self, request_id: str) -> None:
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.first_token(request_id)

    def close(self, request_id: str) -> None:
        ticket = self._tickets.pop(request_id, None)
        if ticket is not None:
            ticket.first_token(request_id)

    @property
    def open_tickets(self) -> int:
        return len(self._tickets)
