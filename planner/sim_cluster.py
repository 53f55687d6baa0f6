"""The simulated cluster: its spec, its workers placed on hosts, and the router's choices (policy, conditional
disaggregation, placement by SLO with router/placement.py), with the core-sharing figures the simulation
(planner/simulator.py) uses to widen prefill steps (worker_core/core_share.py's LendBudget on the simulated
requests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from planner.model import StepShape
from planner.profile import Profile, ProfileError
from planner.sim_worker import SimRequest, SimWorker
from router.placement import PlacementOption, place_by_slo
from tandem_api.bench.metrics import RequestRecord
from worker_core.core_share import TPOT_SLACK_IDLE_S, LendBudget

POLICIES = ("kv", "round-robin", "least-loaded")
MODES = ("disaggregated", "aggregated")


class SimError(ValueError):
    """A cluster the profile cannot describe, or bad simulator parameters; the message says what to change."""


@dataclass(frozen=True)
class ClusterSpec:
    mode: str = "disaggregated"  # or "aggregated"
    prefill: int = 1  # workers (aggregated mode: the workers of its one pool)
    decode: int = 1
    prefill_shape: str | None = None  # Shape.key() in the profile; None: the profiled config's pool shape
    decode_shape: str | None = None
    policy: str = "kv"
    conditional_prefill_threshold: int = 0  # tokens: an uncached prompt this short prefills on D (0: never)
    # placement by SLO, as `tandem serve --slo-ttft-ms/--slo-itl-ms` (seconds; 0 and 0: the fixed placement,
    # and a threshold > 0 keeps it too)
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0
    slo_triage: bool = True  # the workers order their prompts by slo_ttft_s (PoolConfig.slo_triage)

    @property
    def slo_placement(self) -> bool:
        return (
            self.mode == "disaggregated"
            and (self.slo_ttft_s > 0 or self.slo_tpot_s > 0)
            and self.conditional_prefill_threshold == 0
        )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SimError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.policy.replace("_", "-") not in POLICIES:
            raise SimError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.prefill < 1 or (self.mode == "disaggregated" and self.decode < 1):
            raise SimError(f"a cluster needs at least one worker per pool, got {self.prefill} and {self.decode}")
        if self.slo_ttft_s < 0 or self.slo_tpot_s < 0:
            raise SimError(f"SLO placement targets must be >= 0 (0: none), got {self.slo_ttft_s} and {self.slo_tpot_s}")

    def describe(self) -> str:
        if self.mode == "aggregated":
            return f"{self.prefill} aggregated"
        return f"{self.prefill}P+{self.decode}D"


# -- the cluster -------------------------------------------------------------------------------------


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    workers: list[dict[str, Any]] = field(default_factory=list)  # per worker: role, busy share, preemptions
    events: int = 0


class Cluster:
    def __init__(self, profile: Profile, spec: ClusterSpec) -> None:
        self.profile = profile
        self.spec = spec
        over = profile.overhead
        self.first_token_s = over.first_token_s
        self.transfer = profile.transfer
        self.policy = spec.policy.replace("_", "-")
        self.prefill_index: dict[int, set[int]] = {}  # block hash -> workers caching it (the router's indexer)
        self.decode_index: dict[int, set[int]] = {}
        if spec.mode == "aggregated":
            shape = spec.prefill_shape or profile.pools.get("aggregated") or profile.pools.get("decode")
            wp = _worker_profile(profile, shape, "aggregated")
            self.prefill_pool: list[SimWorker] = []
            self.decode_pool = [
                SimWorker(i, "aggregated", wp, over.per_token_s, self.decode_index) for i in range(spec.prefill)
            ]
        else:
            pp = _worker_profile(profile, spec.prefill_shape or profile.pools.get("prefill"), "prefill")
            dp = _worker_profile(profile, spec.decode_shape or profile.pools.get("decode"), "decode")
            self.prefill_pool = [SimWorker(i, "prefill", pp, 0.0, self.prefill_index) for i in range(spec.prefill)]
            self.decode_pool = [
                SimWorker(i, "decode", dp, over.per_token_s, self.decode_index) for i in range(spec.decode)
            ]
        if spec.slo_triage:
            for w in [*self.prefill_pool, *self.decode_pool]:
                w.ttft_target_s = spec.slo_ttft_s
        self._rr = {"prefill": 0, "decode": 0}
        self.admitting: dict[int, deque[SimRequest]] = {w.wid: deque() for w in self.decode_pool}
        self.router_cpu = over.router_cpu_per_token_s if over.host_cores > 0 else 0.0
        self.host_cores = over.host_cores
        self._place_on_hosts(over.workers_per_host, over.contention)
        # core sharing: only where it was measured, for disaggregated pools sharing hosts
        shared = spec.mode == "disaggregated" and over.workers_per_host >= 2
        self.widen_speedup = over.widened_prefill_speedup if shared and over.widened_prefill_speedup > 1 else 0.0
        self.lend_tpot_s = over.lend_tpot_s if self.widen_speedup else 0.0

    def _place_on_hosts(self, per_host: int, contention: dict[str, float]) -> None:
        """Workers share hosts as on the profiled machine: prefill i and decode i together (aggregated: in
        order), `per_host` to a host; each worker slows by its role's contention per busy neighbour."""
        workers = self.prefill_pool + self.decode_pool
        for w in workers:
            w.contention = contention.get(w.role, contention.get("decode", 0.0) if w.role == "aggregated" else 0.0)
        if per_host < 2:
            return
        if self.prefill_pool:
            order: list[SimWorker] = []
            for i in range(max(len(self.prefill_pool), len(self.decode_pool))):
                order += [pool[i] for pool in (self.prefill_pool, self.decode_pool) if i < len(pool)]
        else:
            order = list(self.decode_pool)
        for start in range(0, len(order), per_host):
            host = order[start : start + per_host]
            for w in host:
                w.neighbours = [n for n in host if n is not w]
                w.router_host = start == 0 and self.router_cpu > 0

    # -- routing ---------------------------------------------------------------------------------------

    def _pick(self, pool: list[SimWorker], kind: str, req: SimRequest) -> SimWorker:
        if self.policy == "round-robin" or len(pool) == 1:
            w = pool[self._rr[kind] % len(pool)]
            self._rr[kind] += 1
            return w
        if self.policy == "least-loaded":
            return min(pool, key=lambda w: (w.assigned if kind == "decode" else w.load, w.wid))
        bs = pool[0].cache.block_size
        lookable = (req.prompt_len - 1) // bs
        hashes = req.hashes_upto(lookable, bs) if lookable > 0 else []
        index = self.decode_index if kind == "decode" else self.prefill_index
        holders = sorted(index.get(hashes[0], ())) if hashes else []
        if kind == "prefill":
            # prompt tokens the worker would compute, behind what it has queued; only workers caching the
            # prompt's first block can save any, the others compete on their queues alone
            best = min(pool, key=lambda w: w.queued_prefill_tokens)
            best_cost = best.queued_prefill_tokens + req.prompt_len
            for wid in holders:
                w = pool[wid]
                tokens = w.queued_prefill_tokens + req.prompt_len - w.cache.cached_prefix(hashes) * bs
                if tokens < best_cost or (tokens == best_cost and wid < best.wid):
                    best, best_cost = w, tokens
            return best
        # decode, as router/costs.py decode_cost: KV the worker holds, has booked and would need (share of its
        # cache), plus its requests (share of its seats); aggregated workers add their queued prompt tokens
        need = -(-req.prompt_len // bs)
        agg = self.spec.mode == "aggregated"

        def cost(w: SimWorker, hit: int = 0) -> float:
            p = w.profile
            c = (w.cache.used + w.booked_blocks + need - hit) / p.num_blocks + w.assigned / p.max_num_seqs
            if agg:
                c += w.queued_prefill_tokens / p.max_num_batched_tokens
            return c

        chosen = min(pool, key=cost)
        lowest = cost(chosen)
        for wid in holders:
            w = pool[wid]
            c = cost(w, w.cache.cached_prefix(hashes))
            if c < lowest or (c == lowest and wid < chosen.wid):
                chosen, lowest = w, c
        return chosen

    def route(self, req: SimRequest, now: float = 0.0) -> SimWorker:
        """The worker the request starts on; sets its placement fields."""
        if self.spec.mode == "aggregated":
            w = self._pick(self.decode_pool, "decode", req)
            req.route, req.decode_worker, req.prefill_worker = "aggregated", w.wid, w.wid
            w.assigned += 1
            return w
        d = self._pick(self.decode_pool, "decode", req)
        req.decode_worker = d.wid
        d.assigned += 1
        d.booked_blocks += -(-req.prompt_len // d.cache.block_size)
        threshold = self.spec.conditional_prefill_threshold
        if threshold > 0:
            bs = d.cache.block_size
            lookable = (req.prompt_len - 1) // bs
            hit = d.cache.cached_prefix(req.hashes_upto(lookable, bs)) if lookable > 0 else 0
            if req.prompt_len - hit * bs <= threshold:
                req.route = "local"
                d.booked_blocks -= -(-req.prompt_len // bs)
                return d
        p = self._pick(self.prefill_pool, "prefill", req)
        kind = self._place(req, d, p, now) if self.spec.slo_placement else "remote"
        if kind == "local":
            req.route = "local"
            d.booked_blocks -= -(-req.prompt_len // d.cache.block_size)
            return d
        if kind == "whole":  # all of it on P, which decodes it: D gives its booking back
            d.assigned -= 1
            d.booked_blocks -= -(-req.prompt_len // d.cache.block_size)
            req.route, req.prefill_worker, req.decode_worker = "whole", p.wid, -1
            p.assigned += 1
            return p
        req.route, req.prefill_worker, req.handoff = "remote", p.wid, True
        return p

    def unroute(self, req: SimRequest) -> None:
        """Undo what `route` booked, for a request that is refused (too long for the worker's cache)."""
        if req.route == "whole":
            self.prefill_pool[req.prefill_worker].assigned -= 1
            return
        d = self.decode_pool[req.decode_worker]
        d.assigned -= 1
        if req.route == "remote":
            d.booked_blocks -= -(-req.prompt_len // d.cache.block_size)

    # -- placement by SLO ----------------------------------------------------------------------------
    def _place(self, req: SimRequest, d: SimWorker, p: SimWorker, now: float) -> str:
        """remote, local or whole, as router/routing.py `Router._place` builds the options and
        router/placement.py chooses, with the profile's step model for the workers' measured lines."""
        spec = self.spec
        ctx = req.prompt_len
        d_run = d.assigned - 1  # the router counts the requests D runs before this one
        p_run = p.assigned
        p_ttft = _prefill_s(p, p.queued_prefill_tokens + _uncached(p, req))
        d_uncached = _uncached(d, req)
        d_per_seq = _decode_s(d, 2, ctx) - _decode_s(d, 1, ctx)
        options = (
            PlacementOption("remote", "", p_ttft, _tpot_s(d, d_run + 1, ctx, now)),
            PlacementOption(
                "whole",
                "",
                p_ttft + (_decode_s(p, 2, ctx) - _decode_s(p, 1, ctx)) * p_run,
                _tpot_s(p, p_run + 1, ctx, now),
            ),
            PlacementOption(
                "local",
                "",
                _prefill_s(d, d.queued_prefill_tokens + d_uncached) + d_per_seq * d_run,
                _tpot_s(d, d_run + 1, ctx, now),
                stall_s=_prefill_s(d, d_uncached),
                stalled=d_run,
                slack_s=min(tpot_slack_s(d, now, self.lend_tpot_s), TPOT_SLACK_IDLE_S) if self.lend_tpot_s else None,
            ),
        )
        return place_by_slo(options, spec.slo_ttft_s, spec.slo_tpot_s).kind


PREFILL_BUSY_WINDOW_S = 30.0  # common/perf_model.py StepTimes.window_s: the share of time in prefill steps
# core sharing, as worker_core/engine_loop.py and worker_core/core_share.py run it (tests/unit/test_planner.py
# checks these against them)
WIDEN_MIN_PREFILL_TOKENS = 128  # worker_core/engine_loop.py (which loads torch): a test keeps the two equal


def _lend_requests(d: SimWorker) -> list[tuple[float, int, int]]:
    """A decode worker's requests as LendBudget reads them: (TPOT clock start, output tokens, max tokens)."""
    return [(r.token_times[0] if r.emitted else r.arrival_s, r.emitted, r.output_len) for r in (*d.running, *d.waiting)]


def lend_budget(d: SimWorker, tpot_s: float) -> LendBudget:
    """The decode worker's LendBudget, its step estimate from the profile at its running batch."""
    budget = LendBudget(tpot_s)
    budget.step_s = _decode_s(d, len(d.running), max((r.tokens_now() for r in d.running), default=1))
    return budget


def tpot_slack_s(d: SimWorker, now: float, tpot_s: float) -> float:
    """LendBudget.slack of a simulated decode worker (inf when no request has a first token)."""
    return lend_budget(d, tpot_s).slack(now, _lend_requests(d))


def lend_allowed_s(d: SimWorker, now: float, tpot_s: float) -> float:
    """LendBudget.allowed: the pause a simulated decode worker's requests allow now."""
    return lend_budget(d, tpot_s).allowed(now, _lend_requests(d))


def _uncached(w: SimWorker, req: SimRequest) -> int:
    bs = w.cache.block_size
    lookable = (req.prompt_len - 1) // bs
    hit = w.cache.cached_prefix(req.hashes_upto(lookable, bs)) if lookable > 0 else 0
    return req.prompt_len - hit * bs


def _prefill_s(w: SimWorker, tokens: int) -> float:
    return w.profile.step.step_s(StepShape.of([(tokens, 0)])) if tokens > 0 else 0.0


def _decode_s(w: SimWorker, seqs: int, context: int) -> float:
    return w.profile.step.step_s(StepShape.of((), [context] * max(seqs, 1)))


def _tpot_s(w: SimWorker, seqs: int, context: int, now: float) -> float:
    """As common/perf_model.py `PerfEstimate.tpot_s`: the decode step over the share of time not in prefills."""
    return _decode_s(w, seqs, context) / max(1.0 - w.prefill_busy(now, PREFILL_BUSY_WINDOW_S), 0.05)


def _worker_profile(profile: Profile, key: str | None, pool: str):
    try:
        return profile.worker(key)
    except ProfileError as e:
        raise SimError(f"{pool} pool: {e}") from None
