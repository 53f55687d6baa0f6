"""`tandem serve --planner sla`: the SLA policy (planner/policy.py) wired to the router's live view and the admin
path.

Every `planner.interval_s` seconds (router clock):

    router/load_window.py   arrivals and ended requests since the last look  ─┐
    membership              workers per pool, draining or not, their status ─┼─> Observation
    WorkerStatus.perf       each worker's measured step times (common/perf_model.py) ─┘
    SlaPolicy.observe       (a thread: it simulates) -> Decisions
    AdminService            add / remove (drain first) / move; Ray's request_resources when the machine is full

Each decision is logged with its inputs and predicted outcome (`decision_text`), counted in
`tandem_planner_decisions_total{action,pool}`, and the figures it was taken on are gauges
(`tandem_planner_*`, deploy/observability/grafana panels "SLA planner"). One admin operation runs at a
time (the admin lock); while one runs, the loop waits for it before its next look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from planner.policy import Decision, Observation, PolicyConfig, SlaPolicy, WorkerLive, decision_text
from planner.profile import load_profile
from router.load_window import EndedRequest
from tandem_api.bench.metrics import meets_targets

if TYPE_CHECKING:
    from deploy.admin import AdminService
    from deploy.config import ServeConfig
    from router.server import GenerationService

log = logging.getLogger("tandem.planner")


def policy_config(cfg: ServeConfig, max_workers: int) -> PolicyConfig:
    p = cfg.planner
    return PolicyConfig(
        slo=cfg.planner_slo(),
        attainment=p.attainment,
        interval_s=p.interval_s,
        horizon_s=p.horizon_s,
        min_workers={"prefill": p.min_prefill, "decode": p.min_decode},
        max_workers=max_workers,
        down_after=p.down_after,
        cooldown_s=p.cooldown_s,
        warmup_s=p.warmup_s,
        placement_slo_s=placement_slo_s(cfg),
    )


def placement_slo_s(cfg: ServeConfig) -> tuple[float, float]:
    """The router's placement targets as the simulator takes them: (0, 0) where the placement is fixed."""
    r = cfg.router
    if cfg.mode != "disaggregated" or r.conditional_prefill_threshold > 0:
        return (0.0, 0.0)
    return (r.slo_ttft_ms / 1000, r.slo_itl_ms / 1000)


def machine_workers(cfg: ServeConfig) -> int:
    """planner.max_workers, else how many workers of the larger pool shape the Ray cluster's resources hold."""
    if cfg.planner.max_workers:
        return cfg.planner.max_workers
    import ray

    total = ray.cluster_resources()
    fits = []
    for pool in (cfg.prefill, cfg.decode):
        if pool.gpus:
            fits.append(int(total.get("GPU", 0) // (pool.gpus * pool.world_size)))
        if pool.num_cpus:
            fits.append(int(total.get("CPU", 0) // (pool.num_cpus * pool.world_size)))
    return max(min(fits) if fits else 2, cfg.planner.min_prefill + cfg.planner.min_decode)


def meets(e: EndedRequest, slo: dict[str, float]) -> tuple[bool, bool]:
    """(TTFT target held, decode targets held) for one ended request; a failed request holds neither."""
    if not e.ok:
        return False, False
    seconds = {"ttft_ms": e.ttft_s, "tpot_ms": e.tpot_s, "itl_ms": e.itl_p99_s}
    return meets_targets(slo, seconds, ("ttft_ms",)), meets_targets(slo, seconds, ("tpot_ms", "itl_ms"))


class PlannerLoop:
    def __init__(
        self,
        config: ServeConfig,
        service: GenerationService,
        admin: AdminService,
        policy: SlaPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        router_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock`: the planner's time (interval lengths, worker ages, the policy's `now`); `router_clock`: the
        clock the router stamps arrivals and ends with (router/load_window.py)."""
        self.config = config
        self.service = service
        self.admin = admin
        self.clock = clock
        if policy is None:
            profile = load_profile(config.planner.profile)
            policy = SlaPolicy(profile, policy_config(config, machine_workers(config)))
        self.policy = policy
        self.slo = policy.config.slo
        self.metrics = service.metrics  # tandem_planner_* (router/metrics.py)
        self._last = clock()
        self.router_clock = router_clock
        self._last_router = router_clock()
        self._first_seen: dict[str, float] = {}
        self.applied: list[Decision] = []

    def mark(self) -> None:
        """Start the next observation window now (on both clocks)."""
        self._last, self._last_router = self.clock(), self.router_clock()

    def observation(self) -> Observation:
        now = self.clock()
        window = max(now - self._last, 1e-6)
        router_now = self.router_clock()
        arrivals, ended = self.service.metrics.window.since(self._last_router)
        self._last, self._last_router = now, router_now
        done = [e for e in ended if e.ok]
        prompt = sum(e.prompt_tokens for e in done)
        met = [meets(e, self.slo) for e in ended]
        n = len(ended)
        workers = []
        mean_ctx = (prompt + sum(e.completion_tokens for e in done) / 2) / len(done) if done else 0.0
        for pool in self.service.membership.pools:
            for slot in pool.slots:
                first = self._first_seen.setdefault(slot.worker_id, now)
                perf = slot.status.perf if slot.status is not None else None
                batch = max(slot.status.running, 1) if slot.status is not None else 1
                workers.append(
                    WorkerLive(
                        slot.worker_id,
                        pool.role,
                        now - first,
                        perf.decode_step_s(batch) if perf is not None and perf.decode_ready else 0.0,
                        batch,
                        mean_ctx,
                        perf.per_token_s if perf is not None and perf.prefill_ready else 0.0,
                        draining=slot.draining or not slot.healthy,
                        live_step=slot.status.live_step if slot.status is not None else (),
                        live_busy=slot.status.live_busy if slot.status is not None else 0.0,
                        live_decode=slot.status.live_decode if slot.status is not None else (),
                    )
                )
        return Observation(
            now=now,
            window_s=window,
            arrivals=arrivals,
            mean_input_tokens=prompt / len(done) if done else 0.0,
            mean_output_tokens=sum(e.completion_tokens for e in done) / len(done) if done else 0.0,
            cache_hit_rate=sum(e.cached_tokens for e in done) / prompt if prompt else 0.0,
            completed=n,
            slo_attainment=sum(a and b for a, b in met) / n if n else None,
            ttft_attainment=sum(a for a, _ in met) / n if n else None,
            itl_attainment=sum(b for _, b in met) / n if n else None,
            workers=tuple(workers),
        )

    async def step(self) -> list[Decision]:
        """One interval: observe, decide (in a thread: it simulates), apply what changes the pools."""
        obs = self.observation()
        decisions = await asyncio.to_thread(self.policy.observe, obs)
        rate = obs.arrivals / obs.window_s
        self.metrics.planner_rate.labels("observed").set(rate)
        self.metrics.planner_rate.labels("predicted").set(self.policy.predictor.predict(self.policy.config.horizon_s))
        if obs.slo_attainment is not None:
            self.metrics.planner_attainment.labels("observed").set(obs.slo_attainment)
        if self.policy.last_predicted:
            self.metrics.planner_attainment.labels("predicted").set(
                self.policy.last_predicted.get("slo_attainment") or 0.0
            )
        if self.policy.last_plan is not None:
            self.metrics.planner_wanted.labels("prefill").set(self.policy.last_plan[0])
            self.metrics.planner_wanted.labels("decode").set(self.policy.last_plan[1])
        for d in decisions:
            self.metrics.planner_decisions.labels(d.action, d.pool or "none").inc()
            (log.info if d.action != "hold" else log.debug)("planner: %s", decision_text(d))
            try:
                await self.apply(d)
            except Exception:  # noqa: BLE001 - a failed scaling action is logged; serving goes on
                log.exception("planner: applying %s failed", d.action)
        return decisions

    async def apply(self, d: Decision) -> None:
        drain = self.config.planner.drain_timeout_s
        if d.action == "add":
            added = await self.admin.add(d.pool, d.count)
            log.info("planner: added %s", ", ".join(added))
        elif d.action == "remove":
            await self._remove_newest(d.pool, drain)
        elif d.action == "move":
            await self._remove_newest(d.source_pool, drain)
            added = await self.admin.add(d.pool, 1)
            log.info("planner: moved a %s worker to %s (%s)", d.source_pool, d.pool, ", ".join(added))
        elif d.action == "request_resources":
            self._request_resources(d)
        else:
            return
        self.applied.append(d)

    async def _remove_newest(self, pool_name: str, drain_s: float) -> None:
        workers = self.admin.cluster.pool_workers(pool_name)
        if len(workers) <= 1:
            log.warning("planner: not removing the last %s worker", pool_name)
            return
        wid = workers[-1].worker_id
        await self.admin.remove(wid, drain_s)
        self._first_seen.pop(wid, None)
        log.info("planner: removed %s after draining", wid)

    def _request_resources(self, d: Decision) -> None:
        """Ask a Ray autoscaler for the bundles of `count` more workers of the pool (no autoscaler: a no-op)."""
        pool = self.config.prefill if d.pool == "prefill" else self.config.decode
        bundle = {"CPU": pool.num_cpus} if pool.num_cpus else {}
        if pool.gpus:
            bundle["GPU"] = pool.gpus
        try:
            from ray.autoscaler.sdk import request_resources

            have = len(self.admin.cluster.workers)
            request_resources(bundles=[bundle] * (pool.world_size * (have + max(d.count, 1))))
            log.info("planner: asked the Ray autoscaler for %d more %s workers", d.count, d.pool)
        except Exception:  # noqa: BLE001 - no autoscaler (a local Ray): say so, keep serving
            log.warning("planner: the machine is full and no Ray autoscaler took the request", exc_info=True)

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.config.planner.interval_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - the planner must never end the server
                log.exception("planner: an interval failed")


__all__ = ["PlannerLoop", "machine_workers", "meets", "policy_config"]
