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

from planner.profile import Profile
from planner.sim_cluster import (  # noqa: F401 - MODES, POLICIES and SimError are this module's API too
    MODES,
    POLICIES,
    WIDEN_MIN_PREFILL_TOKENS,
    Cluster,
    ClusterSpec,
    SimError,
    SimResult,
    lend_allowed_s,
)
from planner.sim_prompts import SegmentPromptMaker, segments_of
from planner.sim_worker import SimRequest, SimWorker, StepPlan, is_decode_row
from tandem_api.bench.datasets import Dataset, Prompt, Unit
from tandem_api.bench.metrics import OK, RequestRecord
from tandem_api.bench.runner import LoadConfig, arrival_times
from worker_core.core_share import LEND_MIN_S, LEND_WAIT_S


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
        plan = w.schedule(self.now)
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
