"""Placement by SLO on a served cluster (tiny llama, 1 prefill + 1 decode Ray actor, NIXL, gRPC).

- the workers measure their step times while serving and report them: after a few requests the
  prefill worker's prefill line and the decode worker's decode line are ready (what the router's
  placement predicts TTFT and TPOT from);
- each placement runs for real with tokens equal to transformers and pools clean afterwards: a whole
  request on the prefill worker (`route` says so, `decode_worker` is the prefill worker), a local
  prefill on the decode worker, and remote. Which placement wins is decided by measured figures
  (unit-tested with golden formulas in tests/unit/test_routing.py); here the router's decision is
  pinned per request so that each execution path is exercised deterministically.
"""

from __future__ import annotations

import random

import pytest
import ray

from router.placement import PlacementOption
from tandem_api.client import TandemClient
from tests.e2e.conftest import TINY_VOCAB, serve
from tests.helpers.reference import hf_greedy

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with serve(
        str(tiny_dir), ray_namespace="tandem-placement", **{"router.slo_ttft_ms": 4000, "router.slo_itl_ms": 200}
    ) as s:
        yield s


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def _greedy(s, ids: list[int], n: int):
    responses = list(TandemClient(s.address).generate(token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True))
    return [t for r in responses for t in r.token_ids], responses


def _pools_clean(s) -> None:
    s.cluster.check_pools()
    assert s.on_router(lambda svc: svc.wait_idle(30), timeout_s=40)
    assert s.on_router(lambda svc: svc.router.open_tickets) == 0
    loads = s.on_router(
        lambda svc: [
            (sl.worker_id, sl.in_flight, sl.prefill_tokens, sl.kv_blocks_in) for p in svc.pools for sl in p.slots
        ]
    )
    assert all(tuple(rest) == (0, 0, 0) for _, *rest in loads), loads


def test_workers_measure_their_step_times_while_serving(cluster, reference):
    for i in range(12):
        ids = _ids(40 + i, seed=i)
        tokens, _ = _greedy(cluster, ids, 6)
        assert tokens == hf_greedy(reference, ids, 6)
    cluster.on_router(lambda svc: svc.refresh_health())
    perf = cluster.on_router(lambda svc: {sl.worker_id: sl.status.perf for p in svc.pools for sl in p.slots})
    assert perf["prefill-0"].prefill_ready and perf["prefill-0"].prefill_s(100) > 0
    assert perf["decode-0"].decode_ready and perf["decode-0"].decode_step_s(1) > 0
    assert not perf["prefill-0"].decode_ready  # a disaggregated prefill worker never decodes: it borrows D's line
    statuses = ray.get([h.actor.status.remote() for h in cluster.cluster.workers])
    assert all(st.perf.prefill_steps + st.perf.decode_steps > 0 for st in statuses)
    _pools_clean(cluster)


@pytest.mark.parametrize(
    "kind, worker, route",
    [
        ("whole", "prefill-0", "whole on prefill-0: pinned"),
        ("local", "decode-0", "local: pinned"),
        ("remote", "decode-0", "remote: pinned"),
    ],
)
def test_each_placement_runs_whole_and_exact(cluster, reference, kind, worker, route):
    def pin(d_slot, d_uncached, p_slot, p_uncached):
        where = p_slot.worker_id if kind == "whole" else d_slot.worker_id
        return PlacementOption(kind, where, 0.1, 0.01), "pinned"

    cluster.on_router(lambda svc: setattr(svc.router, "_place", pin))
    try:
        for seed in (100, 101):
            ids = _ids(37, seed=seed)
            tokens, responses = _greedy(cluster, ids, 9)
            assert tokens == hf_greedy(reference, ids, 9)
            first = responses[0]
            assert first.route == route and first.decode_worker == worker
            assert first.prefill_worker == ("prefill-0" if kind == "remote" else "")
            assert responses[-1].usage.completion_tokens == 9
    finally:
        cluster.on_router(lambda svc: delattr(svc.router, "_place"))
    _pools_clean(cluster)
