"""SLO attainment recovers after the SLA planner adds a prefill worker, measured on a real cluster.

The shipped SmolLM2 in float32, 1 prefill + 1 decode worker of one thread each, real Ray actors, real gRPC,
and the bench's own open-loop generator (`tandem_api.bench.runner.run_load`): Poisson arrivals of prompts
of PROMPT tokens that ask for OUTPUT tokens. Decode is almost free at that length, so the load is
prefill-bound. The test first measures one prompt's prefill alone (`Calibration`) and sets the arrival rate
to LOAD = 1.15x what one prefill worker computes and the TTFT target to TARGET prefill times, so the
scenario scales with the machine's speed (a worker's start does not: the load allows WORKER_START_S). That
is the one case where an added worker adds compute on a 2-core machine (the decode worker's core is idle
most of the time), so the recovery here is measured, not simulated.

1. Overload: the planner's interval runs once ARRIVALS_BEFORE_STEP requests have been sent (the generator
   counts them; nothing waits on a timer); it sees the arrival rate against its profile and adds a prefill
   worker through the admin path. Requests that arrive while the new worker starts miss the TTFT target.
2. Recovery: requests that arrive more than RECOVERY prefill times after the worker joined meet the target
   (the TTFT attainment the issue asks to recover, within a bounded time); the new worker prefills part of
   them.
3. Step down: with the load gone, the planner removes the worker again after draining it.
No request fails at any point, and the pools are intact at the end.

The planner's profile is synthetic (a real `tandem profile` run takes a minute): its prefill cost per
token is the calibration's, so the planner's decision is the one it would take on a measured profile; the
recovery figures are the real cluster's.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, replace

import pytest

from deploy.planner_loop import policy_config
from planner.model import StepModel, TransferModel
from planner.policy import SlaPolicy
from planner.profile import Profile, ServedOverhead, Shape, WorkerProfile, save_profile
from tandem_api.bench.datasets import DatasetOptions, PromptMaker, build_dataset
from tandem_api.bench.metrics import RequestRecord
from tandem_api.bench.runner import LoadConfig, run_load
from tandem_api.bench.targets import GrpcTarget, WireRequest
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

PROMPT, OUTPUT = 384, 4
# the arrival rate against what one prefill worker computes alone: 1.15x one worker; two on this 2-core host
# compute well under 2x one (they share the cores with the router, the client, Ray and the decode worker), and
# at 1.25x the recovered pair ran near saturation on a host without AVX-512 (docs/BENCHMARKS.md)
LOAD = 1.15
# the TTFT target, in prefills of one prompt alone (4.5 at 1.25x held on hosts whose float32 layers run Tandem's
# AVX-512 kernels, not on one whose float32 layers ran torch's ops: docs/BENCHMARKS.md)
TARGET = 6.0
RECOVERED = 0.8  # the TTFT attainment the arrivals after RECOVERY must reach (those while the worker starts: < 0.5)
ARRIVALS_BEFORE_STEP = 20  # arrivals before the planner's interval runs (about 16 prefill times of overload)
RECOVERY = 35.0  # in prefill times after the new worker joined: requests arriving later must meet the target
AFTER = 25.0  # prefill times of arrivals after that, to judge the recovery on
WORKER_START_S = 40.0  # what the load allows for a worker's start (about 18 s here), whatever the prefill time
VOCAB = 49152


@dataclass(frozen=True)
class Calibration:
    prefill_s: float  # TTFT of one prompt alone, measured on this machine before the load

    @property
    def rate(self) -> float:
        return LOAD / self.prefill_s

    @property
    def ttft_s(self) -> float:
        return TARGET * self.prefill_s


def _profile(prefill_s: float) -> Profile:
    """A planner profile whose prefill of one PROMPT takes `prefill_s` (a real `tandem profile` takes a minute;
    the step model is all the decision here rests on)."""
    step = StepModel(base_s=0.0, per_prefill_token_s=prefill_s / PROMPT, per_decode_seq_s=0.002, samples=3)
    w = WorkerProfile(shape=Shape(), step=step, num_blocks=4000, max_num_seqs=64)
    key = w.shape.key()
    return Profile(
        model="SmolLM2-135M-Instruct",
        workers=[w],
        transfer=TransferModel(0.002, 0.00005, 5),
        overhead=ServedOverhead(0.02, 0.005, 5),
        pools={"prefill": key, "decode": key},
    )


def _policy(cal: Calibration, config) -> SlaPolicy:
    """What `tandem serve --planner sla` builds from a profile file, with this machine's prefill time and the
    targets the test judges by."""
    slo = {"ttft_ms": cal.ttft_s * 1e3, "tpot_ms": 1000.0}
    return SlaPolicy(_profile(cal.prefill_s), replace(policy_config(config, 3), slo=slo))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    profile = tmp_path_factory.mktemp("planner") / "profile.json"
    save_profile(_profile(1.0), profile)  # the server's start needs one; replaced once the machine is measured
    with serve(
        "",
        **{
            "both.kv_cache_memory": "128MiB",
            # one thread per worker, as the calibration assumes: with core sharing (the CPU default) the one
            # prefill worker already prefills on the decode worker's idle core, so on 2 cores a second one
            # adds no compute, and 3 workers on 2 cores share none (worker_core/core_share.py)
            "prefill.borrow_idle_cores": False,
            "decode.lend_core_tpot_ms": 0.0,
            # the fixed placement: the load step must reach the prefill pool the planner sizes, not be relieved
            # by local prefills on the decode worker (placement by SLO, on by default)
            "router.slo_ttft_ms": 0.0,
            "router.slo_itl_ms": 0.0,
            "planner.mode": "sla",
            "planner.profile": str(profile),
            "planner.slo": "ttft_ms=5000,tpot_ms=1000",  # replaced once the machine is measured (_policy)
            "planner.interval_s": 3600.0,  # the test runs the intervals itself
            "planner.max_workers": 3,
            "planner.cooldown_s": 0.0,
            "planner.down_after": 2,
            "planner.drain_timeout_s": 120.0,
        },
    ) as s:
        yield s


class CountingTarget(GrpcTarget):
    """The bench's gRPC target; sets `reached` when the n-th request has been sent."""

    def __init__(self, address: str, n: int) -> None:
        super().__init__(address)
        self.sent = 0
        self.n = n
        self.reached = asyncio.Event()

    async def send(self, request: WireRequest, record: RequestRecord, clock):
        self.sent += 1
        if self.sent >= self.n:
            self.reached.set()
        return await super().send(request, record, clock)


def _pools(cluster) -> tuple[int, int]:
    return len(cluster.cluster.pool_workers("prefill")), len(cluster.cluster.pool_workers("decode"))


def _attainment(records: list[RequestRecord], cal: Calibration) -> float:
    return sum(r.ttft_s is not None and r.ttft_s <= cal.ttft_s for r in records) / len(records)


def _table(records: list[RequestRecord], joined_s: float, cal: Calibration) -> str:
    head = f"prefill alone {cal.prefill_s:.2f} s, rate {cal.rate:.2f} req/s, TTFT target {cal.ttft_s:.2f} s"
    rows = [
        f"{r.arrival_s - joined_s:+7.1f}s ttft {r.ttft_s or -1:6.2f}s {r.prefill_worker} {r.status}" for r in records
    ]
    return "\n".join([head, "arrival after the join", *rows])


def _calibrate(cluster) -> Calibration:
    """The median TTFT of prompts sent one at a time: one prefill worker's time per prompt, here and now."""
    rng = random.Random(5)
    client = TandemClient(cluster.address)
    try:
        ttfts = []
        for _ in range(4):
            ids = [rng.randrange(3, VOCAB) for _ in range(PROMPT)]
            t0 = time.perf_counter()
            stream = client.generate(token_ids=ids, max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)
            next(iter(stream))
            ttfts.append(time.perf_counter() - t0)
            for _ in stream:
                pass
    finally:
        client.close()
    return Calibration(statistics.median(ttfts[1:]))  # the first is the model's warm-up


async def _overload_then_recover(cluster, cal: Calibration) -> tuple[list, list[RequestRecord], float, float]:
    """(planner decisions, every request's record, load clock when the planner's interval began, ... when the
    added worker was serving)."""
    dataset = build_dataset(
        "random", DatasetOptions(input_len=PROMPT, output_len=OUTPUT, spread=0.0), PromptMaker(vocab_size=VOCAB), 7
    )
    target = CountingTarget(cluster.address, ARRIVALS_BEFORE_STEP)
    await target.open()
    # arrivals are seeded (the same times on every run): enough for the overload, a worker's start and the
    # recovery window with AFTER prefill times of arrivals in it
    total = ARRIVALS_BEFORE_STEP + int(cal.rate * (WORKER_START_S + (RECOVERY + AFTER) * cal.prefill_s))
    load = asyncio.create_task(run_load(target, dataset, LoadConfig(rate=cal.rate, num_requests=total, seed=11)))
    t0 = time.perf_counter()  # run_load's clock starts within a millisecond of this
    await target.reached.wait()
    stepped = time.perf_counter() - t0
    decisions = await asyncio.to_thread(cluster.on_router, lambda _svc: cluster.admin.planner.step(), 600)
    joined = time.perf_counter() - t0
    result = await load
    await target.close()
    return decisions, result.records, stepped, joined


def test_overload_adds_a_prefill_worker_and_ttft_attainment_recovers(cluster):
    loop = cluster.admin.planner
    assert loop is not None and _pools(cluster) == (1, 1)
    cal = _calibrate(cluster)
    loop.policy = _policy(cal, cluster.cluster.config)
    loop.slo = loop.policy.config.slo
    cluster.on_router(lambda _svc: loop.mark())
    decisions, records, stepped, joined = asyncio.run(_overload_then_recover(cluster, cal))

    adds = [d for d in decisions if d.action == "add"]
    assert adds and adds[0].pool == "prefill", [(d.action, d.pool, d.reason) for d in decisions]
    assert adds[0].inputs["rate"] == pytest.approx(cal.rate, rel=0.5)
    assert _pools(cluster) == (2, 1)
    new = cluster.cluster.pool_workers("prefill")[-1].worker_id

    table = _table(records, joined, cal)
    assert all(r.ok and r.n_output == OUTPUT for r in records), table  # nothing lost or failed
    before = [r for r in records if stepped <= r.arrival_s < joined]
    after = [r for r in records if r.arrival_s >= joined + RECOVERY * cal.prefill_s]
    assert len(before) >= 5 and len(after) >= 15, table
    # the overload was real: the arrivals while the planner added the worker missed the target
    assert _attainment(before, cal) < 0.5, table
    # and attainment recovered within RECOVERY prefill times of the added worker serving, which took its share
    # (0.8, not 0.9: on a host running torch's ops (no AVX-512, before the AVX2 kernels) the recovered pair ran near
    # saturation and one Poisson burst cost a full-suite run 7 of 56 arrivals: docs/BENCHMARKS.md)
    assert _attainment(after, cal) >= RECOVERED, table
    assert sum(r.prefill_worker == new for r in after) >= len(after) // 4, table
    print(  # shown with pytest -rP: the figures docs/BENCHMARKS.md quotes
        f"{table.splitlines()[0]}; worker joined {joined - stepped:.1f} s after the interval; TTFT attainment "
        f"{_attainment(before, cal):.0%} of the {len(before)} arrivals while it started, "
        f"{_attainment(after, cal):.0%} of {len(after)} arriving {RECOVERY * cal.prefill_s:.0f} s or more after"
    )

    # the step down: no load; the planner removes the added worker after `down_after` intervals, draining it
    for _ in range(12):
        cluster.on_router(lambda _svc: loop.step(), timeout_s=600)
        if _pools(cluster) == (1, 1):
            break
    assert _pools(cluster) == (1, 1)
    assert [d.pool for d in loop.applied if d.action == "remove"] == ["prefill"]
    cluster.cluster.check_pools()
