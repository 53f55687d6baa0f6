"""KV-aware routing (router/routing.py): golden costs, selection, prefix affinity, burst balance,
load bookkeeping, conditional disaggregation, load-blind policies and drain.

Pure: fake workers (routing makes no calls), no Ray, no torch, seeded random generators.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import msgspec
import pytest

from common.block_hash import hash_full_blocks
from common.contract import WorkerStatus
from router.costs import (
    CostWeights,
    DecodeTerms,
    PrefillTerms,
    decode_cost,
    decode_formula,
    prefill_cost,
    prefill_formula,
    rendezvous,
    select,
)
from router.errors import NoHealthyWorkerError
from router.pools import Decision, Policy, WorkerPool
from router.routing import KVDecision, PoolIndex, Route, Router, RoutingConfig
from tests.helpers.fake_workers import FakeWorker

BS = 16


def status(wid: str, total: int, free: int, max_num_seqs: int = 8) -> WorkerStatus:
    return WorkerStatus(
        worker_id=wid,
        role="decode",
        health="SERVING",
        kv_blocks_total=total,
        kv_blocks_free=free,
        running=0,
        waiting=0,
        leased=0,
        node_id="n",
        device="cpu",
        block_size=BS,
        dtype="float32",
        max_num_seqs=max_num_seqs,
    )


def make_router(
    n_prefill: int = 2, n_decode: int = 1, policy: str = "kv", seed: int = 0, aggregated: bool = False, **cfg: Any
) -> Router:
    pool_policy = "least_loaded" if policy == "kv" else policy
    decode = WorkerPool("decode", [FakeWorker(f"d{i}") for i in range(n_decode)], pool_policy, block_size=BS)
    prefill = (
        None
        if aggregated
        else WorkerPool("prefill", [FakeWorker(f"p{i}") for i in range(n_prefill)], pool_policy, block_size=BS)
    )
    return Router(decode, prefill, RoutingConfig(policy=Policy.parse(policy), **cfg), random.Random(seed))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49_000) for _ in range(n)]


def formula_of(decision: KVDecision | Decision | None, worker_id: str) -> str:
    assert isinstance(decision, KVDecision), decision
    (f,) = [f for f in decision.formulas if f.startswith(f"{worker_id}: ")]
    return f


def prefill_ix(r: Router) -> PoolIndex:
    """The prefill pool's index of a disaggregated router."""
    assert r.prefill is not None, "an aggregated router has no prefill pool"
    return r.prefill


def prefill_id(route: Route) -> str:
    """The prefill worker of a remote route."""
    assert route.prefill is not None, f"{route.request_id} was routed for local prefill: {route.reason}"
    return route.prefill.worker_id


def prefill_loads(r: Router) -> dict[str, int]:
    return {s.worker_id: s.prefill_tokens for s in prefill_ix(r).pool.slots}


# ---- 1. prefill cost --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "terms, weights, cost, formula",
    [
        (
            PrefillTerms("p0", 100, 0, 16, 0),
            CostWeights(),
            100,
            "p0: 1*uncached 100 (100 - 0 blocks cached) + 1*queued 0 = 100",
        ),
        (
            PrefillTerms("p1", 100, 4, 16, 250),
            CostWeights(),
            286,
            "p1: 1*uncached 36 (100 - 4 blocks cached) + 1*queued 250 = 286",
        ),
        # full-cache hit: the last prompt token is always computed, so uncached is 1, never 0
        (
            PrefillTerms("p2", 64, 4, 16, 10),
            CostWeights(),
            11,
            "p2: 1*uncached 1 (64 - 4 blocks cached) + 1*queued 10 = 11",
        ),
        # more cached blocks than the prompt spans (a longer cached sequence): still 1
        (PrefillTerms("p3", 40, 7, 8, 0), CostWeights(), 1, "p3: 1*uncached 1 (40 - 7 blocks cached) + 1*queued 0 = 1"),
        (
            PrefillTerms("p4", 100, 2, 16, 30),
            CostWeights(uncached=0.5, queued=2),
            94,
            "p4: 0.5*uncached 68 (100 - 2 blocks cached) + 2*queued 30 = 94",
        ),
        (
            PrefillTerms("p5", 7, 0, 16, 1),
            CostWeights(uncached=1.5, queued=0.25),
            10.75,
            "p5: 1.5*uncached 7 (7 - 0 blocks cached) + 0.25*queued 1 = 10.75",
        ),
    ],
)
def test_prefill_cost_golden(terms: PrefillTerms, weights: CostWeights, cost: float, formula: str) -> None:
    assert prefill_cost(terms, weights) == cost
    assert prefill_formula(terms, weights) == formula


def test_uncached_tokens_never_zero() -> None:
    for n in range(1, 70):
        for cached in range(0, 10):
            u = PrefillTerms("p", n, cached, 8, 0).uncached_tokens
            assert u == max(1, n - cached * 8), (n, cached)


# ---- 2. decode cost ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "terms, weights, cost, formula",
    [
        # need = ceil(100/16) - 2 = 5; kv = (24 + 3 + 5) / 64 = 0.5; seqs = 5/10
        (
            DecodeTerms(
                "d0", 100, 2, 16, total_blocks=64, free_blocks=40, in_flight_blocks=3, running=5, max_num_seqs=10
            ),
            CostWeights(),
            1.0,
            "d0: 1*kv (used 24 + in flight 3 + need 5)/64 + 1*seqs 5/10 = 1",
        ),
        (
            DecodeTerms(
                "d1", 100, 2, 16, total_blocks=64, free_blocks=40, in_flight_blocks=3, running=5, max_num_seqs=10
            ),
            CostWeights(kv=2, seqs=0.5),
            1.25,
            "d1: 2*kv (used 24 + in flight 3 + need 5)/64 + 0.5*seqs 5/10 = 1.25",
        ),
        # not reported yet (total 0): the KV term is 0 whatever the need; max_num_seqs 0: the seqs term is 0
        (
            DecodeTerms("d2", 100, 0, 16, total_blocks=0, free_blocks=0, in_flight_blocks=9, running=3, max_num_seqs=0),
            CostWeights(),
            0.0,
            "d2: 1*kv (used 0 + in flight 9 + need 7)/0 + 1*seqs 3/0 = 0",
        ),
        # reported KV, max_num_seqs 0: only the KV term; (10 + 0 + 0)/30; prefix covers the whole prompt
        (
            DecodeTerms(
                "d3", 32, 2, 16, total_blocks=30, free_blocks=20, in_flight_blocks=0, running=4, max_num_seqs=0
            ),
            CostWeights(),
            1 / 3,
            "d3: 1*kv (used 10 + in flight 0 + need 0)/30 + 1*seqs 4/0 = 0.3333",
        ),
    ],
)
def test_decode_cost_golden(terms: DecodeTerms, weights: CostWeights, cost: float, formula: str) -> None:
    assert decode_cost(terms, weights) == pytest.approx(cost, abs=1e-12)
    assert decode_formula(terms, weights) == formula


def test_decode_terms_come_from_the_slot_status_and_bookings() -> None:
    r = make_router(n_decode=2)
    pool = r.decode.pool
    pool.set_status("d0", status("d0", total=100, free=20))  # 80 used
    pool.set_status("d1", status("d1", total=100, free=70))  # 30 used
    prompt = list(range(100, 164))  # 4 blocks
    route = r.route("a", prompt)
    assert route.decode.worker_id == "d1"
    assert (
        formula_of(route.decode_decision, "d0") == "d0: 1*kv (used 80 + in flight 0 + need 4)/100 + 1*seqs 0/8 = 0.84"
    )
    assert (
        formula_of(route.decode_decision, "d1") == "d1: 1*kv (used 30 + in flight 0 + need 4)/100 + 1*seqs 0/8 = 0.34"
    )
    # the KV in flight to d1 (remote prefill) and a running request count before d1 reports again
    assert pool.slot("d1").kv_blocks_in == 4
    with pool.track("d1"):
        route = r.route("b", list(range(200, 264)))
        assert (
            formula_of(route.decode_decision, "d1")
            == "d1: 1*kv (used 30 + in flight 4 + need 4)/100 + 1*seqs 1/8 = 0.505"
        )


# ---- 3. select --------------------------------------------------------------------------------------------------


def test_select_temperature_zero_is_argmin() -> None:
    rng = random.Random(0)
    assert select([3.0, 1.0, 2.0], 0.0, rng) == 1
    assert select([5.0], 0.0, rng) == 0
    assert select([2.0, 2.5, 0.5, 0.75], 0.0, rng) == 2


def test_select_ties_go_to_the_injected_rng() -> None:
    costs = [1.0, 5.0, 1.0, 1.0]
    picks = {seed: select(costs, 0.0, random.Random(seed)) for seed in range(30)}
    assert set(picks.values()) == {0, 2, 3}  # different seeds pick different tied candidates, never the costly one
    for seed, pick in picks.items():  # the same seed always picks the same
        assert select(costs, 0.0, random.Random(seed)) == pick
    # successive draws from one generator spread over the ties too
    rng = random.Random(1)
    assert set(select(costs, 0.0, rng) for _ in range(200)) == {0, 2, 3}


def test_select_softmax_prefers_the_cheapest() -> None:
    rng = random.Random(7)
    costs = [10.0, 11.0, 30.0]  # scaled to [0, 0.05, 1]; T = 0.2 -> weights 1, e^-0.25 = 0.78, e^-5 = 0.0067
    n = 10_000
    counts = Counter(select(costs, 0.2, rng) for _ in range(n))
    # expected shares: 0.560, 0.436, 0.0038
    assert counts[0] > counts[1] > counts[2]
    assert 0.53 * n < counts[0] < 0.59 * n
    assert 0.41 * n < counts[1] < 0.47 * n  # near-equal workers share the load (argmin would give 0)
    assert 5 <= counts[2] < 0.01 * n  # the much costlier one is picked, but rarely
    # a higher temperature flattens the distribution
    hot_rng = random.Random(7)
    hot = Counter(select(costs, 5.0, hot_rng) for _ in range(n))
    assert 0.25 * n < hot[2] < 0.33 * n  # expected shares 0.36, 0.35, 0.29
    assert hot[0] < 0.40 * n


def test_select_equal_costs_at_positive_temperature_are_uniform() -> None:
    rng = random.Random(3)
    n = 10_000
    counts = Counter(select([4.0, 4.0, 4.0, 4.0], 0.5, rng) for _ in range(n))
    assert set(counts) == {0, 1, 2, 3}
    assert all(0.22 * n < c < 0.28 * n for c in counts.values()), counts


def test_select_rejects_nothing_and_negative_temperatures() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        select([], 0.0, random.Random(0))
    with pytest.raises(ValueError, match="router temperature must be >= 0, got -0.1"):
        RoutingConfig(temperature=-0.1)
    assert RoutingConfig(temperature=0.0).temperature == 0.0


# ---- 4. prefix affinity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [CostWeights(), CostWeights(uncached=2.0, queued=0.5)])
def test_prefix_affinity_and_its_crossover(weights: CostWeights) -> None:
    prompt = list(range(1000, 1100))  # 100 tokens, 6 full blocks
    hashes = hash_full_blocks(prompt, BS)
    r = make_router(weights=weights)
    assert r.prefill is not None
    r.prefill.indexer.store("p1", hashes[:4])  # p1 holds the first 4 blocks (64 tokens)

    route = r.route("warm", prompt)
    assert prefill_id(route) == "p1"
    wu, wq = f"{weights.uncached:g}", f"{weights.queued:g}"
    text = route.describe()
    assert f"p0: {wu}*uncached 100 (100 - 0 blocks cached) + {wq}*queued 0 = {weights.uncached * 100:g}" in text
    assert f"p1: {wu}*uncached 36 (100 - 4 blocks cached) + {wq}*queued 0 = {weights.uncached * 36:g}" in text
    assert text.endswith("-> p1 | remote: local prefill disabled (threshold 0)")
    r.close("warm")
    assert prefill_loads(r) == {"p0": 0, "p1": 0}

    # queued tokens on p1 that make recomputing on p0 as cheap: w_q * q == w_u * 64 (the cached tokens)
    crossover = prefill_cost(PrefillTerms("p0", 100, 0, BS, 0), weights) - prefill_cost(
        PrefillTerms("p1", 100, 4, BS, 0), weights
    )
    assert crossover == weights.uncached * 64
    q_tie = crossover / weights.queued
    assert q_tie == int(q_tie)
    q_tie = int(q_tie)

    def choice(queued_on_p1: int, seed: int = 0) -> str:
        r.rng = random.Random(seed)
        prefill_ix(r).pool.slot("p1").prefill_tokens = queued_on_p1
        route = r.route("probe", prompt)
        r.close("probe")
        return prefill_id(route)

    assert choice(q_tie - 1) == "p1"
    assert choice(q_tie + 1) == "p0"
    # exactly at the crossover, a tie: it goes to the prompt's rendezvous home (the first block nobody holds),
    # whatever the random generator says
    home = ["p0", "p1"][rendezvous(hashes[4], ["p0", "p1"])]
    assert {choice(q_tie, seed) for seed in range(20)} == {home}
    # the load comes from routing too: long distinct prompts routed while p0 is draining queue on p1
    r.prefill.pool.slot("p1").prefill_tokens = 0
    r.prefill.pool.slot("p0").draining = True
    rng = random.Random(5)
    for i in range(1000):
        if r.prefill.pool.slot("p1").prefill_tokens > q_tie:
            break
        assert prefill_id(r.route(f"long{i}", tokens(rng, 40))) == "p1"
    r.prefill.pool.slot("p0").draining = False
    r.rng = random.Random(0)
    assert prefill_id(r.route("again", prompt)) == "p0"


# ---- 5. burst balance -------------------------------------------------------------------------------------------


class RouterWithoutQueueBooking(Router):
    """The failure mode: nothing remembers the prefill tokens just routed (a router that waits for reports)."""

    def route(
        self, request_id: str, prompt_ids: Sequence[int], exclude: Collection[str] = (), retry: bool = False
    ) -> Route:
        route = super().route(request_id, prompt_ids, exclude, retry)
        for s in prefill_ix(self).pool.slots:
            s.prefill_tokens = 0
        return route


class RouterWithoutPredictions(Router):
    """Books queued tokens but not the blocks the request will leave on its worker."""

    def route(
        self, request_id: str, prompt_ids: Sequence[int], exclude: Collection[str] = (), retry: bool = False
    ) -> Route:
        route = super().route(request_id, prompt_ids, exclude, retry)
        prefill_ix(self).predicted.drop(request_id)
        self.decode.predicted.drop(request_id)
        return route


def burst(router_cls: type[Router] = Router, seed: int = 11) -> tuple[Router, list[Route]]:
    rng = random.Random(seed)
    prefix = tokens(rng, 512)  # 32 blocks
    prompts = [prefix + tokens(rng, 32) for _ in range(64)]  # 544 tokens, 34 full blocks
    assert len({tuple(p) for p in prompts}) == 64
    decode = WorkerPool("decode", [FakeWorker("d0")], block_size=BS)
    prefill = WorkerPool("prefill", [FakeWorker(f"p{i}") for i in range(4)], block_size=BS)
    r = router_cls(decode, prefill, RoutingConfig(policy=Policy.KV, temperature=0.0), random.Random(seed))
    routes = [r.route(f"r{i}", p) for i, p in enumerate(prompts)]  # back to back, no completion
    return r, routes


def test_burst_sharing_a_prefix_spreads_evenly() -> None:
    r, routes = burst()
    assert r.prefill is not None
    counts = Counter(prefill_id(rt) for rt in routes)
    assert counts == {"p0": 16, "p1": 16, "p2": 16, "p3": 16}
    # requests 1..4 each land on a worker without the prefix (one holding it costs 32 + 544 queued > 544)
    first = [prefill_id(rt) for rt in routes[:4]]
    assert sorted(first) == ["p0", "p1", "p2", "p3"]
    for rt in routes[:4]:
        assert "(544 - 0 blocks cached)" in formula_of(rt.prefill_decision, prefill_id(rt))
    # from request 5 on, every worker is predicted to hold the prefix: only the 32-token suffix is uncached
    for rt in routes[4:]:
        f = formula_of(rt.prefill_decision, prefill_id(rt))
        assert "1*uncached 32 (544 - 32 blocks cached)" in f, f
    # every round of 4 gives each worker one request: 544 + 15 * 32 queued tokens each
    assert prefill_loads(r) == {"p0": 1024, "p1": 1024, "p2": 1024, "p3": 1024}
    assert r.open_tickets == 64
    for i in range(64):
        r.close(f"r{i}")
    assert prefill_loads(r) == {"p0": 0, "p1": 0, "p2": 0, "p3": 0}
    assert len(r.prefill.predicted) == len(r.decode.predicted) == 0


def test_burst_without_queue_booking_piles_onto_one_worker() -> None:
    _, routes = burst(RouterWithoutQueueBooking)
    counts = Counter(prefill_id(rt) for rt in routes)
    assert len(counts) == 1 and sum(counts.values()) == 64  # the prefix attracts the whole burst


def test_burst_without_predictions_recomputes_the_prefix_everywhere() -> None:
    r, routes = burst(RouterWithoutPredictions)
    assert r.prefill is not None
    assert Counter(prefill_id(rt) for rt in routes) == {"p0": 16, "p1": 16, "p2": 16, "p3": 16}
    for rt in routes:  # no request sees the prefix it just sent to its worker
        assert "(544 - 0 blocks cached)" in formula_of(rt.prefill_decision, prefill_id(rt))
    assert sum(prefill_loads(r).values()) == 64 * 544  # vs 4 * 544 + 60 * 32 = 4096 with predictions


# ---- 6. accounting ----------------------------------------------------------------------------------------------


def test_route_books_and_progress_releases_exactly_that() -> None:
    r = make_router(n_prefill=2, n_decode=2)
    assert r.prefill is not None
    a = list(range(500, 600))  # 100 tokens: 6 full blocks, 7 blocks of KV
    b = list(range(700, 740))  # 40 tokens: 2 full blocks, 3 blocks of KV
    ra = r.route("a", a)
    p_a, d_a = r.prefill.pool.slot(prefill_id(ra)), r.decode.pool.slot(ra.decode.worker_id)
    assert p_a.prefill_tokens == 100 and d_a.kv_blocks_in == 7 and d_a.prefill_tokens == 0
    assert r.prefill.predicted.find_matches(hash_full_blocks(a, BS)) == {p_a.worker_id: 6}
    assert r.decode.predicted.find_matches(hash_full_blocks(a, BS)) == {d_a.worker_id: 6}
    rb = r.route("b", b)
    p_b = r.prefill.pool.slot(prefill_id(rb))
    assert p_b is not p_a  # p_a has 100 queued
    assert r.open_tickets == 2

    def booked() -> tuple[int, int, int, int, int, int]:
        ps, ds = prefill_ix(r).pool.slots, r.decode.pool.slots
        return (
            sum(s.prefill_tokens for s in ps),
            sum(s.kv_blocks_in for s in ds),
            sum(s.prefill_tokens for s in ds),
            len(prefill_ix(r).predicted),
            len(r.decode.predicted),
            r.open_tickets,
        )

    assert booked() == (140, 10, 0, 2, 2, 2)
    r.prefill_done("a")
    assert p_a.prefill_tokens == 0 and booked() == (40, 10, 0, 2, 2, 2)
    r.prefill_done("a")  # idempotent
    assert booked() == (40, 10, 0, 2, 2, 2)
    r.first_token("a")
    assert booked() == (40, 3, 0, 1, 1, 2)
    assert r.prefill.predicted.find_matches(hash_full_blocks(a, BS)) == {}
    r.first_token("a")
    assert booked() == (40, 3, 0, 1, 1, 2)
    r.close("a")
    assert booked() == (40, 3, 0, 1, 1, 1)
    r.close("b")  # close alone releases everything b booked
    assert booked() == (0, 0, 0, 0, 0, 0)
    r.close("b")
    r.close("never-routed")
    r.prefill_done("b")
    r.first_token("b")
    assert booked() == (0, 0, 0, 0, 0, 0)
    assert all(s.prefill_tokens == 0 and s.kv_blocks_in == 0 for s in r.decode.pool.slots + r.prefill.pool.slots)


def test_local_route_books_prefill_tokens_on_decode() -> None:
    r = make_router(n_decode=1, conditional_prefill_threshold=64)
    assert r.prefill is not None
    prompt = list(range(40))
    route = r.route("x", prompt)
    assert route.local and route.prefill is None
    d = r.decode.pool.slot("d0")
    assert (d.prefill_tokens, d.kv_blocks_in) == (40, 0)
    assert prefill_loads(r) == {"p0": 0, "p1": 0}
    assert len(r.decode.predicted) == 1 and len(r.prefill.predicted) == 0
    r.prefill_done("x")  # no prefill worker: nothing to release yet
    assert d.prefill_tokens == 40
    r.first_token("x")
    assert d.prefill_tokens == 0 and len(r.decode.predicted) == 0
    r.close("x")
    assert r.open_tickets == 0 and d.prefill_tokens == 0


def assert_nothing_booked(r: Router) -> None:
    slots = r.decode.pool.slots + (r.prefill.pool.slots if r.prefill else ())
    assert all((s.prefill_tokens, s.kv_blocks_in) == (0, 0) for s in slots)
    assert len(r.decode.predicted) == 0
    assert r.prefill is None or len(r.prefill.predicted) == 0
    assert r.open_tickets == 0


def test_route_without_a_decode_worker_books_nothing() -> None:
    r = make_router(n_decode=2)
    r.decode.pool.set_health("d0", False)
    r.decode.pool.drain("d1")
    with pytest.raises(NoHealthyWorkerError, match=r"no healthy decode worker \(1 of 2 down, 1 draining\)"):
        r.route("x", list(range(50)))
    assert_nothing_booked(r)


def test_route_without_a_prefill_worker_prefills_locally() -> None:
    """Threshold 0 (always remote) and every prefill worker down or draining: D prefills the request itself
    (a request never fails for want of P while a decode worker can run it); P is chosen again once back."""
    r = make_router(n_prefill=2, n_decode=1)
    assert r.prefill is not None
    r.prefill.pool.set_health("p0", False)
    r.prefill.pool.drain("p1")
    prompt = list(range(50))
    route = r.route("x", prompt)
    assert route.local and route.kind == "no_prefill_worker"
    assert route.reason == "local: no healthy prefill worker (50 uncached tokens on d0)"
    r.close("x")
    assert_nothing_booked(r)
    r.prefill.pool.set_health("p0", True)
    assert prefill_id(r.route("x", prompt)) == "p0"


def test_route_excludes_workers_that_failed_the_request() -> None:
    """A retry names the workers that already failed it: they are not chosen, whatever their cost;
    with every prefill worker excluded the retry prefills on D; with every D excluded it fails, booking nothing."""
    r = make_router(n_prefill=2, n_decode=2)
    assert r.prefill is not None
    prompt = list(range(50))
    r.prefill.indexer.store("p0", hash_full_blocks(prompt, BS))  # p0 would win on cost
    assert prefill_id(r.route("a", prompt)) == "p0"
    r.close("a")
    route = r.route("b", prompt, exclude={"p0"})
    assert prefill_id(route) == "p1"
    r.close("b")
    route = r.route("c", prompt, exclude={"p0", "p1", "d0"})
    assert route.local and route.decode.worker_id == "d1" and route.kind == "no_prefill_worker"
    r.close("c")
    with pytest.raises(
        NoHealthyWorkerError,
        match=r"no healthy decode worker \(0 of 2 down, 0 draining, "
        r"2 already failed this request\)",
    ):
        r.route("d", prompt, exclude={"d0", "d1"})
    assert_nothing_booked(r)
    for policy in ("round-robin", "least-loaded"):
        rr = make_router(n_prefill=2, n_decode=2, policy=policy)
        for i in range(4):
            route = rr.route(f"r{i}", prompt, exclude={"p1", "d0"})
            assert (prefill_id(route), route.decode.worker_id) == ("p0", "d1")
            rr.close(f"r{i}")


# ---- 7. conditional disaggregation ------------------------------------------------------------------------------


def cd_router(threshold: int, **cfg) -> tuple[Router, list[int]]:
    """d0 caches the whole 100-token prompt's 6 full blocks (4 tokens uncached); d1 nothing."""
    r = make_router(n_prefill=2, n_decode=2, conditional_prefill_threshold=threshold, **cfg)
    for d in ("d0", "d1"):
        r.decode.pool.set_status(d, status(d, total=100, free=100))
    prompt = list(range(2000, 2100))
    r.decode.indexer.store("d0", hash_full_blocks(prompt, BS))
    return r, prompt


def test_threshold_zero_is_always_remote() -> None:
    r, prompt = cd_router(0)
    route = r.route("x", prompt)
    assert route.decode.worker_id == "d0"  # need 1 block there, 7 on d1
    assert not route.local
    assert route.reason == "remote: local prefill disabled (threshold 0)"


def test_short_uncached_part_on_decode_is_prefilled_locally() -> None:
    r, prompt = cd_router(4)
    route = r.route("x", prompt)
    assert route.local and route.decode.worker_id == "d0"
    assert route.reason == "local: 4 uncached tokens on d0 <= threshold 4"
    assert route.prefill_decision is None
    assert " | local: 4 uncached tokens on d0 <= threshold 4" in route.describe()


def test_uncached_part_over_the_threshold_goes_remote() -> None:
    r, prompt = cd_router(3)
    route = r.route("x", prompt)
    assert not route.local and route.decode.worker_id == "d0"
    assert route.reason == "remote: 4 uncached tokens on d0 > threshold 3"
    assert isinstance(route.prefill_decision, KVDecision)
    # an uncached prompt is measured in full
    r2, _ = cd_router(99)
    route = r2.route("y", list(range(99)))
    assert route.local and route.reason.startswith("local: 99 uncached tokens on ")
    route = r2.route("z", list(range(3000, 3100)))
    assert route.reason == f"remote: 100 uncached tokens on {route.decode.worker_id} > threshold 99"


def test_no_eligible_prefill_worker_means_local() -> None:
    r, _ = cd_router(16)
    assert r.prefill is not None
    r.prefill.pool.set_health("p0", False)
    r.prefill.pool.drain("p1")
    route = r.route("x", list(range(5000, 5100)))
    assert route.local
    assert route.reason == f"local: no healthy prefill worker (100 uncached tokens on {route.decode.worker_id})"


def test_saturated_prefill_pool_means_local() -> None:
    r, _ = cd_router(16, max_prefill_queue_tokens=1000)
    assert r.prefill is not None
    prompt = list(range(5000, 5100))
    r.prefill.pool.slot("p0").prefill_tokens = 1000
    r.prefill.pool.slot("p1").prefill_tokens = 999  # one below the limit: still remote, to p1
    route = r.route("a", prompt)
    assert not route.local and prefill_id(route) == "p1"
    r.close("a")
    r.prefill.pool.slot("p1").prefill_tokens = 1200
    route = r.route("b", prompt)
    assert route.local
    assert route.reason == "local: prefill pool saturated (least queued 1000 >= 1000 tokens)"
    assert prefill_loads(r) == {"p0": 1000, "p1": 1200}  # nothing booked on the prefill pool


def test_aggregated_is_always_local_and_prefers_the_cached_prefix() -> None:
    r = make_router(n_decode=3, aggregated=True, seed=4)
    prompt = list(range(100))
    r.decode.indexer.store("d2", hash_full_blocks(prompt, BS))
    route = r.route("x", prompt)
    assert route.local and route.prefill is None and route.prefill_decision is None
    assert route.decode.worker_id == "d2"
    assert route.reason == "local: aggregated (4 uncached tokens on d2)"
    assert "d2: 1*uncached 4 (100 - 6 blocks cached) + 1*queued 0 = 4" in route.describe()
    assert r.decode.pool.slot("d2").prefill_tokens == 4
    # threshold settings do not matter without a prefill pool
    r0 = make_router(n_decode=1, aggregated=True, conditional_prefill_threshold=0)
    assert r0.route("y", list(range(300))).reason == "local: aggregated (300 uncached tokens on d0)"


# ---- 8. load-blind policies -------------------------------------------------------------------------------------


def test_round_robin_ignores_the_prefix_index() -> None:
    prompt = list(range(100))
    r = make_router(n_prefill=2, policy="round_robin")
    assert r.prefill is not None
    r.prefill.indexer.store("p1", hash_full_blocks(prompt, BS))
    routes = [r.route(f"r{i}", prompt) for i in range(4)]
    assert [prefill_id(rt) for rt in routes] == ["p0", "p1", "p0", "p1"]
    assert isinstance(routes[0].prefill_decision, Decision)
    assert routes[0].prefill_decision.policy is Policy.ROUND_ROBIN
    assert routes[0].prefill_decision.describe() == "prefill round_robin: p0=0 p1=0 -> p0"
    # the same index under the kv policy attracts every request to p1
    kv = make_router(n_prefill=2)
    assert kv.prefill is not None
    kv.prefill.indexer.store("p1", hash_full_blocks(prompt, BS))
    assert [prefill_id(kv.route(f"r{i}", prompt)) for i in range(4)] == ["p1"] * 4


def test_least_loaded_ignores_the_prefix_index() -> None:
    prompt = list(range(100))
    r = make_router(n_prefill=2, policy="least_loaded")
    assert r.prefill is not None
    r.prefill.indexer.store("p1", hash_full_blocks(prompt, BS))
    with r.prefill.pool.track("p1"):
        route = r.route("a", prompt)
        assert prefill_id(route) == "p0"
        assert route.prefill_decision is not None
        assert route.prefill_decision.describe() == "prefill least_loaded: p0=0 p1=1 -> p0"
    with r.prefill.pool.track("p0"):
        assert prefill_id(r.route("b", prompt)) == "p1"


# ---- 9. drain ---------------------------------------------------------------------------------------------------


def test_draining_workers_are_never_chosen() -> None:
    prompt = list(range(100))
    r = make_router(n_prefill=2, n_decode=2)
    assert r.prefill is not None
    r.prefill.indexer.store("p1", hash_full_blocks(prompt, BS))  # p1 is by far the cheapest
    r.decode.indexer.store("d1", hash_full_blocks(prompt, BS))
    for d in ("d0", "d1"):
        r.decode.pool.set_status(d, status(d, total=100, free=100))
    assert prefill_id(r.route("warm", prompt)) == "p1"
    r.close("warm")
    r.prefill.pool.drain("p1")
    r.decode.pool.drain("d1")
    for i in range(20):
        route = r.route(f"r{i}", prompt)
        assert (prefill_id(route), route.decode.worker_id) == ("p0", "d0")
        assert "p1:" not in route.describe()  # not even a candidate
    rr = make_router(n_prefill=3, policy="round_robin")
    assert rr.prefill is not None
    rr.prefill.pool.drain("p1")
    assert [prefill_id(rr.route(f"r{i}", prompt)) for i in range(4)] == ["p0", "p2", "p0", "p2"]


def test_wait_drained_returns_when_the_last_tracked_request_ends() -> None:
    pool = WorkerPool("prefill", [FakeWorker("p0"), FakeWorker("p1")], block_size=BS)

    async def scenario() -> None:
        assert await pool.wait_drained("p1", timeout_s=5.0)  # nothing in flight: at once
        first, second = pool.track("p1"), pool.track("p1")
        first.__enter__()
        second.__enter__()
        pool.drain("p1")
        waiter = asyncio.create_task(pool.wait_drained("p1", timeout_s=30.0))
        for _ in range(3):
            await asyncio.sleep(0)  # yield: let the waiter reach its wait
        assert not waiter.done()
        first.__exit__(None, None, None)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiter.done()  # one request still in flight
        second.__exit__(None, None, None)
        assert await asyncio.wait_for(waiter, 5.0) is True
        assert pool.in_flight("p1") == 0
        with pool.track("p0"):  # another worker's requests do not matter; a timeout reports False
            pool.drain("p0")
            assert await pool.wait_drained("p0", timeout_s=0.01) is False

    asyncio.run(scenario())


# ---- the cache-fill term and rendezvous homes (issue 16) ------------------------------------------------------


@pytest.mark.parametrize(
    "terms, cost, formula",
    [
        # the common header (2 blocks) cached on a half-full worker ...
        (
            PrefillTerms("p0", 800, 2, 16, 0, total_blocks=300, content_blocks=150),
            1021.44,
            "p0: 1*uncached 768 (800 - 2 blocks cached) + 1*queued 0 "
            "+ 0.5*evict 768*fill 0.66 ((150 + 48)/300)*reuse 1.00 = 1021.44",
        ),
        # ... loses to a nearly empty one: the new document goes where it pushes nothing out
        (
            PrefillTerms("p1", 800, 0, 16, 0, total_blocks=300, content_blocks=30),
            906.667,
            "p1: 1*uncached 800 (800 - 0 blocks cached) + 1*queued 0 "
            "+ 0.5*evict 800*fill 0.27 ((30 + 50)/300)*reuse 1.00 = 906.667",
        ),
        # a full cache: fill is capped at 1
        (
            PrefillTerms("p2", 800, 0, 16, 100, total_blocks=300, content_blocks=280),
            1300,
            "p2: 1*uncached 800 (800 - 0 blocks cached) + 1*queued 100 "
            "+ 0.5*evict 800*fill 1.00 ((280 + 50)/300)*reuse 1.00 = 1300",
        ),
        # a long match adds little: 2 new blocks
        (
            PrefillTerms("p3", 800, 48, 16, 0, total_blocks=300, content_blocks=290),
            48,
            "p3: 1*uncached 32 (800 - 48 blocks cached) + 1*queued 0 "
            "+ 0.5*evict 32*fill 0.97 ((290 + 2)/300)*reuse 1.00 = 47.5733",
        ),
    ],
)
def test_prefill_cost_with_the_fill_term_golden(terms: PrefillTerms, cost: float, formula: str) -> None:
    assert prefill_cost(terms) == pytest.approx(cost, abs=0.5)
    assert prefill_formula(terms) == formula


def test_the_fill_term_scales_with_the_pools_reuse() -> None:
    """No prefix asked twice: evicting costs nothing and the queue decides; some reuse: a share of the term."""
    busy_empty = PrefillTerms("p0", 800, 0, 16, 400, total_blocks=300, content_blocks=0, reuse=0.0)
    idle_full = PrefillTerms("p1", 800, 0, 16, 0, total_blocks=300, content_blocks=280, reuse=0.0)
    assert prefill_formula(idle_full) == (
        "p1: 1*uncached 800 (800 - 0 blocks cached) + 1*queued 0 + 0.5*evict "
        "800*fill 1.00 ((280 + 50)/300)*reuse 0.00 = 800"
    )
    assert prefill_cost(idle_full) < prefill_cost(busy_empty)  # the idle worker wins despite its full cache
    half = PrefillTerms("p1", 800, 0, 16, 0, total_blocks=300, content_blocks=280, reuse=0.5)
    assert prefill_formula(half).endswith("*reuse 0.50 = 1000")


def test_reuse_meter_measures_repeated_blocks_not_placement() -> None:
    from router.costs import ReuseMeter

    m = ReuseMeter(capacity=100, alpha=0.5, initial=1.0)
    m.observe([b"a", b"b"])  # nothing seen before: share moves halfway to 0
    assert m.share == pytest.approx(0.5)
    m.observe([b"a", b"b", b"c", b"d"])  # half of it seen before
    assert m.share == pytest.approx(0.5)
    m.observe([b"a", b"b", b"c", b"d"])  # all of it
    assert m.share == pytest.approx(0.75)
    small = ReuseMeter(capacity=2, alpha=1.0)
    small.observe([b"x", b"y", b"z"])  # x falls out of the bounded memory
    small.observe([b"x"])
    assert small.share == 0.0
    with pytest.raises(ValueError, match="capacity >= 1"):
        ReuseMeter(capacity=0)


def test_rendezvous_homes_are_stable_and_spread() -> None:
    workers = ["p0", "p1", "p2"]
    keys = [bytes([i, j]) for i in range(30) for j in range(10)]
    homes = [rendezvous(k, workers) for k in keys]
    assert homes == [rendezvous(k, workers) for k in keys]
    counts = Counter(homes)
    assert min(counts.values()) > 60  # 300 keys over 3 workers
    # a worker leaving moves only its own keys
    moved = [k for k, h in zip(keys, homes) if h != 2 and workers[h] != ["p0", "p1"][rendezvous(k, ["p0", "p1"])]]
    assert moved == []


# ---- placement by SLO (issue 16) ---------------------------------------------------------------------------------


def perf_status(wid: str, role: str, busy: float = 0.0, ready: bool = True) -> WorkerStatus:
    """P measured only prefill steps, D only decode steps (each borrows the other's line)."""
    from common.perf_model import PerfEstimate

    steps = dict(prefill_steps=5 if ready else 0) if role == "prefill" else dict(decode_steps=50)
    return msgspec.structs.replace(
        status(wid, 1000, 1000),
        role=role,
        perf=PerfEstimate(
            decode_base_s=0.020, per_seq_s=0.010, prefill_base_s=0.020, per_token_s=0.003, prefill_busy=busy, **steps
        ),
    )


def slo_router(**statuses: WorkerStatus) -> Router:
    r = make_router(n_prefill=1, n_decode=1, slo_ttft_s=4.0, slo_tpot_s=0.2)
    assert r.prefill is not None
    for wid, st in statuses.items():
        pool = r.prefill.pool if wid.startswith("p") else r.decode.pool
        pool.set_status(wid, st)
    return r


def test_slo_placement_keeps_the_pools_intent_while_it_meets_the_targets() -> None:
    r = slo_router(p0=perf_status("p0", "prefill"), d0=perf_status("d0", "decode"))
    r.decode.pool.slot("d0").in_flight = 4  # D decodes 4 requests; P is idle: remote is predicted to meet both
    route = r.route("a", list(range(1000, 1500)))
    assert prefill_id(route) == "p0" and route.decode.worker_id == "d0" and route.kind == "slo_remote"
    assert route.reason == (
        "remote: SLO placement (remote on d0: TTFT 1520 ms, TPOT 70 ms = 0.73; "
        "whole on p0: TTFT 1520 ms, TPOT 30 ms = 0.53; "
        "local on d0: TTFT 1560 ms, TPOT 70 ms, stalls 4 for 1520 ms = 1.21) -> remote (meets)"
    )


def test_slo_placement_runs_the_whole_request_on_an_idle_prefill_worker_when_decode_would_miss() -> None:
    r = slo_router(p0=perf_status("p0", "prefill"), d0=perf_status("d0", "decode"))
    r.decode.pool.slot("d0").in_flight = 14  # TPOT on D 170 ms > 0.8 x 200 ms
    route = r.route("a", list(range(1000, 1500)))
    assert route.prefill is None and route.decode.worker_id == "p0"
    assert route.kind == "slo_whole"
    assert route.reason == (
        "whole on p0: SLO placement (remote on d0: TTFT 1520 ms, TPOT 170 ms = 1.23; "
        "whole on p0: TTFT 1520 ms, TPOT 30 ms = 0.53; "
        "local on d0: TTFT 1660 ms, TPOT 170 ms, stalls 14 for 1520 ms = 2.93) -> whole (meets)"
    )
    assert prefill_loads(r) == {"p0": 500}  # its prefill is booked on P, like a remote one
    r.close("a")
    assert prefill_loads(r) == {"p0": 0}


def test_slo_placement_keeps_decode_off_a_busy_prefill_worker_and_prefills_locally_past_a_queue() -> None:
    busy = slo_router(p0=perf_status("p0", "prefill", busy=0.9), d0=perf_status("d0", "decode"))
    route = busy.route("a", list(range(1000, 1500)))
    assert prefill_id(route) == "p0" and route.kind == "slo_remote"  # TPOT on P: 30 ms / (1 - 0.9)
    queued = slo_router(p0=perf_status("p0", "prefill"), d0=perf_status("d0", "decode"))
    assert queued.prefill is not None
    queued.prefill.pool.slot("p0").prefill_tokens = 3000  # 9 s of queue on P; D is idle
    route = queued.route("b", list(range(1000, 1500)))
    assert route.local and route.decode.worker_id == "d0" and route.kind == "slo_local"
    assert route.reason.endswith("-> local (meets)")


@pytest.mark.parametrize(
    "slack_s, kind, stall",
    [
        (1.0, "slo_remote", "stalls 4 for 1520 ms of 1000 ms slack"),  # 1.52 s > half the slack: nothing meets
        (5.0, "slo_local", "stalls 4 for 1520 ms of 5000 ms slack"),  # within half of it
        (None, "slo_local", "stalls 4 for 1520 ms"),  # no report: 70 ms + 1520 / 64 ms <= 160 ms
    ],
)
def test_a_local_prefill_past_a_queue_takes_at_most_half_the_decode_workers_reported_slack(
    slack_s: float | None, kind: str, stall: str
) -> None:
    d = msgspec.structs.replace(perf_status("d0", "decode"), tpot_slack_s=slack_s)
    r = slo_router(p0=perf_status("p0", "prefill"), d0=d)
    assert r.prefill is not None
    r.prefill.pool.slot("p0").prefill_tokens = 3000  # remote and whole: TTFT 10.5 s
    r.decode.pool.slot("d0").in_flight = 4
    route = r.route("a", list(range(1000, 1500)))
    assert route.kind == kind and f"local on d0: TTFT 1560 ms, TPOT 70 ms, {stall} = " in route.reason
    verdict = "(nothing meets the targets)" if kind == "slo_remote" else "(meets)"
    assert route.reason.endswith(verdict)


def test_slo_placement_waits_for_ready_models_and_a_threshold_keeps_the_fixed_placement() -> None:
    r = slo_router(p0=perf_status("p0", "prefill", ready=False), d0=perf_status("d0", "decode"))
    r.decode.pool.slot("d0").in_flight = 4
    route = r.route("a", list(range(1000, 1500)))
    assert prefill_id(route) == "p0" and route.kind == "disabled"
    fixed = make_router(n_prefill=1, n_decode=1, slo_ttft_s=4.0, slo_tpot_s=0.2, conditional_prefill_threshold=64)
    assert not fixed.config.slo_placement


def test_reuse_is_measured_once_per_request_not_per_retry() -> None:
    """A retry re-routes the same prompt: it must not count as a repeated prefix (that would pull the share up
    whenever a worker dies with requests in flight); a first try counts once it is booked."""
    r = make_router(n_prefill=2)
    assert r.prefill is not None
    rng = random.Random(5)
    prompt = tokens(rng, 8 * BS)
    r.route("a", prompt)
    r.close("a")
    after_first = r.prefill.reuse.share
    for n in range(3):
        r.route(f"a~retry{n}", prompt, retry=True)
        r.close(f"a~retry{n}")
    assert r.prefill.reuse.share == after_first
    r.route("b", prompt)  # a new request with the same prompt: real reuse
    assert r.prefill.reuse.share > after_first
    agg = make_router(aggregated=True)
    agg.route("c", tokens(rng, 4 * BS))  # aggregated: the decode pool's meter, which routes by the prefill cost
    assert agg.decode.reuse.share < 1.0
