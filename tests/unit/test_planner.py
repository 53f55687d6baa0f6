"""The planner package: the step model's fit, the simulator against queueing theory, the planner's choices."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter

import msgspec
import pytest

from common.prefill_share import OVERDUE_TARGETS
from planner.cli import main as planner_main
from planner.model import (
    ModelFitError,
    StepModel,
    StepSample,
    StepShape,
    TransferModel,
    attn_pairs,
    fit_step_model,
    fit_transfer_model,
)
from planner.plan import Planner, PlanRequest
from planner.profile import ProfileError, ServedOverhead, load_profile, save_profile
from planner.sim_prompts import SegmentPromptMaker
from planner.sim_worker import BlockCache, SimRequest, block_hashes
from planner.simulator import ClusterSpec, SimError, simulate
from tandem_api.bench.datasets import Dataset, DatasetOptions, Turn, Unit, build_dataset
from tandem_api.bench.metrics import summarize
from tandem_api.bench.runner import LoadConfig
from tests.helpers.planner_profiles import STEP, profile_of

TRUE = STEP


# -- the step model --------------------------------------------------------------------------------------


def synthetic_samples(rng: random.Random, noise: float) -> list[StepSample]:
    samples = []
    for _ in range(60):  # prefill steps, some after a cached prefix
        n, ctx = rng.choice([16, 64, 256, 512, 1024, 2048]), rng.choice([0, 0, 512, 1024])
        shape = StepShape.of([(n, ctx)])
        samples.append(StepSample(shape, TRUE.step_s(shape) * (1 + rng.uniform(-noise, noise))))
    for _ in range(60):  # decode steps
        b, c = rng.choice([1, 2, 4, 8, 16, 32, 64]), rng.choice([128, 512, 1024])
        shape = StepShape.of([], [c] * b)
        samples.append(StepSample(shape, TRUE.step_s(shape) * (1 + rng.uniform(-noise, noise))))
    return samples


def test_fit_recovers_the_coefficients_of_noiseless_steps():
    fit = fit_step_model(synthetic_samples(random.Random(0), 0.0))
    for got, want in zip(fit.coefficients(), TRUE.coefficients(), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert fit.rel_error_p90 < 1e-9 and fit.samples == 120


def test_fit_with_noise_predicts_within_the_noise():
    rng = random.Random(1)
    fit = fit_step_model(synthetic_samples(rng, 0.05))
    assert fit.rel_error_p50 < 0.05
    for shape in (StepShape.of([(512, 0)]), StepShape.of([], [512] * 16), StepShape.of([(256, 0)], [300] * 8)):
        assert fit.step_s(shape) == pytest.approx(TRUE.step_s(shape), rel=0.05)


def test_a_feature_the_samples_never_exercise_gets_zero_not_a_wild_value():
    rng = random.Random(2)
    decode_only = [s for s in synthetic_samples(rng, 0.02) if s.shape.prefill_tokens == 0]
    fit = fit_step_model(decode_only)
    assert fit.per_prefill_token_s == 0 and fit.per_attn_pair_s == 0
    assert all(c >= 0 for c in fit.coefficients())


def test_fit_refuses_too_few_samples_with_a_message():
    with pytest.raises(ModelFitError, match="at least 2"):
        fit_step_model([StepSample(StepShape(16, 136.0, 0, 0), 0.1)])


def test_transfer_fit_and_attention_pairs():
    t = fit_transfer_model([(b, 0.004 + 0.0003 * b) for b in (1, 2, 8, 32, 64)])
    assert t.base_s == pytest.approx(0.004) and t.per_block_s == pytest.approx(0.0003)
    assert attn_pairs(4, 0) == 4 * 2.5 and attn_pairs(1, 100) == 101


# -- the profile file --------------------------------------------------------------------------------------


def test_profile_round_trip_and_clear_errors(tmp_path):
    p = profile_of(TRUE, transfer=TransferModel(0.01, 0.001, 3), overhead=ServedOverhead(0.02, 0.001, 5))
    path = tmp_path / "profile.json"
    save_profile(p, path)
    back = load_profile(path)
    assert back.worker(pool="decode").step == TRUE and back.transfer.samples == 3
    with pytest.raises(ProfileError, match="no shape"):
        back.worker("tp9-pp1-bs16-float32-cpu-t1")
    (tmp_path / "bad.json").write_text(json.dumps({"model": "m", "workers": [], "version": 99}))
    with pytest.raises(ProfileError, match="version 99"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="No such file"):
        load_profile(tmp_path / "missing.json")


# -- the block cache ---------------------------------------------------------------------------------------


def test_block_cache_shares_equal_prefixes_and_evicts_lru_only_when_needed():
    cache = BlockCache(num_blocks=4, block_size=4)
    a = SimRequest(0, 0.0, ((1, 8), (2, 4)), 12, 1)
    b = SimRequest(1, 0.0, ((1, 8), (3, 4)), 12, 1)
    assert cache.allocate(a, 12)
    cache.commit(a, 12)
    cache.release(a)
    assert cache.used == 0 and len(cache.lru) == 3
    hashes = b.hashes_upto(2, 4)
    assert cache.cached_prefix(hashes) == 2  # the shared 8 tokens
    cache.take_prefix(b, hashes)
    assert cache.allocate(b, 12) and cache.blocks_of(b) == 3
    assert len(cache.lru) == 1  # a's third block: still cached, nobody needed its room
    c = SimRequest(2, 0.0, ((4, 4),), 4, 1)
    assert cache.allocate(c, 4) and len(cache.lru) == 0  # now evicted for c
    assert not cache.allocate(b, 24)  # more than the pool holds: refused, nothing changed
    assert cache.blocks_of(b) == 3 and cache.used == 4
    cache.release(b)
    cache.release(c)
    assert cache.used == 0 and len(cache.lru) == 2  # b's two hashed blocks stay cached; private ones are freed
    assert block_hashes(((1, 8),), 4, 2) != block_hashes(((1, 4), (5, 4)), 4, 2)


# -- the simulator against queueing theory -------------------------------------------------------------------


def single_server(
    service: StepModel, prompts: list[int], rate: float, seats: int = 1, join: int | None = None
) -> list[float]:
    """One aggregated worker serving one request at a time (max_num_seqs 1, or prompts served oldest first:
    `join` 0), one output token each: a FIFO single-server queue whose service time is the prompt's one
    prefill step."""
    maker = SegmentPromptMaker()
    units = (Unit(i, [Turn(maker.fresh(n), 1)]) for i, n in enumerate(prompts))
    dataset = Dataset("exp", {}, units, size=len(prompts))
    p = profile_of(service, max_num_seqs=seats, budget=1 << 20, num_blocks=1 << 20, join_tokens=join)
    result = simulate(p, ClusterSpec(mode="aggregated", prefill=1), dataset, LoadConfig(rate=rate, seed=3))
    return [r.ttft_s or 0.0 for r in result.records]


def test_simulator_matches_m_m_1():
    rng = random.Random(7)
    per_token = 1e-2
    mean_tokens = 100  # service ~ Exp(mean 1 s), in whole tokens
    prompts = [max(1, round(rng.expovariate(1 / mean_tokens))) for _ in range(20000)]
    lam = 0.7
    times = single_server(StepModel(per_prefill_token_s=per_token), prompts, lam)
    mu = 1 / (per_token * statistics.fmean(prompts))
    assert statistics.fmean(times[1000:]) == pytest.approx(1 / (mu - lam), rel=0.08)


def test_prompts_served_oldest_first_are_a_fifo_queue_and_a_filled_budget_is_not():
    """With 64 seats and TTFT first (prefill_join_tokens 0, the served CPU default) the worker is M/M/1
    again; filling the budget with every waiting prompt makes each wait for its whole batch."""
    rng = random.Random(7)
    per_token, lam = 1e-2, 0.7
    prompts = [max(1, round(rng.expovariate(1 / 100))) for _ in range(20000)]
    mu = 1 / (per_token * statistics.fmean(prompts))
    serial = single_server(StepModel(per_prefill_token_s=per_token), prompts, lam, seats=64, join=0)
    assert statistics.fmean(serial[1000:]) == pytest.approx(1 / (mu - lam), rel=0.08)
    filled = single_server(StepModel(per_prefill_token_s=per_token), prompts, lam, seats=64)
    assert statistics.fmean(filled[1000:]) > 1.2 * statistics.fmean(serial[1000:])


def test_slo_triage_keeps_more_requests_within_the_ttft_target_under_overload():
    """40 requests at 1.25x one worker's capacity with a 3 s TTFT target: first come, first served lets the
    backlog make almost every request miss; serving first those that can still make it keeps about half
    within it. Every request completes, none later than OVERDUE_TARGETS targets plus a little."""
    maker = SegmentPromptMaker()
    n = 40
    p = profile_of(StepModel(per_prefill_token_s=1e-2), budget=4096, join_tokens=0)

    def run(triage: bool) -> list[float]:
        units = (Unit(i, [Turn(maker.fresh(100), 1)]) for i in range(n))
        spec = ClusterSpec(mode="aggregated", prefill=1, slo_ttft_s=3.0, slo_triage=triage)
        load = LoadConfig(rate=1.25, seed=4, num_requests=n)
        records = simulate(p, spec, Dataset("over", {}, units, size=n), load).records
        return [r.ttft_s for r in records if r.ttft_s is not None]  # every request completes: n of them

    fcfs, triage = run(False), run(True)
    assert len(fcfs) == len(triage) == n
    assert sum(t <= 3.0 for t in fcfs) / n < 0.15
    assert sum(t <= 3.0 for t in triage) / n > 0.4
    assert max(triage) <= (OVERDUE_TARGETS + 2) * 3.0


@pytest.mark.parametrize("join", [None, 32])
def test_a_prompt_ending_beside_a_one_token_reply_is_handed_off_once(join):
    """A one-token reply ends its lease inside the step's end and kicks P again before the other prompt that
    ended in the same step is handed off; that prompt must not be scheduled again as a 1-token row (it once
    was, with TTFT first: a second token 1, a second hand-off and the request finished twice)."""
    maker = SegmentPromptMaker()
    # the first prompt keeps P busy while the other two arrive; a filled budget then prefills both in one step
    turns = [Turn(maker.fresh(1000), 2), Turn(maker.fresh(64), 1), Turn(maker.fresh(40), 3)]
    units = iter([Unit(i, [t]) for i, t in enumerate(turns)])
    p = profile_of(TRUE, join_tokens=join)
    records = simulate(p, ClusterSpec(), Dataset("three", {}, units, size=3), LoadConfig(rate=math.inf)).records
    assert [(r.status, r.output_tokens) for r in records] == [("OK", 2), ("OK", 1), ("OK", 3)]


def test_simulator_matches_m_d_1():
    service = StepModel(base_s=0.5)
    rho = 0.6
    times = single_server(service, [64] * 20000, rho / 0.5)
    expected = 0.5 + rho * 0.5 / (2 * (1 - rho))  # Pollaczek-Khinchine: S + rho S / (2 (1 - rho))
    assert statistics.fmean(times[1000:]) == pytest.approx(expected, rel=0.05)


def test_light_load_latency_is_the_sum_of_its_steps():
    p = profile_of(TRUE, transfer=TransferModel(0.01, 0.0), overhead=ServedOverhead(0.005, 0.0))
    maker = SegmentPromptMaker()
    dataset = Dataset("one", {}, iter([Unit(0, [Turn(maker.fresh(512), 4)])]), size=1)
    r = simulate(p, ClusterSpec(), dataset, LoadConfig(rate=1.0)).records[0]
    prefill = TRUE.prefill_s(512)
    assert r.ttft_s == pytest.approx(prefill + 0.005)  # P's step and the served overhead: token 1 comes from P
    itl = [b - a for (a, _), (b, _) in zip(r.chunks, r.chunks[1:], strict=False)]
    assert itl[0] == pytest.approx(0.01 + TRUE.decode_step_s(1, 513) - 0.005, rel=1e-6)  # the pull, D's first step
    assert itl[1] == pytest.approx(TRUE.step_s(StepShape.of([], [514])))
    assert r.route == "remote" and r.n_output == 4


def test_shared_prefixes_hit_the_cache_and_kv_routing_keeps_groups_together():
    p = profile_of(TRUE)
    opts = DatasetOptions(input_len=64, output_len=8, num_groups=4, prefix_len=512, num_requests=80)
    base = {}
    for policy in ("kv", "round-robin"):
        d = build_dataset("shared-prefix", opts, SegmentPromptMaker(), 0)
        spec = ClusterSpec(prefill=4, decode=2, policy=policy)
        res = simulate(p, spec, d, LoadConfig(rate=2.0, num_requests=80))
        s = summarize(res.records, res.duration_s, {})
        assert s["completed"] == 80
        base[policy] = s["cached_tokens"]
        if policy == "kv":
            homes: dict[int | None, Counter[str]] = {}
            for r in res.records:
                homes.setdefault(r.prefix_group, Counter())[r.prefill_worker] += 1
            # most of a group's requests prefill where its prefix is cached (a busy home spills over)
            assert sum(h.most_common(1)[0][1] for h in homes.values()) >= 0.8 * 80
    assert base["kv"] > base["round-robin"] > 0


def test_preemption_when_the_decode_cache_is_too_small_and_nothing_is_lost():
    p = profile_of(TRUE, num_blocks=40, budget=512)  # 640 tokens of KV per worker
    d = build_dataset("random", DatasetOptions(input_len=200, output_len=100, spread=0), SegmentPromptMaker(), 0)
    res = simulate(p, ClusterSpec(mode="aggregated", prefill=1), d, LoadConfig(rate=math.inf, num_requests=12))
    assert all(r.ok and r.n_output == 100 for r in res.records)
    assert res.workers[0]["preemptions"] > 0


def test_multi_turn_turns_follow_their_replies_and_reuse_their_cache():
    d = build_dataset(
        "multi-turn", DatasetOptions(input_len=64, output_len=16, turns=3, spread=0), SegmentPromptMaker(), 0
    )
    res = simulate(profile_of(TRUE), ClusterSpec(mode="aggregated", prefill=1), d, LoadConfig(rate=0.5, num_requests=9))
    by_conv = {}
    for r in res.records:
        by_conv.setdefault(r.conversation, []).append(r)
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.send_s == pytest.approx(prev.chunks[-1][0])
            assert nxt.cached_tokens >= (prev.input_tokens + 16 - 1) // 16 * 16 - 16
            assert nxt.input_tokens == prev.input_tokens + 16 + 64


def test_bad_cluster_specs_are_refused():
    with pytest.raises(SimError, match="--mode"):
        ClusterSpec(mode="split")
    with pytest.raises(SimError, match="at least one worker"):
        ClusterSpec(prefill=0)
    with pytest.raises(SimError, match="prefill pool"):
        d = build_dataset("random", DatasetOptions(), SegmentPromptMaker(), 0)
        simulate(profile_of(TRUE), ClusterSpec(prefill_shape="nope"), d, LoadConfig(rate=1.0, num_requests=2))


def burst(n: int, prompt: int, output: int) -> Dataset:
    maker = SegmentPromptMaker()
    return Dataset("burst", {}, iter([Unit(i, [Turn(maker.fresh(prompt), output)]) for i in range(n)]), size=n)


def test_simulated_placement_by_slo_rescues_a_request_queued_on_p_and_keeps_the_intent_otherwise():
    """As router/placement.py: remote while predicted to meet the targets; local on an idle D when P's queue
    would make remote miss the TTFT target; remote again when nothing is predicted to meet it."""
    p = profile_of(TRUE)
    cfg = LoadConfig(rate=math.inf, num_requests=4)
    slo = ClusterSpec(slo_ttft_s=4.0, slo_tpot_s=0.2)
    placed = simulate(p, slo, burst(4, 2000, 8), cfg)
    fixed = simulate(p, ClusterSpec(), burst(4, 2000, 8), cfg)
    # a 2000-token prefill is 2.46 s: the first fits 0.8 x 4 s on P, the second would wait behind it on P
    # (4.9 s) and fits on the idle D; the third fits nowhere (P or D behind 2000 queued tokens): remote
    assert [r.route for r in placed.records] == ["remote", "local", "remote", "remote"]
    assert [r.route for r in fixed.records] == ["remote"] * 4
    assert placed.records[1].decode_worker == "decode-0" and placed.records[1].prefill_worker == ""
    assert placed.records[1].ttft_s < fixed.records[1].ttft_s
    assert all(r.ok and r.n_output == 8 for r in placed.records)
    assert not ClusterSpec(slo_ttft_s=4.0, conditional_prefill_threshold=64).slo_placement  # a threshold: fixed
    assert not ClusterSpec(mode="aggregated", slo_ttft_s=4.0).slo_placement
    with pytest.raises(SimError, match="SLO placement targets must be >= 0"):
        ClusterSpec(slo_tpot_s=-1.0)


def test_simulated_placement_runs_whole_requests_on_p_when_decode_would_miss_the_tpot_target():
    step = StepModel(base_s=0.02, per_prefill_token_s=0.0012, per_decode_seq_s=0.01)  # 15 rows: 170 ms > 160 ms
    p = profile_of(step)
    res = simulate(p, ClusterSpec(slo_ttft_s=4.0, slo_tpot_s=0.2), burst(20, 64, 30), LoadConfig(rate=math.inf))
    routes = Counter(r.route for r in res.records)
    assert routes["whole"] > 0 and routes["remote"] >= 14, routes
    whole = [r for r in res.records if r.route == "whole"]
    assert all(r.decode_worker == "prefill-0" and r.prefill_worker == "" for r in whole)
    assert all(r.ok and r.n_output == 30 for r in res.records)


SHARING = ServedOverhead(workers_per_host=2, widened_prefill_speedup=2.0, widen_threads=2, lend_tpot_s=0.2)


def timed(prompts: list[tuple[int, int, float]]) -> Dataset:
    """(prompt tokens, output tokens, arrival s) per request."""
    maker = SegmentPromptMaker()
    units = [Unit(i, [Turn(maker.fresh(n), out)]) for i, (n, out, _) in enumerate(prompts)]
    return Dataset("timed", {}, iter(units), timestamps=[t for _, _, t in prompts], size=len(units))


def test_the_simulated_prefill_widens_onto_an_idle_decode_core():
    one = [(2000, 4, 0.0)]
    alone = simulate(profile_of(TRUE), ClusterSpec(), timed(one), LoadConfig(rate=None)).records[0]
    shared = simulate(profile_of(TRUE, overhead=SHARING), ClusterSpec(), timed(one), LoadConfig(rate=None)).records[0]
    assert alone.ttft_s == pytest.approx(TRUE.prefill_s(2000))
    assert shared.ttft_s == pytest.approx(TRUE.prefill_s(2000) / 2)


@pytest.mark.parametrize("lend_tpot_s, lends", [(0.2, True), (0.02, False)])
def test_a_simulated_decode_worker_lends_only_what_its_requests_can_spare(lend_tpot_s: float, lends: bool):
    """A request decoding on D when a long prompt arrives: D pauses for P's widened step while its requests
    keep their TPOT target (LendBudget), else P prefills on its own core beside D's steps."""
    overhead = msgspec.structs.replace(SHARING, lend_tpot_s=lend_tpot_s)
    res = simulate(
        profile_of(TRUE, overhead=overhead),
        ClusterSpec(),
        timed([(64, 300, 0.0), (2000, 4, 5.0)]),
        LoadConfig(rate=None),
    )
    decoding, long = res.records
    gaps = [b - a for (a, _), (b, _) in zip(decoding.chunks, decoding.chunks[1:], strict=False)]
    d_stats = next(w for w in res.workers if w["role"] == "decode")
    narrow = TRUE.prefill_s(2000)
    assert long.ttft_s is not None
    if lends:
        assert long.ttft_s < 0.6 * narrow  # widened, after at most one of D's steps
        assert max(gaps) == pytest.approx(long.ttft_s, rel=0.1)  # D stood still while P ran on both cores
        assert d_stats["lent_s"] > 0.9 * narrow / 2
    else:  # 20 ms per token, below its step: no slack to lend: D keeps stepping, P prefills alone
        assert long.ttft_s >= narrow
        assert max(gaps) < 0.1 and d_stats["lent_s"] == 0.0
    assert decoding.ok and decoding.n_output == 300 and long.ok


def test_the_simulators_core_sharing_constant_is_the_workers():
    """The simulator reads LendBudget and its constants from worker_core/core_share.py; this one lives beside the
    engine loop, which loads torch."""
    from planner import sim_cluster
    from worker_core import engine_loop

    assert sim_cluster.WIDEN_MIN_PREFILL_TOKENS == engine_loop.WIDEN_MIN_PREFILL_TOKENS


# -- the planner -----------------------------------------------------------------------------------------------


def plan_for(rate: float, slo: dict[str, float], **kw) -> tuple[Planner, object]:
    req = PlanRequest(
        rate=rate,
        slo=slo,
        options=DatasetOptions(input_len=256, output_len=32, spread=0.3),
        num_requests=150,
        max_workers=16,
        **kw,
    )
    planner = Planner(profile_of(TRUE), req)
    return planner, planner.run()


def test_plan_meets_the_slo_and_is_minimal_in_each_pool():
    planner, plan = plan_for(3.0, {"ttft_ms": 1500, "tpot_ms": 60})
    best = plan.best
    assert best is not None and best.attainment >= 0.9
    spec = best.spec
    if spec.mode == "disaggregated":
        for n, m in ((spec.prefill - 1, spec.decode), (spec.prefill, spec.decode - 1)):
            if n >= 1 and m >= 1:
                smaller = planner.evaluate(
                    ClusterSpec(prefill=n, decode=m, prefill_shape=spec.prefill_shape, decode_shape=spec.decode_shape)
                )
                assert smaller.attainment < 0.9
    else:
        if spec.prefill > 1:
            smaller = planner.evaluate(
                ClusterSpec(mode="aggregated", prefill=spec.prefill - 1, prefill_shape=spec.prefill_shape)
            )
            assert smaller.attainment < 0.9
    assert all(best.cost <= c.cost for c in plan.per_family)


def test_plan_and_the_online_policy_simulate_the_routers_placement():
    """A served disaggregated cluster places by SLO unless told otherwise: the clusters a plan simulates do
    too, with the router's targets (not the plan's), and the online policy takes them from the config."""
    from deploy.config import ServeConfig, with_overrides
    from deploy.planner_loop import placement_slo_s

    _, plan = plan_for(3.0, {"ttft_ms": 1500, "tpot_ms": 60}, placement_slo_s=(4.0, 0.2))
    disagg = [c.spec for c in plan.tried if c.spec.mode == "disaggregated"]
    assert disagg and all(s.slo_placement and (s.slo_ttft_s, s.slo_tpot_s) == (4.0, 0.2) for s in disagg)
    _, fixed = plan_for(3.0, {"ttft_ms": 1500, "tpot_ms": 60})
    assert not any(c.spec.slo_placement for c in fixed.tried)
    cfg = ServeConfig()
    assert placement_slo_s(cfg) == (cfg.router.slo_ttft_ms / 1000, cfg.router.slo_itl_ms / 1000) != (0.0, 0.0)
    assert placement_slo_s(with_overrides(cfg, **{"router.conditional_prefill_threshold": 64})) == (0.0, 0.0)
    assert placement_slo_s(with_overrides(cfg, mode="aggregated")) == (0.0, 0.0)


def test_plan_grows_with_the_rate_and_reports_an_impossible_target():
    _, light = plan_for(0.5, {"ttft_ms": 3000, "tpot_ms": 100})
    _, heavy = plan_for(6.0, {"ttft_ms": 3000, "tpot_ms": 100})
    assert light.best is not None and heavy.best is not None
    assert heavy.best.cost > light.best.cost
    _, impossible = plan_for(1.0, {"ttft_ms": 10})  # a 256-token prefill alone takes > 300 ms
    assert impossible.best is None and "no cluster" in impossible.note


def test_plan_cli_and_simulate_cli(tmp_path, capsys):
    path = tmp_path / "p.json"
    save_profile(profile_of(TRUE, transfer=TransferModel(0.005, 0.0001, 2)), path)
    out = tmp_path / "sim"
    rc = planner_main(
        [
            "simulate",
            "--profile",
            str(path),
            "--request-rate",
            "0.5,1",
            "--num-requests",
            "30",
            "--input-len",
            "128",
            "--output-len",
            "16",
            "--slo",
            "ttft_ms=2000",
            "--output",
            str(out),
            "--no-plots",
        ]
    )
    assert rc == 0
    runs = json.loads((out / "summary.json").read_text())
    assert [r["metadata"]["request_rate"] for r in runs] == [0.5, 1.0]
    assert runs[0]["completed"] == 30 and runs[0]["metadata"]["target"]["kind"] == "simulator"
    assert (out / "requests.jsonl").read_text().count("\n") == 60
    rc = planner_main(
        [
            "plan",
            "--profile",
            str(path),
            "--request-rate",
            "1",
            "--slo",
            "ttft_ms=2000,tpot_ms=80",
            "--input-len",
            "128",
            "--output-len",
            "16",
            "--num-requests",
            "60",
            "--max-workers",
            "6",
            "--output",
            str(tmp_path / "plan"),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert doc["recommended"]["slo_attainment"] >= 0.9
    assert "recommended:" in capsys.readouterr().out
    assert planner_main(["plan", "--profile", str(path), "--request-rate", "1", "--slo", "ttft=5"]) == 2
    assert planner_main(["simulate", "--profile", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'ttft'" in err and "none.json" in err


@pytest.mark.parametrize("policy", ["kv", "least-loaded", "round-robin"])
def test_decode_choice_counts_requests_still_in_prefill(policy):
    """A burst routed while its prompts are still prefilling spreads over the decode pool (the router books
    KV and requests at routing time), instead of piling onto the worker that looked idle."""
    d = build_dataset("random", DatasetOptions(input_len=256, output_len=16), SegmentPromptMaker(), 0)
    res = simulate(
        profile_of(TRUE), ClusterSpec(prefill=4, decode=4, policy=policy), d, LoadConfig(rate=math.inf, num_requests=80)
    )
    share = Counter(r.decode_worker for r in res.records)
    assert len(share) == 4 and max(share.values()) <= 30, share


def test_contention_slows_a_step_only_while_its_host_neighbour_is_busy():
    slow = {"decode": 0.5}
    over = ServedOverhead(0.0, 0.0, 1, contention=slow, workers_per_host=2)
    maker = SegmentPromptMaker()
    units = [Unit(0, [Turn(maker.fresh(64), 200)]), Unit(1, [Turn(maker.fresh(2000), 2)])]
    timeline = {}
    for name, overhead in (("shared", over), ("alone", ServedOverhead(0.0, 0.0, 1))):
        p = profile_of(TRUE, overhead=overhead, transfer=TransferModel(0.0, 0.0))
        ds = Dataset("two", {}, iter(list(units)), size=2)
        res = simulate(p, ClusterSpec(), ds, LoadConfig(rate=math.inf))
        timeline[name] = res.records
    a_alone, b = timeline["alone"][0], timeline["shared"][1]
    a_shared = timeline["shared"][0]
    prefill_b = (b.send_s or 0.0, b.chunks[0][0])  # B's prompt occupies P over this window
    step = TRUE.decode_step_s(1, 64 + 5)
    gaps_alone = [t1 - t0 for (t0, _), (t1, _) in zip(a_alone.chunks, a_alone.chunks[1:], strict=False)]
    gaps_shared = [(t0, t1 - t0) for (t0, _), (t1, _) in zip(a_shared.chunks, a_shared.chunks[1:], strict=False)]
    inside = [g for t0, g in gaps_shared[2:] if prefill_b[0] + 0.2 < t0 < prefill_b[1] - 0.2]
    assert inside and all(g == pytest.approx(1.5 * gaps_alone[5], rel=0.05) for g in inside)
    assert gaps_alone[5] == pytest.approx(step, rel=0.05)
    after = [g for t0, g in gaps_shared if t0 > prefill_b[1] + 0.2]
    assert after and all(g < 1.1 * gaps_alone[5] * 1.05 for g in after)  # B has left P: full speed again


def test_the_served_paths_decode_overhead_is_paid_once_per_step_not_per_row():
    """ServedOverhead.per_token_s is measured at batch 1 (served ITL beyond the step model). The served path
    adds it per step: 8-row steps served run as fast as offline ones (docs/BENCHMARKS.md, served_overhead.py
    --batch 8); charged per row, a few noisy milliseconds became tens per 8-row step."""
    base, per_row, extra = 0.010, 0.002, 0.004
    step = StepModel(base_s=base, per_prefill_token_s=1e-4, per_decode_seq_s=per_row)  # exact plateaus per batch
    p = profile_of(step, overhead=ServedOverhead(0.0, extra, 1), transfer=TransferModel(0.0, 0.0))
    maker = SegmentPromptMaker()
    units = [Unit(i, [Turn(maker.fresh(64), 40)]) for i in range(8)]
    res = simulate(p, ClusterSpec(), Dataset("eight", {}, iter(units), size=8), LoadConfig(rate=math.inf))
    rows = set()
    for r in res.records:  # each gap after the first (the pull) is one decode step of D's batch at the time
        for (a, _), (b, _) in zip(r.chunks[1:], r.chunks[2:], strict=False):
            rows.add((b - a - base - extra) / per_row)
    assert 8 in {round(n) for n in rows} <= set(range(1, 9))  # batches of up to 8 rows, each paying `extra` once
    assert all(n == pytest.approx(round(n), abs=1e-6) for n in rows)


def test_a_large_plan_is_simulated_as_a_proportional_slice():
    req = PlanRequest(
        rate=40.0,
        slo={"ttft_ms": 2000, "tpot_ms": 100},
        options=DatasetOptions(input_len=256, output_len=32, spread=0.3),
        num_requests=400,
        max_workers=400,
        modes=("disaggregated",),
        slice_workers=8,
    )
    plan = Planner(profile_of(TRUE), req).run()
    best = plan.best
    assert best is not None and best.scale > 1
    full = best.full
    assert full.prefill >= best.spec.prefill * best.scale - 1e-6 and full.decode >= best.spec.decode * best.scale - 1e-6
    row = best.row()
    assert row["simulated_slice"] == best.spec.describe() and row["goodput"] == pytest.approx(
        best.summary["goodput"] * best.scale
    )
    whole = Planner(profile_of(TRUE), PlanRequest(**{**req.__dict__, "slice_workers": 0})).run().best
    assert whole is not None
    unit = math.ceil(best.scale)  # one slice worker stands for `scale` workers: the answer's granularity
    assert whole.spec.prefill - unit <= full.prefill <= whole.spec.prefill + 2 * unit
    assert whole.spec.decode - unit <= full.decode <= whole.spec.decode + 2 * unit


def test_live_fit_leaves_out_the_warm_up_and_refits_from_live_steps():
    from planner.model import LiveFit

    live = LiveFit(warmup_s=60.0, window=200, refit_every=50, min_steps=40)
    rng = random.Random(3)
    t = 0.0
    slow = StepModel(*(c * 3 for c in TRUE.coefficients()))  # a cold worker's first minute: 3x slower
    for _ in range(100):
        shape = StepShape.of([], [rng.choice([128, 512])] * rng.choice([1, 4, 16]))
        live.observe(
            (shape.prefill_tokens, shape.attn_pairs, shape.decode_seqs, shape.decode_context), slow.step_s(shape), t
        )
        t += 0.5
    assert live.model() is None and live.excluded > 0  # all of it in the warm-up: nothing fitted yet
    for s in synthetic_samples(rng, 0.0) * 2:
        live.observe(
            (s.shape.prefill_tokens, s.shape.attn_pairs, s.shape.decode_seqs, s.shape.decode_context), s.seconds, t
        )
        t += 0.5
    model = live.model()
    assert model is not None
    for got, want in zip(model.coefficients(), TRUE.coefficients(), strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)  # the warm-up's slow steps are not in it
