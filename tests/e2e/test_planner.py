"""`tandem serve --planner sla` on a real cluster (tiny random llama, real Ray actors, real gRPC).

The planner's profile says a prefill worker spends 4 ms per prompt token, so one worker handles about
4 requests of 64 tokens a second. The test drives the loop's intervals itself (`PlannerLoop.step`, what
the background task runs every `planner.interval_s`) on an injected clock that advances 10 s per interval,
so nothing waits on a timer:

1. light load: the planner holds 1P+1D;
2. a step up (a burst of requests): it adds prefill workers through the admin path, and the cluster
   serves on; every request of the burst completes;
3. the step down: after `down_after` intervals wanting fewer, it removes one worker per interval,
   draining each first, while a stream runs; nothing fails, and the pools end as they began.

On this 2-core machine an added worker cannot add compute, so the recovery of SLO attainment under a
real overload is shown by the simulator (docs/BENCHMARKS.md); here the tiny model meets the targets
throughout, and the test checks what the planner does with the cluster and that no request is lost.
"""

from __future__ import annotations

import concurrent.futures
import random

import pytest

from planner.model import StepModel, TransferModel
from planner.profile import Profile, ServedOverhead, Shape, WorkerProfile, save_profile
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512


def _profile(path) -> str:
    step = StepModel(base_s=0.01, per_prefill_token_s=0.004, per_decode_seq_s=0.0005, samples=10)
    w = WorkerProfile(shape=Shape(), step=step, num_blocks=4000, max_num_seqs=32)
    key = w.shape.key()
    save_profile(
        Profile(
            model="tiny",
            workers=[w],
            transfer=TransferModel(0.002, 0.0001, 5),
            overhead=ServedOverhead(0.005, 0.0, 5),
            pools={"prefill": key, "decode": key},
        ),
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    profile = _profile(tmp_path_factory.mktemp("planner") / "profile.json")
    with serve(
        str(tiny_dir),
        **{
            "planner.mode": "sla",
            "planner.profile": profile,
            "planner.slo": "ttft_ms=1000,tpot_ms=200",
            "planner.interval_s": 3600.0,  # the test runs the intervals itself
            "planner.max_workers": 4,
            "planner.cooldown_s": 0.0,
            "planner.down_after": 2,
            "planner.drain_timeout_s": 60.0,
        },
    ) as s:
        yield s


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _send(address: str, seed: int, tokens: int = 8) -> int:
    client = TandemClient(address)
    try:
        out = list(client.generate(token_ids=_ids(64, seed), max_tokens=tokens, temperature=0.0, ignore_eos=True))
        return sum(len(r.token_ids) for r in out)
    finally:
        client.close()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _step(cluster, clock: Clock):
    clock.t += 10.0  # one interval of the planner's clock
    return cluster.on_router(lambda _svc: cluster.admin.planner.step(), timeout_s=600)


def _pools(cluster) -> tuple[int, int]:
    return len(cluster.cluster.pool_workers("prefill")), len(cluster.cluster.pool_workers("decode"))


def test_step_up_adds_prefill_and_step_down_drains_it_away_without_losing_a_request(cluster):
    loop = cluster.admin.planner
    assert loop is not None
    clock = Clock()
    loop.clock = clock  # the planner's time from here on (the router keeps stamping requests on its own)
    cluster.on_router(lambda _svc: loop.mark())
    for seed in range(3):  # light load: 3 requests in 10 s
        assert _send(cluster.address, seed) == 8
    decisions = _step(cluster, clock)
    assert [d.action for d in decisions] == ["hold"] and _pools(cluster) == (1, 1)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # the step up: 48 requests at once
        got = list(pool.map(lambda s: _send(cluster.address, s), range(100, 148)))
    assert got == [8] * 48
    decisions = _step(cluster, clock)  # 48 requests in 10 s
    adds = [d for d in decisions if d.action == "add"]
    assert adds and adds[0].pool == "prefill", [(d.action, d.pool, d.reason) for d in decisions]
    assert adds[0].inputs["rate"] == pytest.approx(4.8) and adds[0].predicted["slo_attainment"] >= 0.9
    grown = _pools(cluster)
    assert grown[0] >= 2
    info = TandemClient(cluster.address).server_info()
    assert sum(w.worker_id.startswith("prefill-") for w in info.workers) == grown[0]
    metrics = cluster.service.metrics.registry.get_sample_value(
        "tandem_planner_decisions_total", {"action": "add", "pool": "prefill"}
    )
    assert metrics and metrics >= 1

    # the step down: a trickle of requests (one stream in flight during each interval) until it is back
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for interval in range(12):
            stream = pool.submit(_send, cluster.address, 1000 + interval, 48)
            _step(cluster, clock)
            assert stream.result(timeout=300) == 48  # a request in flight while workers drain: completes
            if _pools(cluster) == (1, 1):
                break
    assert _pools(cluster) == (1, 1)
    removes = [d for d in cluster.admin.planner.applied if d.action == "remove"]
    assert len(removes) == grown[0] - 1 and all(d.pool == "prefill" for d in removes)
    assert _send(cluster.address, 5000) == 8
    cluster.cluster.check_pools()
