"""The online SLA policy: scaling decisions from observations (no clock: each observation carries `now`)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from planner.model import TransferModel
from planner.policy import (
    LoadPredictor,
    Observation,
    PolicyConfig,
    SlaPolicy,
    WorkerLive,
    decision_text,
    speed_factors,
)
from planner.profile import Profile, ServedOverhead
from tests.helpers.planner_profiles import STEP, profile_of


def profile() -> Profile:
    return profile_of(STEP, transfer=TransferModel(0.005, 0.0001, 3), overhead=ServedOverhead(0.01, 0.001, 3))


def config(**kw: Any) -> PolicyConfig:
    base: dict[str, Any] = dict(
        slo={"ttft_ms": 1500, "tpot_ms": 80},
        interval_s=30,
        cooldown_s=90,
        warmup_s=60,
        down_after=3,
        max_workers=8,
        sim_requests=150,
    )
    base.update(kw)
    return PolicyConfig(**base)


def workers(n: int, m: int, age: float = 1000.0, decode_step_s: float = 0.0) -> tuple[WorkerLive, ...]:
    pool = [WorkerLive(f"prefill-{i}", "prefill", age) for i in range(n)]
    pool += [WorkerLive(f"decode-{i}", "decode", age, decode_step_s, 4, 400.0) for i in range(m)]
    return tuple(pool)


def obs(now: float, rate: float, n: int, m: int, attain: float = 1.0, **kw) -> Observation:
    return Observation(
        now=now,
        window_s=30.0,
        arrivals=round(rate * 30),
        mean_input_tokens=256,
        mean_output_tokens=32,
        completed=round(rate * 30),
        slo_attainment=attain,
        ttft_attainment=kw.pop("ttft_attain", attain),
        itl_attainment=kw.pop("itl_attain", attain),
        workers=kw.pop("live", None) or workers(n, m),
        **kw,
    )


class Cluster:
    """Applies decisions to pool sizes (what the admin path does), so a test can run many intervals."""

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.actions: list[str] = []

    def apply(self, decisions) -> None:
        for d in decisions:
            if d.action == "hold":
                continue
            self.actions.append(d.action + ":" + d.pool)
            sign = {"add": 1, "remove": -1}.get(d.action, 0)
            if d.action == "move":
                attr = "n" if d.source_pool == "prefill" else "m"
                setattr(self, attr, getattr(self, attr) - 1)
                sign = 1
            if d.pool == "prefill":
                self.n += sign * (d.count or 1)
            elif d.pool == "decode":
                self.m += sign * (d.count or 1)


def run(policy: SlaPolicy, cluster: Cluster, rates: list[float], t0: float = 0.0) -> float:
    t = t0
    for rate in rates:
        t += 30.0
        cluster.apply(policy.observe(obs(t, rate, cluster.n, cluster.m)))
    return t


def test_the_load_predictor_follows_level_and_trend():
    p = LoadPredictor(0.5, 0.3)
    for i in range(40):
        p.update(i * 10.0, 1.0 + 0.01 * i * 10.0)  # +0.1 req/s every 10 s
    assert p.predict(0) == pytest.approx(1.0 + 0.01 * 390, rel=0.05)
    assert p.predict(60) > p.predict(0) + 0.4


def test_a_step_up_adds_prefill_workers_and_the_decision_says_why():
    policy = SlaPolicy(profile(), config())
    cluster = Cluster(1, 1)
    run(policy, cluster, [0.5] * 3)
    assert cluster.actions == []  # 1P+1D fits half a request per second
    run(policy, cluster, [5.0], t0=90.0)
    assert "add:prefill" in cluster.actions and cluster.n >= 2
    added = next(d for d in policy.decisions if d.action == "add" and d.pool == "prefill")
    assert added.inputs["rate"] == pytest.approx(5.0) and added.predicted["slo_attainment"] >= 0.9
    assert "add" in decision_text(added) and "req/s" in added.reason


@pytest.mark.parametrize("rate", [2.0, 4.0])  # where the model's answer flips between N and N + 1 prefill
def test_no_oscillation_on_a_stationary_load_near_a_boundary(rate):
    policy = SlaPolicy(profile(), config())
    cluster = Cluster(1, 1)
    rng = random.Random(5)
    run(policy, cluster, [rate * (1 + rng.uniform(-0.1, 0.1)) for _ in range(40)])
    wanted = {d.inputs["wanted"]["prefill"] for d in policy.decisions if "wanted" in d.inputs}
    assert len(wanted) == 2  # the load sits on a boundary: the sizing alone would flip
    assert "remove:prefill" not in cluster.actions  # hysteresis and re-prediction: it never flips back
    assert len(cluster.actions) <= 2, cluster.actions


def test_a_step_down_removes_one_worker_at_a_time_after_the_streak_and_cooldown():
    policy = SlaPolicy(profile(), config())
    cluster = Cluster(1, 1)
    t = run(policy, cluster, [5.0] * 4)
    big = cluster.n
    assert big >= 2
    removed_at = []
    for _ in range(30):
        t += 30.0
        before = cluster.n
        cluster.apply(policy.observe(obs(t, 0.3, cluster.n, cluster.m)))
        if cluster.n < before:
            removed_at.append(t)
            assert before - cluster.n == 1
    assert cluster.n == 1 and len(removed_at) == big - 1
    assert all(b - a >= 90.0 for a, b in zip(removed_at, removed_at[1:], strict=False))  # never within cooldown
    first_low = 4 * 30.0 + 30.0
    assert removed_at[0] >= first_low + 2 * 30.0  # after 3 intervals wanting fewer


def test_reactive_step_when_the_targets_are_missed_but_not_while_settling():
    policy = SlaPolicy(profile(), config())
    d = policy.observe(obs(30.0, 0.5, 1, 1, attain=0.5, ttft_attain=0.5, itl_attain=1.0))
    assert [x.action for x in d] == ["add"] and d[0].pool == "prefill" and "TTFT" in d[0].reason
    d = policy.observe(obs(60.0, 0.5, 2, 1, attain=0.5, ttft_attain=0.5, itl_attain=1.0))
    assert [x.action for x in d] == ["hold"]  # within cooldown of the last change: wait for it to show


def test_cold_workers_are_left_out_of_the_live_model():
    prof = profile()
    predicted = STEP.decode_step_s(4, 400.0)
    slow_young = (WorkerLive("decode-9", "decode", 10.0, predicted * 10, 4, 400.0),)
    warm = (WorkerLive("decode-0", "decode", 500.0, predicted * 1.2, 4, 400.0),)
    factors, cold = speed_factors(prof, slow_young + warm, warmup_s=60.0)
    assert cold == 1 and factors["decode"] == pytest.approx(1.2)
    factors, cold = speed_factors(prof, slow_young, warmup_s=60.0)
    assert cold == 1 and factors["decode"] == 1.0  # no warm evidence: the profile as measured
    policy = SlaPolicy(prof, config())
    d = policy.observe(obs(30.0, 0.5, 1, 1, live=workers(1, 1) + slow_young))
    assert d[0].inputs["cold_workers_excluded"] == 1


def test_a_full_machine_moves_a_worker_or_asks_for_resources():
    policy = SlaPolicy(profile(), config(max_workers=3))
    cluster = Cluster(1, 2)
    cluster.apply(policy.observe(obs(30.0, 5.0, 1, 2)))
    assert cluster.actions and cluster.actions[0] in ("move:prefill", "request_resources:prefill")
    moved = [d for d in policy.decisions if d.action == "move"]
    if moved:
        assert moved[0].source_pool == "decode" and cluster.n + cluster.m == 3
    policy = SlaPolicy(profile(), config(max_workers=2))
    d = policy.observe(obs(30.0, 20.0, 1, 1))
    assert any(x.action == "request_resources" for x in d)


def test_holds_while_an_admin_operation_runs_or_a_pool_is_empty():
    policy = SlaPolicy(profile(), config())
    assert policy.observe(obs(30.0, 9.0, 1, 1, pending=1))[0].action == "hold"
    assert policy.observe(obs(60.0, 9.0, 0, 1))[0].action == "hold"


def test_a_warm_workers_own_live_model_sets_its_pools_speed():
    prof = profile()
    twice = tuple(2 * c for c in STEP.coefficients())
    warm = (WorkerLive("decode-0", "decode", 500.0, live_step=twice),)
    young = (WorkerLive("decode-1", "decode", 5.0, live_step=tuple(10 * c for c in STEP.coefficients())),)
    factors, cold = speed_factors(prof, warm + young, warmup_s=60.0)
    assert factors["decode"] == pytest.approx(2.0) and factors["prefill"] == 1.0 and cold == 1


def test_an_unmeetable_target_records_one_resource_request_and_no_hold():
    policy = SlaPolicy(profile(), config(max_workers=2))
    out = policy.observe(obs(30.0, 20.0, 1, 1))
    assert [d.action for d in out] == ["request_resources"]
    assert [d.action for d in policy.decisions] == ["request_resources"]  # what is logged is what is returned


def test_live_steps_slowed_by_busy_neighbours_are_not_counted_as_a_slower_worker():
    """The simulator slows a step by the profile's contention per busy neighbour on top of the refined profile:
    a worker whose live steps ran at the profile's speed plus that contention keeps factor 1.0, and one that is
    itself 1.5x slower gets 1.5, however busy its host was (the double count issue 20's check found)."""
    from planner.model import LiveFit, StepShape

    shared = ServedOverhead(0.01, 0.001, 3, contention={"prefill": 0.1, "decode": 0.3}, workers_per_host=2)
    prof = profile_of(STEP, overhead=shared)
    rng = random.Random(5)

    def live(own: float, busy_share: float) -> WorkerLive:
        fit = LiveFit(warmup_s=0.0, window=400, refit_every=50, min_steps=40)
        for i in range(400):
            shape = StepShape.of([], [rng.choice([128, 256, 512])] * rng.choice([1, 2, 4, 8, 16]))
            busy = 1.0 if i < busy_share * 400 else 0.0  # the share exactly; shapes are drawn independently
            seconds = own * STEP.step_s(shape) * (1 + 0.3 * busy)
            features = (shape.prefill_tokens, shape.attn_pairs, shape.decode_seqs, shape.decode_context)
            fit.observe(features, seconds, i, busy)
        model = fit.model()
        assert model is not None
        return WorkerLive("decode-0", "decode", 500.0, live_step=model.coefficients(), live_busy=fit.busy_neighbours())

    for own in (1.0, 1.5):
        for busy_share in (0.0, 0.5, 1.0):
            w = live(own, busy_share)
            factors, _ = speed_factors(prof, (w,), warmup_s=60.0)
            assert factors["decode"] == pytest.approx(own, rel=0.05), (own, busy_share, w.live_busy)
    crowded = live(1.0, 1.0)
    assert crowded.live_busy == pytest.approx(1.0)
    # a profile that gives every worker its own host simulates no contention: nothing to take out
    alone = profile_of(STEP, overhead=ServedOverhead(0.01, 0.001, 3, contention={"decode": 0.3}))
    assert speed_factors(alone, (crowded,), warmup_s=60.0)[0]["decode"] == pytest.approx(1.3, rel=0.03)
    # without the busy figure (an older worker) the contention stays in the factor, as before
    blind = WorkerLive("decode-0", "decode", 500.0, live_step=crowded.live_step)
    assert speed_factors(prof, (blind,), warmup_s=60.0)[0]["decode"] == pytest.approx(1.3, rel=0.03)
