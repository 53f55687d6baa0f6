"""A discrete-event model of a Tandem cluster: the load `tandem bench` sends, the router, the workers' queues,
steps, KV caches and transfers, in simulated time. `simulate(...)` returns the same per-request records the
benchmark client keeps, so `tandem simulate` writes the same `summary.json` as `tandem bench`.

The path of a request, as the served cluster runs it (../shared/DESIGN.md, section 1):

    send ─> router: decode worker D, then remote prefill on P (or local on D, conditional disaggregation;
       or, with placement by SLO, local on D or the whole request on P when remote is predicted to miss)
    P: waits, prefills in token-budget steps (chunked), samples token 1 (the router streams it: TTFT),
       keeps the blocks leased
    D: admits it when its cache has room for the prompt (it waits otherwise), pulls the blocks it lacks
       (TransferModel), then decodes one token per step in its running batch (the pull is in token 2's
       latency, as in the served cluster: router/responses.py, RequestTrace)
    aggregated mode: one worker does all of it, prefill chunks and decode rows sharing steps

Times come from the profile: each worker's `StepModel` prices every step it schedules, the `TransferModel`
every pull, and `ServedOverhead` what the served path adds (to the first token; to each decode step).

Placement by SLO (`ClusterSpec.slo_ttft_s` / `slo_tpot_s`) decides with the router's own rule
(router/placement.py) from the profile's step model where the router uses the workers' live lines.

Core sharing on a CPU host (worker_core/core_share.py), when the profile measured it
(`ServedOverhead.widened_prefill_speedup`): a prefill worker's step, while it has at least
WIDEN_MIN_PREFILL_TOKENS prompt tokens left, runs that many times faster when its host's decode worker is
idle, or lends: the decode worker's requests allow a pause of at least LEND_MIN_S (LEND_SAFETY of their
smallest TPOT slack against `lend_tpot_s`, none while one waits for its first token) and its step in flight
ends within LEND_WAIT_S. The lender then starts no step until the widened step ends or its allowed pause
runs out. A decode worker that gets work while its idle core is borrowed runs beside the widened step at
the usual contention (the widened step is not slowed: optimistic). The router's local-prefill check reads
the same slack (WorkerStatus.tpot_slack_s).

What it leaves out (each small on the profiled machine, docs/BENCHMARKS.md measures the whole): network
time between client and router, the router's own queueing, KV event delay (the router sees caches as
they are), speculative decoding, and failures.
"""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from planner.model import StepShape
from planner.profile import Profile, ProfileError
from planner.sim_prompts import SegmentPromptMaker, segments_of
from planner.sim_worker import SimRequest, SimWorker, StepPlan, is_decode_row
from router.placement import PlacementOption, place_by_slo
from tandem_api.bench.datasets import Dataset, Prompt, Unit
from tandem_api.bench.metrics import OK, RequestRecord
from tandem_api.bench.runner import LoadConfig, arrival_times

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
WIDEN_MIN_PREFILL_TOKENS = 128
LEND_MIN_S = 1.0
LEND_SAFETY = 0.5
LEND_HORIZON_TOKENS = 128
LEND_WAIT_S = 0.1
TPOT_SLACK_IDLE_S = 3600.0


def tpot_slack_s(d: SimWorker, now: float, tpot_s: float) -> float:
    """LendBudget.slack of a decode worker: the smallest TPOT slack of its requests that have a first token
    (inf when none has)."""
    step = _decode_s(d, len(d.running), max((r.tokens_now() for r in d.running), default=1))
    slack = math.inf
    for r in (*d.running, *d.waiting):
        end = min(r.output_len, r.emitted + LEND_HORIZON_TOKENS)
        if r.emitted == 0 or end <= r.emitted:
            continue
        slack = min(slack, tpot_s * (end - 1) - (now - r.token_times[0]) - (end - r.emitted) * step)
    return slack


def lend_allowed_s(d: SimWorker, now: float, tpot_s: float) -> float:
    """LendBudget.allowed: the pause a decode worker's requests allow now."""
    if any(r.emitted == 0 for r in (*d.running, *d.waiting)):
        return 0.0  # a local prefill waits for its first token
    slack = tpot_slack_s(d, now, tpot_s)
    return 0.0 if slack == math.inf else max(0.0, LEND_SAFETY * slack)


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


class Simulation:
    """The event loop: a heap of (time, order, action)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.events = 0
        self.on_finish: Callable[[SimRequest], None] = lambda r: None
        self._streamed: deque[float] = deque()  # when tokens were streamed in the last second (router CPU)

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._order), action))

    def run(self) -> None:
        collecting = gc.isenabled()
        gc.disable()  # millions of small objects that live to the end: the collector would rescan them all
        try:
            while self._heap:
                t, _, action = heapq.heappop(self._heap)
                self.now = t
                self.events += 1
                action()
        finally:
            if collecting:
                gc.enable()

    # -- requests --------------------------------------------------------------------------------------

    def send(self, req: SimRequest) -> None:
        w = self.cluster.route(req, self.now)
        if req.prompt_len + req.output_len > w.cache.num_blocks * w.cache.block_size:
            self.cluster.unroute(req)
            req.route = "too-long"
            self.on_finish(req)
            return
        w.add(req)
        self.kick(w)

    def kick(self, w: SimWorker) -> None:
        if w.busy_until is not None or not w.has_work():
            return
        if w.paused_until is not None:
            if self.now < w.paused_until:
                return  # lending its core: a kick comes when the pause ends
            w.paused_until = None
        plan = w.schedule()
        if plan is None:
            return  # blocked on KV: a release kicks it again
        seconds = plan.seconds
        start = self.now
        widened = self._widen(w)
        if widened is not None:
            start, seconds = widened, seconds / self.cluster.widen_speedup
        elif w.neighbours and w.contention:
            seconds *= 1.0 + w.contention * sum(1 for n in w.neighbours if n.busy_until is not None)
        if w.router_host:
            seconds *= self._cpu_stretch(w)
        w.busy_until = start + seconds
        if widened is not None:
            for n in w.neighbours:
                if n.role == "decode" and n.has_work():  # it lends: no step until the widened one ends
                    allowed = lend_allowed_s(n, self.now, self.cluster.lend_tpot_s)
                    n.paused_until = min(w.busy_until, start + allowed)
                    n.lent_s += n.paused_until - start
                    self.at(n.paused_until, functools.partial(self.kick, n))
        w.step_started = start
        if w.first_step_s is None:
            w.first_step_s = self.now
        w.busy_s += seconds - plan.seconds
        self.at(w.busy_until, lambda: self._step_end(w, plan))

    def _widen(self, w: SimWorker) -> float | None:
        """When a prefill worker's next step runs widened (see the module docstring): the time it starts (after
        the lender's step in flight), else None."""
        c = self.cluster
        if not c.widen_speedup or w.role != "prefill" or w.queued_prefill_tokens < WIDEN_MIN_PREFILL_TOKENS:
            return None
        start = self.now
        for n in w.neighbours:
            if n.role != "decode" or not (n.busy_until is not None or n.has_work()):
                continue  # idle: its core is borrowed
            if not c.lend_tpot_s or lend_allowed_s(n, self.now, c.lend_tpot_s) < LEND_MIN_S:
                return None
            if n.busy_until is not None:
                if n.busy_until - self.now > LEND_WAIT_S:
                    return None
                start = max(start, n.busy_until)
        return start

    def _step_end(self, w: SimWorker, plan: StepPlan) -> None:
        w.busy_until = None
        if any(not is_decode_row(r, n) for r, n in plan.rows):
            w.prefill_steps.append((self.now, self.now - w.step_started))
        freed = False
        for req in w.finish_step(plan):
            req.emitted += 1
            if req.handoff and w.role == "prefill":
                w.pin(req)
                self._hand_off(w, req)
                continue
            self._deliver(req, first=req.emitted == 1)
            if req.emitted >= req.output_len:
                w.remove(req)
                freed = True
                self._finish(req)
        self.kick(w)
        if freed and w.role == "decode":
            self._admit(w)

    def _deliver(self, req: SimRequest, first: bool) -> None:
        req.token_times.append(self.now + (self.cluster.first_token_s if first else 0.0))
        if self.cluster.router_cpu:
            self._streamed.append(self.now)

    def _cpu_stretch(self, w: SimWorker) -> float:
        """A step on the router's host while the host is oversubscribed: busy workers' threads plus the router's
        CPU for the tokens it streams (over the last second) against the host's cores."""
        c = self.cluster
        while self._streamed and self._streamed[0] < self.now - 1.0:
            self._streamed.popleft()
        threads = w.profile.shape.num_threads + sum(
            n.profile.shape.num_threads for n in w.neighbours if n.busy_until is not None
        )
        demand = threads + c.router_cpu * len(self._streamed)
        return max(1.0, demand / c.host_cores)

    def _finish(self, req: SimRequest) -> None:
        req.finished_s = req.token_times[-1]
        if req.route == "whole":
            self.cluster.prefill_pool[req.prefill_worker].assigned -= 1
        elif req.decode_worker >= 0 and self.cluster.decode_pool:
            self.cluster.decode_pool[req.decode_worker].assigned -= 1
        self.on_finish(req)

    def _hand_off(self, p: SimWorker, req: SimRequest) -> None:
        """P sampled token 1: the router streams it at once (TTFT), then asks D to take the request."""
        self._deliver(req, first=True)
        if req.emitted >= req.output_len:  # a one-token reply: no decode, P's lease ends
            d = self.cluster.decode_pool[req.decode_worker]
            d.booked_blocks -= -(-req.prompt_len // d.cache.block_size)
            p.remove(req)
            self.kick(p)
            self._finish(req)
            return
        d = self.cluster.decode_pool[req.decode_worker]
        self.cluster.admitting[d.wid].append(req)
        self._admit(d)

    def _admit(self, d: SimWorker) -> None:
        """D takes waiting hand-offs in order while its cache has room for their prompts; each pulls."""
        queue = self.cluster.admitting[d.wid]
        bs = d.cache.block_size
        while queue:
            req = queue[0]
            lookable = req.prompt_len // bs
            hit = d.cache.cached_prefix(req.hashes_upto(lookable, bs)) if lookable > 0 else 0
            if hit:
                d.cache.take_prefix(req, req.hashes[:hit])
            if not d.cache.allocate(req, req.prompt_len + 1):
                if hit:
                    d.cache.release(req)
                return
            queue.popleft()
            blocks = -(-req.prompt_len // bs) - hit
            seconds = self.cluster.transfer.transfer_s(blocks)
            self.at(self.now + seconds, functools.partial(self._landed, d, req))

    def _landed(self, d: SimWorker, req: SimRequest) -> None:
        d.booked_blocks -= -(-req.prompt_len // d.cache.block_size)
        p = self.cluster.prefill_pool[req.prefill_worker]
        p.remove(req)  # the lease ends: P's blocks go back to its cache
        self.kick(p)
        req.computed = req.prompt_len
        d.cache.commit(req, req.prompt_len)
        d.waiting.append(req)  # joins the batch at the next step (decode rows: no prefill left)
        self.kick(d)


# -- the load ----------------------------------------------------------------------------------------


def simulate(profile: Profile, spec: ClusterSpec, dataset: Dataset, cfg: LoadConfig) -> SimResult:
    """One load at one rate, as `tandem_api.bench.runner.run_load` drives it, on a simulated cluster."""
    cluster = Cluster(profile, spec)
    sim = Simulation(cluster)
    prompts = SegmentPromptMaker()
    records: list[RequestRecord] = []
    by_req: dict[SimRequest, RequestRecord] = {}
    slots_free = cfg.max_concurrency or math.inf
    held: deque[tuple[Unit, float, int]] = deque()  # units waiting for a --max-concurrency slot
    conversations: dict[int, tuple[Unit, int, list[tuple[Prompt, Prompt]], int]] = {}
    workers = cluster.prefill_pool + cluster.decode_pool

    def start_turn(unit: Unit, k: int, history: list[tuple[Prompt, Prompt]], turns: int, send_s: float) -> None:
        turn = unit.turns[k]
        parts: list[Prompt] = [unit.system] if unit.system is not None else []
        for asked, answered in history:
            parts.extend((asked, answered))
        parts.append(turn.user)
        segments = tuple(s for p in parts for s in segments_of(p))
        reply = prompts.fresh(turn.output_tokens)
        prompt_len = sum(n for _, n in segments)
        req = SimRequest(len(records), send_s, segments + reply.segments, prompt_len, turn.output_tokens)
        record = RequestRecord(
            index=len(records),
            request_id=f"sim-{unit.index}-{k}",
            arrival_s=send_s,
            send_s=send_s,
            input_tokens=prompt_len,
            expected_output_tokens=turn.output_tokens,
            prefix_group=unit.prefix_group,
            conversation=unit.index if len(unit.turns) > 1 else None,
            turn=k if len(unit.turns) > 1 else None,
        )
        records.append(record)
        by_req[req] = record
        conversations[req.index] = (unit, k, history + [(turn.user, reply)], turns)
        sim.send(req)

    def on_finish(req: SimRequest) -> None:
        nonlocal slots_free
        record = by_req.pop(req)
        unit, k, history, turns = conversations.pop(req.index)
        if req.route == "too-long":
            record.status = "INVALID_ARGUMENT"
            record.error = "prompt and output exceed the worker's KV capacity"
        else:
            record.status = OK
            record.chunks = [(t, 1) for t in req.token_times]
            record.output_tokens = req.emitted
            record.cached_tokens = max(req.cached, 0)
            record.route = req.route
            record.prefill_worker = f"prefill-{req.prefill_worker}" if req.route == "remote" else ""
            if req.route == "whole":  # as the served cluster reports it: the prefill worker decoded it
                record.decode_worker = f"prefill-{req.prefill_worker}"
            else:
                pool = "aggregated" if req.route == "aggregated" else "decode"
                record.decode_worker = f"{pool}-{req.decode_worker}"
        if record.ok and k + 1 < turns:
            start_turn(unit, k + 1, history, turns, sim.now if not req.token_times else req.token_times[-1])
            return
        slots_free += 1
        if held:
            unit, arrival, turns = held.popleft()
            slots_free -= 1
            start_turn(unit, 0, [], turns, max(sim.now, arrival))

    sim.on_finish = on_finish
    if cfg.num_requests is None and cfg.duration_s is None and dataset.size is None:
        raise SimError("give --num-requests or --duration: the dataset is endless")
    arrivals: Iterator[float] = arrival_times(dataset, cfg)
    planned = 0
    for unit in dataset.units:
        for turn in unit.turns:
            segments_of(turn.user)  # a dataset made with SegmentPromptMaker (TypeError otherwise)
        if cfg.num_requests is not None and planned >= cfg.num_requests:
            break
        arrival = next(arrivals, None)
        if arrival is None or (cfg.duration_s is not None and arrival >= cfg.duration_s):
            break
        turns = unit.requests if cfg.num_requests is None else min(unit.requests, cfg.num_requests - planned)
        planned += turns

        def release(unit: Unit = unit, arrival: float = arrival, turns: int = turns) -> None:
            nonlocal slots_free
            if slots_free <= 0:
                held.append((unit, arrival, turns))
                return
            slots_free -= 1
            start_turn(unit, 0, [], turns, arrival)

        sim.at(arrival, release)
    sim.run()
    for record in by_req.values():  # cannot happen in a consistent model; kept visible if it does
        record.status, record.error = "SIM_STALLED", "the simulated cluster never served this request"
    end = max((t for r in records for t, _ in r.chunks), default=0.0)
    stats = [
        {
            "role": w.role,
            "worker": w.wid,
            "steps": w.steps,
            "busy_share": w.busy_s / end if end > 0 else 0.0,
            "preemptions": w.preemptions,
            "lent_s": w.lent_s,
        }
        for w in workers
    ]
    return SimResult(records, end, stats, sim.events)
