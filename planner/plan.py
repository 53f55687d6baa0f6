"""`tandem plan`: the cheapest cluster that meets the SLO at a request rate, found by simulation.

For every family the profile can describe (aggregated workers of each shape; disaggregated pools of each
prefill shape x decode shape), the search:

1. starts from a queueing estimate: prefill workers = rate x prefill seconds per request (a worker cannot
   be busy more than all the time), decode workers = the requests decoding at once (rate x decode time,
   Little's law) / what one worker holds (max_num_seqs, KV capacity); it ignores prefix-cache hits, so
   with shared prefixes the answer can be below it;
2. simulates, and grows the pool whose target is missed (TTFT: the pool that prefills; TPOT / ITL: the one
   that decodes; both when both are missed) until the attainment target holds or the budget ends;
3. shrinks each pool by one while the target still holds (the search's answer is then minimal in each
   pool at that point, not just adequate).

The family whose answer costs least wins; ties go to fewer workers, then to disaggregation (it scales
its pools separately). Every simulation run is kept (`Candidate`) so the operator sees why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from planner.profile import Profile, WorkerProfile
from planner.sim_prompts import SegmentPromptMaker
from planner.simulator import ClusterSpec, simulate
from tandem_api.bench.datasets import Dataset, DatasetOptions, build_dataset
from tandem_api.bench.metrics import summarize
from tandem_api.bench.runner import LoadConfig

TTFT_KEYS = ("ttft_ms",)
DECODE_KEYS = ("tpot_ms", "itl_ms")


@dataclass
class Candidate:
    spec: ClusterSpec  # as simulated: a 1 / scale slice of the cluster when scale > 1
    cost: float  # of the whole cluster
    summary: dict[str, Any]
    scale: float = 1.0

    @property
    def attainment(self) -> float:
        return self.summary["slo_attainment"] or 0.0

    @property
    def full(self) -> ClusterSpec:
        """The whole cluster this candidate stands for (the slice scaled up, rounded up)."""
        if self.scale == 1.0:
            return self.spec
        return replace(
            self.spec,
            prefill=math.ceil(self.spec.prefill * self.scale - 1e-9),
            decode=math.ceil(self.spec.decode * self.scale - 1e-9) if self.spec.mode == "disaggregated" else 0,
        )

    @property
    def workers(self) -> int:
        full = self.full
        return full.prefill + (full.decode if full.mode == "disaggregated" else 0)

    def row(self) -> dict[str, Any]:
        s = self.summary
        full = self.full
        return {
            "cluster": full.describe(),
            "mode": full.mode,
            "prefill": full.prefill,
            "decode": full.decode if full.mode == "disaggregated" else 0,
            "simulated_slice": self.spec.describe() if self.scale != 1.0 else None,
            "slice_scale": self.scale,
            "prefill_shape": self.spec.prefill_shape,
            "decode_shape": self.spec.decode_shape,
            "cost": self.cost,
            "slo_attainment": self.attainment,
            "goodput": s["goodput"] * self.scale,
            "ttft_ms_p50": s["ttft_ms"]["p50"],
            "ttft_ms_p99": s["ttft_ms"]["p99"],
            "tpot_ms_p50": s["tpot_ms"]["p50"],
            "itl_ms_p50": s["itl_ms"]["p50"],
            "itl_ms_p99": s["itl_ms"]["p99"],
        }


@dataclass
class PlanRequest:
    rate: float
    slo: dict[str, float]
    dataset: str = "random"
    options: DatasetOptions = field(default_factory=DatasetOptions)
    attainment: float = 0.9
    max_workers: int = 64
    num_requests: int = 300
    seed: int = 0
    burstiness: float = 1.0
    costs: dict[str, float] = field(default_factory=dict)  # shape key -> cost per worker (else the profile's)
    modes: tuple[str, ...] = ("disaggregated", "aggregated")
    policy: str = "kv"
    max_simulations: int = 200
    slice_workers: int = 24  # a family whose lower bound exceeds this is simulated as a proportional slice
    # the router's placement by SLO in a disaggregated cluster (seconds: TTFT, time per output token), as
    # `tandem serve --slo-ttft-ms/--slo-itl-ms`; (0, 0): the fixed placement
    placement_slo_s: tuple[float, float] = (0.0, 0.0)


@dataclass
class Plan:
    best: Candidate | None
    per_family: list[Candidate]
    tried: list[Candidate]
    lower_bounds: dict[str, tuple[int, int]]
    note: str = ""


class Planner:
    def __init__(self, profile: Profile, request: PlanRequest) -> None:
        self.profile = profile
        self.req = request
        self.tried: list[Candidate] = []
        self._cache: dict[tuple, Candidate] = {}
        self.scale = 1.0  # the family being searched is simulated as a 1 / scale slice (plan.py docstring)

    def cost_of(self, w: WorkerProfile) -> float:
        return self.req.costs.get(w.shape.key(), w.cost)

    def dataset(self) -> Dataset:
        return build_dataset(self.req.dataset, self.req.options, SegmentPromptMaker(), self.req.seed)

    def evaluate(self, spec: ClusterSpec) -> Candidate:
        """Simulate `spec` (in slice units when self.scale > 1) at the request's rate (divided by the scale)."""
        key = (spec.mode, spec.prefill, spec.decode, spec.prefill_shape, spec.decode_shape, self.scale)
        if key in self._cache:
            return self._cache[key]
        rate = self.req.rate / self.scale
        requests = self.req.num_requests if self.scale == 1.0 else max(1000, round(self.req.num_requests / self.scale))
        cfg = LoadConfig(rate=rate, burstiness=self.req.burstiness, num_requests=requests, seed=self.req.seed)
        result = simulate(self.profile, spec, self.dataset(), cfg)
        summary = summarize(result.records, result.duration_s, self.req.slo)
        cand = Candidate(spec, 0.0, summary, self.scale)
        full = cand.full
        p = self.profile.worker(spec.prefill_shape)
        if spec.mode == "aggregated":
            cand.cost = full.prefill * self.cost_of(p)
        else:
            cand.cost = full.prefill * self.cost_of(p) + full.decode * self.cost_of(
                self.profile.worker(spec.decode_shape)
            )
        self._cache[key] = cand
        self.tried.append(cand)
        return cand

    def passes(self, c: Candidate) -> bool:
        return c.attainment >= self.req.attainment

    def misses(self, c: Candidate, keys: tuple[str, ...]) -> float:
        """The share of completed requests that miss any target among `keys` (0 when none is set)."""
        targets = {k: v for k, v in self.req.slo.items() if k in keys}
        if not targets:
            return 0.0
        dist = c.summary
        ratios = []
        for k, v in targets.items():
            p = dist[k]["p50" if self.req.attainment <= 0.5 else "p90"]
            ratios.append((p or 0.0) / v)
        return max(ratios) - 1.0

    # -- lower bounds ------------------------------------------------------------------------------------

    def lower_bounds(self, prefill: WorkerProfile, decode: WorkerProfile, mode: str) -> tuple[int, int]:
        units = list(_take(self.dataset().units, 200))
        rate = self.req.rate  # of the whole cluster (the bounds are in whole-cluster workers)
        lengths = [
            (t.user.n_tokens + (u.system.n_tokens if u.system else 0), t.output_tokens) for u in units for t in u.turns
        ]
        mean_in = statistics.fmean(i for i, _ in lengths)
        mean_out = statistics.fmean(o for _, o in lengths)
        prefill_s = prefill.step.prefill_s(max(int(mean_in), 1), budget=prefill.max_num_batched_tokens)
        seats = max(1, min(decode.max_num_seqs, decode.kv_tokens // max(int(mean_in + mean_out), 1)))
        decode_s = mean_out * decode.step.decode_step_s(seats, mean_in + mean_out / 2)
        busy_prefill = rate * prefill_s
        concurrent = rate * decode_s
        if mode == "aggregated":
            return max(1, math.ceil(busy_prefill + concurrent / seats)), 0
        return max(1, math.ceil(busy_prefill)), max(1, math.ceil(concurrent / seats))

    # -- search ------------------------------------------------------------------------------------------

    def _budget_left(self) -> bool:
        return len(self.tried) < self.req.max_simulations

    def _slice(self, bound: int) -> None:
        """Simulate this family as a 1 / scale slice when its lower bound is large (a balanced pool behind
        one router serves about the same latencies at N workers and rate R as at N / k and R / k)."""
        limit = self.req.slice_workers
        self.scale = bound / limit if limit and bound > limit else 1.0

    def search_aggregated(self, shape: str) -> Candidate | None:
        w = self.profile.worker(shape)
        n0, _ = self.lower_bounds(w, w, "aggregated")
        self._slice(n0)
        make = lambda n: ClusterSpec(  # noqa: E731
            mode="aggregated", prefill=n, decode=0, prefill_shape=shape, policy=self.req.policy
        )
        return self._minimal_1d(make, max(1, round(n0 / self.scale)), int(self.req.max_workers / self.scale))

    def _minimal_1d(self, make: Callable[[int], ClusterSpec], start: int, limit: int) -> Candidate | None:
        """The smallest n in [1, limit] whose simulation passes: doubling up from `start`, then bisection."""
        lo, n = 0, max(1, min(start, limit))  # lo: largest known failing
        hit: Candidate | None = None
        while self._budget_left():
            c = self.evaluate(make(n))
            if self.passes(c):
                hit = c
                break
            lo = n
            if n >= limit:
                return None
            n = min(limit, n * 2)
        if hit is None:
            return None
        hi = n
        while hi - lo > 1 and self._budget_left():
            mid = (lo + hi) // 2
            c = self.evaluate(make(mid))
            if self.passes(c):
                hi, hit = mid, c
            else:
                lo = mid
        return hit

    def search_disaggregated(self, pshape: str, dshape: str) -> Candidate | None:
        pw, dw = self.profile.worker(pshape), self.profile.worker(dshape)
        n, m = self.lower_bounds(pw, dw, "disaggregated")
        self._slice(n + m)
        n, m = max(1, round(n / self.scale)), max(1, round(m / self.scale))
        limit = int(self.req.max_workers / self.scale)

        def spec(n: int, m: int) -> ClusterSpec:
            ttft_s, tpot_s = self.req.placement_slo_s
            return ClusterSpec(
                prefill=n,
                decode=m,
                prefill_shape=pshape,
                decode_shape=dshape,
                policy=self.req.policy,
                slo_ttft_s=ttft_s,
                slo_tpot_s=tpot_s,
            )

        c: Candidate | None = None
        while self._budget_left():  # grow the pool whose target is missed
            if n + m > limit:
                return None
            c = self.evaluate(spec(n, m))
            if self.passes(c):
                break
            ttft, dec = self.misses(c, TTFT_KEYS), self.misses(c, DECODE_KEYS)
            grow_p = ttft > 0 or (ttft <= 0 and dec <= 0)
            grow_d = dec > 0 or (ttft <= 0 and dec <= 0)
            if grow_p:
                n += max(1, math.ceil(n * min(ttft, 1.0) / 2)) if ttft > 0 else 1
            if grow_d:
                m += max(1, math.ceil(m * min(dec, 1.0) / 2)) if dec > 0 else 1
        else:
            return None
        if c is None or not self.passes(c):
            return None
        best = c
        for pool in ("prefill", "decode", "prefill"):  # shrink while it holds
            while self._budget_left():
                n2 = best.spec.prefill - (pool == "prefill")
                m2 = best.spec.decode - (pool == "decode")
                if n2 < 1 or m2 < 1:
                    break
                trial = self.evaluate(spec(n2, m2))
                if not self.passes(trial):
                    break
                best = trial
        return best

    def run(self) -> Plan:
        families: list[Candidate] = []
        bounds: dict[str, tuple[int, int]] = {}
        keys = self.profile.keys()
        if "aggregated" in self.req.modes:
            for k in keys:
                w = self.profile.worker(k)
                bounds[f"aggregated {k}"] = self.lower_bounds(w, w, "aggregated")
                c = self.search_aggregated(k)
                if c is not None:
                    families.append(c)
        if "disaggregated" in self.req.modes:
            for pk in keys:
                for dk in keys:
                    bounds[f"{pk} -> {dk}"] = self.lower_bounds(
                        self.profile.worker(pk), self.profile.worker(dk), "disaggregated"
                    )
                    c = self.search_disaggregated(pk, dk)
                    if c is not None:
                        families.append(c)
        self.scale = 1.0
        families.sort(key=lambda c: (c.cost, c.workers, c.spec.mode != "disaggregated", -c.attainment))
        note = ""
        if not families:
            note = (
                f"no cluster of at most {self.req.max_workers} workers meets the SLO at {self.req.rate:g} req/s "
                f"for {self.req.attainment:.0%} of requests "
                "(raise --max-workers, relax --slo, or profile a faster shape)"
            )
        elif not self._budget_left():
            note = f"the search stopped at --max-simulations {self.req.max_simulations}: the answer may not be minimal"
        return Plan(families[0] if families else None, families, self.tried, bounds, note)


def _take(it, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out
