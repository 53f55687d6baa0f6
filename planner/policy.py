"""The online SLA policy behind `tandem serve --planner sla`: from what the router saw in the last interval,
how many prefill and decode workers the cluster should have, and what to change now.

Every `interval_s` the deploy layer hands `SlaPolicy.observe` an `Observation` (arrivals, prompt and
output lengths, cache hits, TTFT / ITL against the targets, the pools as they are, live step-time
estimates per worker) and applies the `Decision`s it returns through the admin path. The policy:

1. **Predicts the load.** Holt's linear smoothing of the arrival rate (level and trend), looked
   `horizon_s` ahead (about a worker's start-up): plans are for the rate the new worker will meet.
2. **Refines the profile from live steps.** Each warm worker's measured decode and prefill step times
   against the profile's prediction for the same step give a speed factor per pool (median of the
   workers). A worker younger than `warmup_s` is left out (its first steps pay allocation and page
   faults; Dynamo #12430 shows what such samples do to a capacity model) and the decision says so.
3. **Sizes the pools by simulation** (planner/plan.py) at the predicted rate, with the observed lengths.
4. **Corrects by what it sees.** If the targets are missed now although the model says the pools
   suffice, the pool whose target is missed gets one more worker (not within `cooldown_s` of the last
   change: a change needs time to show).
5. **Scales up at once, down with care.** A pool grows as soon as it is short. It shrinks by one worker
   only after `down_after` intervals in a row wanting fewer, never within `cooldown_s` of a change, and
   only if a re-prediction of the smaller cluster at the predicted rate plus `margin` still meets the
   target with `margin` to spare: the survivors absorb the removed worker's load (N / (N - 1) each),
   which is what makes a naive 2 <-> 1 policy oscillate (Dynamo PR #9294).
6. **Moves a worker between roles** when the machine (`max_workers`) is full and the other pool has
   one to spare, and otherwise asks for resources (`request_resources` on a Ray cluster with an
   autoscaler) rather than failing.

Pure: no clock of its own (the observation carries `now`), no I/O. Every decision carries its inputs and
the predicted outcome; deploy/planner_loop.py logs them, exports them as metrics and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from planner.live_speed import (
    POOLS,
    WorkerLive,
    contention_share,
    refined_profile,
    speed_factors,
)
from planner.plan import Candidate, Planner, PlanRequest
from planner.profile import Profile
from planner.simulator import ClusterSpec
from tandem_api.bench.datasets import DatasetOptions


@dataclass(frozen=True)
class PolicyConfig:
    slo: dict[str, float]  # ttft_ms, itl_ms / tpot_ms: the targets, as `tandem bench --slo`
    attainment: float = 0.9
    interval_s: float = 30.0
    horizon_s: float = 60.0
    min_workers: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1})
    max_workers: int = 8  # the machine (or cluster budget): prefill + decode
    down_after: int = 3
    cooldown_s: float = 120.0
    warmup_s: float = 120.0
    margin: float = 0.05
    smoothing: float = 0.5  # Holt's level weight
    trend_smoothing: float = 0.3
    spread: float = 0.5  # lognormal spread of lengths assumed around the observed means
    sim_requests: int = 300
    sim_seconds: float = 60.0
    # the served router's placement by SLO (seconds: TTFT, time per output token; (0, 0): fixed placement)
    placement_slo_s: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Observation:
    now: float
    window_s: float
    arrivals: int
    mean_input_tokens: float
    mean_output_tokens: float
    cache_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens
    completed: int = 0
    slo_attainment: float | None = None  # share of the window's completed requests meeting every target
    ttft_attainment: float | None = None  # ... meeting the TTFT target
    itl_attainment: float | None = None  # ... meeting the ITL / TPOT target
    workers: tuple[WorkerLive, ...] = ()
    pending: int = 0  # admin operations still running (workers starting or draining)

    def pool_size(self, pool: str) -> int:
        return sum(1 for w in self.workers if w.pool == pool and not w.draining)


class Decision(msgspec.Struct, frozen=True):
    at: float
    action: str  # "add" | "remove" | "move" | "hold" | "request_resources"
    pool: str = ""  # the pool that grows (add, move, request_resources) or shrinks (remove)
    count: int = 0
    source_pool: str = ""  # move: the pool that gives the worker
    reason: str = ""
    inputs: dict[str, Any] = {}
    predicted: dict[str, Any] = {}


class LoadPredictor:
    """Holt's linear exponential smoothing of the arrival rate (requests/s)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        self.alpha, self.beta = alpha, beta
        self.level: float | None = None
        self.trend = 0.0
        self.last_t: float | None = None

    def update(self, t: float, rate: float) -> None:
        if self.level is None or self.last_t is None:
            self.level, self.last_t = rate, t
            return
        dt = max(t - self.last_t, 1e-9)
        prev = self.level
        self.level = self.alpha * rate + (1 - self.alpha) * (prev + self.trend * dt)
        self.trend = self.beta * (self.level - prev) / dt + (1 - self.beta) * self.trend
        self.last_t = t

    def predict(self, ahead_s: float) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + self.trend * ahead_s)


class SlaPolicy:
    def __init__(self, profile: Profile, config: PolicyConfig) -> None:
        self.profile = profile
        self.config = config
        self.predictor = LoadPredictor(config.smoothing, config.trend_smoothing)
        self.last_change: float | None = None
        self.want_fewer: dict[str, int] = {p: 0 for p in POOLS}
        self.decisions: list[Decision] = []
        self.last_plan: tuple[int, int] | None = None
        self.last_predicted: dict[str, Any] = {}

    # -- model --------------------------------------------------------------------------------------------

    def _planner(self, profile: Profile, rate: float, obs: Observation) -> Planner:
        c = self.config
        options = DatasetOptions(
            input_len=max(1, round(obs.mean_input_tokens)),
            output_len=max(1, round(obs.mean_output_tokens)),
            spread=c.spread,
            common_prefix_len=int(obs.mean_input_tokens * min(max(obs.cache_hit_rate, 0.0), 0.95)),
        )
        request = PlanRequest(
            rate=max(rate, 1e-3),
            slo=dict(c.slo),
            options=options,
            attainment=c.attainment,
            max_workers=c.max_workers,
            num_requests=int(min(max(c.sim_requests, rate * c.sim_seconds), 5000)),
            modes=("disaggregated",),
            max_simulations=40,
            slice_workers=0,  # one machine or a small cluster: simulate it whole
            placement_slo_s=c.placement_slo_s,
        )
        return Planner(profile, request)

    def _spec(self, n: int, m: int) -> ClusterSpec:
        return ClusterSpec(
            prefill=n,
            decode=m,
            prefill_shape=self.profile.pools.get("prefill"),
            decode_shape=self.profile.pools.get("decode"),
            slo_ttft_s=self.config.placement_slo_s[0],
            slo_tpot_s=self.config.placement_slo_s[1],
        )

    def _predict(self, planner: Planner, n: int, m: int) -> Candidate:
        return planner.evaluate(self._spec(n, m))

    # -- one interval ---------------------------------------------------------------------------------

    def observe(self, obs: Observation) -> list[Decision]:
        c = self.config
        rate = obs.arrivals / obs.window_s if obs.window_s > 0 else 0.0
        self.predictor.update(obs.now, rate)
        ahead = self.predictor.predict(c.horizon_s)
        target_rate = max(rate, ahead)
        factors, cold = speed_factors(self.profile, obs.workers, c.warmup_s)
        profile = refined_profile(self.profile, factors)
        n_now, m_now = obs.pool_size("prefill"), obs.pool_size("decode")
        inputs: dict[str, Any] = {
            "rate": rate,
            "predicted_rate": ahead,
            "planning_rate": target_rate,
            "mean_input_tokens": obs.mean_input_tokens,
            "mean_output_tokens": obs.mean_output_tokens,
            "cache_hit_rate": obs.cache_hit_rate,
            "slo_attainment": obs.slo_attainment,
            "ttft_attainment": obs.ttft_attainment,
            "itl_attainment": obs.itl_attainment,
            "prefill": n_now,
            "decode": m_now,
            "speed_factors": factors,
            "cold_workers_excluded": cold,
        }
        if obs.pending:
            return self._emit(Decision(obs.now, "hold", reason="an admin operation is still running", inputs=inputs))
        if n_now < 1 or m_now < 1:
            return self._emit(Decision(obs.now, "hold", reason="a pool is empty: waiting for workers", inputs=inputs))
        cooling = self.last_change is not None and obs.now - self.last_change < c.cooldown_s
        mins = c.min_workers
        unmet = ""  # no cluster within max_workers meets the target: the pool that needs more than fits
        if target_rate <= 0 or obs.mean_input_tokens <= 0:
            want_n, want_m = mins.get("prefill", 1), mins.get("decode", 1)
            planner = None
        else:
            planner = self._planner(profile, target_rate, obs)
            best = planner.search_disaggregated(
                self.profile.pools.get("prefill") or profile.keys()[0],
                self.profile.pools.get("decode") or profile.keys()[0],
            )
            if best is None:
                want_n, want_m, unmet = self._full_split(planner)
            else:
                want_n, want_m = best.spec.prefill, best.spec.decode
                self.last_predicted = best.row()
        want_n, want_m = max(want_n, mins.get("prefill", 1)), max(want_m, mins.get("decode", 1))
        # what the router sees now overrides a model that says all is well (not while a change settles)
        reactive = ""
        if not cooling and obs.completed >= 5:
            if obs.ttft_attainment is not None and obs.ttft_attainment < c.attainment and want_n <= n_now:
                want_n, reactive = n_now + 1, "TTFT target missed now"
            if obs.itl_attainment is not None and obs.itl_attainment < c.attainment and want_m <= m_now:
                want_m, reactive = m_now + 1, (reactive + "; " if reactive else "") + "ITL target missed now"
        inputs["wanted"] = {"prefill": want_n, "decode": want_m}
        self.last_plan = (want_n, want_m)
        out = self._act(obs, inputs, n_now, m_now, want_n, want_m, cooling, planner, target_rate, reactive)
        if unmet and not cooling and not any(d.action == "request_resources" for d in out):
            more = Decision(
                obs.now,
                "request_resources",
                unmet,
                1,
                reason=f"no cluster of at most {c.max_workers} workers meets the targets at {target_rate:.3g} req/s",
                inputs=inputs,
                predicted=self.last_predicted,
            )
            out = [d for d in out if d.action != "hold"] + [more]
            self.last_change = obs.now
        return self._emit(*out)

    def _full_split(self, planner: Planner) -> tuple[int, int, str]:
        """No cluster within max_workers meets the target: the best split of the whole machine, and the pool
        whose target it misses most (the one to ask more resources for)."""
        total = self.config.max_workers
        best: tuple[float, int, int, Candidate] | None = None
        for k in range(1, max(total, 2)):
            cand = self._predict(planner, k, max(total - k, 1))
            if best is None or cand.attainment > best[0]:
                best = (cand.attainment, k, max(total - k, 1), cand)
        assert best is not None
        self.last_predicted = best[3].row()
        ttft = planner.misses(best[3], ("ttft_ms",))
        decode = planner.misses(best[3], ("tpot_ms", "itl_ms"))
        return best[1], best[2], "prefill" if ttft >= decode else "decode"

    def _act(
        self,
        obs: Observation,
        inputs: dict[str, Any],
        n: int,
        m: int,
        want_n: int,
        want_m: int,
        cooling: bool,
        planner: Planner | None,
        rate: float,
        reactive: str,
    ) -> list[Decision]:
        c = self.config
        now = obs.now
        have = {"prefill": n, "decode": m}
        want = {"prefill": want_n, "decode": want_m}
        out: list[Decision] = []
        why = reactive or f"the model sizes the pools {want_n}P+{want_m}D at {rate:.3g} req/s"
        for pool in POOLS:  # grow at once
            short = want[pool] - have[pool]
            if short <= 0:
                continue
            self.want_fewer[pool] = 0
            room = c.max_workers - sum(have.values())
            other = "decode" if pool == "prefill" else "prefill"
            if room >= short:
                out.append(Decision(now, "add", pool, short, reason=why, inputs=inputs, predicted=self.last_predicted))
                have[pool] += short
                continue
            if room > 0:
                out.append(Decision(now, "add", pool, room, reason=why, inputs=inputs, predicted=self.last_predicted))
                have[pool] += room
                short -= room
            if have[other] > want[other] and have[other] > c.min_workers.get(other, 1):
                out.append(
                    Decision(
                        now,
                        "move",
                        pool,
                        1,
                        source_pool=other,
                        reason=f"{why}; the machine is full and {other} has a worker to spare",
                        inputs=inputs,
                        predicted=self.last_predicted,
                    )
                )
                have[other] -= 1
                have[pool] += 1
            else:
                out.append(
                    Decision(
                        now,
                        "request_resources",
                        pool,
                        short,
                        reason=f"{why}; the machine is full ({c.max_workers} workers)",
                        inputs=inputs,
                        predicted=self.last_predicted,
                    )
                )
        if out:
            self.last_change = now
            return out
        for pool in POOLS:  # shrink with care: one worker, after a streak, never while settling
            if want[pool] < have[pool] and have[pool] > c.min_workers.get(pool, 1):
                self.want_fewer[pool] += 1
            else:
                self.want_fewer[pool] = 0
        for pool in POOLS:
            if self.want_fewer[pool] < c.down_after:
                continue
            if cooling:
                return _listed(
                    Decision(
                        now, "hold", pool, reason="fewer would do, but the last change is still settling", inputs=inputs
                    )
                )
            smaller = dict(have)
            smaller[pool] -= 1
            if planner is not None:
                check = self._planner(
                    refined_profile(self.profile, inputs["speed_factors"]), rate * (1 + c.margin), obs
                )
                cand = self._predict(check, smaller["prefill"], smaller["decode"])
                predicted = cand.row()
                if cand.attainment < min(1.0, c.attainment + c.margin):
                    self.want_fewer[pool] = 0
                    return _listed(
                        Decision(
                            now,
                            "hold",
                            pool,
                            reason=f"re-prediction: {smaller['prefill']}P+"
                            f"{smaller['decode']}D would attain {cand.attainment:.0%} at "
                            f"{rate * (1 + c.margin):.3g} req/s",
                            inputs=inputs,
                            predicted=predicted,
                        )
                    )
            else:
                predicted = {}
            self.want_fewer[pool] = 0
            self.last_change = now
            return _listed(
                Decision(
                    now,
                    "remove",
                    pool,
                    1,
                    reason=f"{c.down_after} intervals wanting {want[pool]} {pool} workers; the re-prediction holds",
                    inputs=inputs,
                    predicted=predicted,
                )
            )
        return _listed(
            Decision(now, "hold", reason="the pools fit the load", inputs=inputs, predicted=self.last_predicted)
        )

    def _emit(self, *decisions: Decision) -> list[Decision]:
        self.decisions.extend(decisions)
        return list(decisions)


def _listed(*decisions: Decision) -> list[Decision]:
    return list(decisions)


def decision_text(d: Decision) -> str:
    """One log line: the action, its reason, and the figures it was taken on."""
    i = d.inputs
    head = {
        "add": f"add {d.count} {d.pool}",
        "remove": f"remove {d.count} {d.pool}",
        "move": f"move 1 {d.source_pool} -> {d.pool}",
        "request_resources": f"request resources for {d.count} {d.pool}",
        "hold": "hold" + (f" {d.pool}" if d.pool else ""),
    }[d.action]
    figures = (
        f"rate {i.get('rate', 0):.3g}/s (predicted {i.get('predicted_rate', 0):.3g}), "
        f"pools {i.get('prefill')}P+{i.get('decode')}D, attainment {i.get('slo_attainment')}"
    )
    pred = d.predicted
    if pred:
        attain, ttft = pred.get("slo_attainment") or 0.0, pred.get("ttft_ms_p50") or 0.0
        figures += f"; predicted attainment {attain:.0%}, TTFT p50 {ttft:.0f} ms"
    return f"{head}: {d.reason} [{figures}]"


__all__ = [
    "Decision",
    "LoadPredictor",
    "Observation",
    "PolicyConfig",
    "SlaPolicy",
    "WorkerLive",
    "decision_text",
    "contention_share",
    "refined_profile",
    "speed_factors",
]
