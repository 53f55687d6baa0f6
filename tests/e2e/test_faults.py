"""Fault injection against a running cluster (real Ray actors, NIXL, gRPC): workers killed at chosen
steps, the KV transport failing, stalling or late, leases expiring, workers restarted by Ray.

Every scenario is timed by the cluster itself, never by sleeps: a worker's fault plan
(worker_core/faults.py) holds a request at a chosen point, the test sees it held
(`fault_reached`), then kills a worker or releases the hold. Each ends with the outcome checked
(tokens equal the reference model's, or the documented status), the number of retries the
router reports, and every live worker idle with its pools intact (`_pools_intact`). Workers
killed in "restart" mode come back through Ray and rejoin (re-handshake) before the next test.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
import ray

from kv_transfer.faulty import FaultPlan
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy
from worker_core.faults import FaultPoint, Hold, WorkerFaultPlan

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
BS = 4
LEASE_S = 5.0  # short, so that the lease-bound pull test ends in seconds
WAIT_S = 60.0
IDLE_S = 3.0  # router.stream_idle_timeout_s: a decode stream silent this long is retried elsewhere


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with serve(
        str(tiny_dir),
        ray_namespace="tandem-faults",
        fault_injection=True,
        **{
            "both.block_size": BS,
            "prefill.replicas": 2,
            "decode.replicas": 2,
            "transport.lease_s": LEASE_S,
            "transport.transfer_timeout_s": 120,  # the lease bounds pulls
            "router.failover_wait_s": WAIT_S,
            "router.stream_idle_timeout_s": IDLE_S,
        },
    ) as s:
        yield s


# ---- helpers ------------------------------------------------------------------------------------------------------


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


class Stream:
    """One Generate call on its own thread; responses arrive on a queue as the client gets them."""

    def __init__(self, client: TandemClient, ids: list[int], max_tokens: int, **kw) -> None:
        self.responses: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None

        def run() -> None:
            try:
                for r in client.generate(token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw):
                    self.responses.put(r)
            except grpc.RpcError as e:
                self.error = e
            self.responses.put(None)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def next(self):
        return self.responses.get(timeout=WAIT_S)

    def rest(self) -> list:
        out = []
        while (r := self.next()) is not None:
            out.append(r)
        self.thread.join(WAIT_S)
        return out


def _tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def _actor(s, wid: str):
    return s.cluster.handle(wid).actor


def _arm(s, wids, plan: WorkerFaultPlan) -> None:
    ray.get([_actor(s, w).set_fault_plan.remote(plan) for w in wids], timeout=WAIT_S)


def _held(s, wids, point: FaultPoint) -> str:
    """The worker among `wids` where a request is now held at `point`."""
    refs = {_actor(s, w).fault_reached.remote(point.value, WAIT_S): w for w in wids}
    ready, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
    assert ready and ray.get(ready[0]), f"no request reached {point.value} on {wids}"
    return refs[ready[0]]


def _disarm(s, wids) -> None:
    _arm(s, wids, WorkerFaultPlan())


def _start_held(s, wids, hold: Hold, ids: list[int], max_tokens: int) -> tuple[Stream, str]:
    """Arm `hold` on every worker of `wids`, start a stream and return it with the worker it is held
    on; the others are disarmed again, so that the request's retry is not held too."""
    _arm(s, wids, WorkerFaultPlan(holds=(hold,)))
    stream = Stream(TandemClient(s.address), ids, max_tokens)
    held = _held(s, wids, hold.point)
    _disarm(s, [w for w in wids if w != held])
    return stream, held


def _kill(s, wid: str) -> str:
    """Kill `wid`'s process (Ray restarts it); returns the incarnation the router had taken into service."""
    pool = _pool_name(wid)
    before = s.on_router(lambda svc: getattr(svc, pool).slot(wid).incarnation)
    assert before, f"the router knows no incarnation of {wid}"
    ray.kill(_actor(s, wid), no_restart=False)
    return before


def _restarted_and_rejoined(s, wid: str, before: str) -> None:
    """Wait for Ray to bring `wid` back, then run the router's health check: the new process is
    re-handshaken and taken back into its pool. (Ray refuses calls while the actor restarts, so
    this polls the restart: the one wait here on another process's progress.)"""
    _seen_down(s, wid, before)  # ray.kill returns at once: until the router saw it die, the old process may answer
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            ray.get(_actor(s, wid).ready.remote(), timeout=WAIT_S)
            break
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline, f"{wid} was not restarted within {WAIT_S} s"
            time.sleep(0.2)
    s.on_router(lambda svc: svc.refresh_health(), timeout_s=WAIT_S)
    assert s.on_router(lambda svc: svc.wait_rejoins(WAIT_S), timeout_s=WAIT_S + 5)
    pool = _pool_name(wid)
    assert s.on_router(lambda svc: getattr(svc, pool).healthy(wid)), f"{wid} did not rejoin"


def _kill_held(s, reference, wids, hold: Hold, ids: list[int], max_tokens: int) -> tuple[list, str, str]:
    """Start a stream held at `hold` on one of `wids`, kill that worker (Ray restarts it), and return the
    stream's responses, checked (no error, tokens equal to the reference model's), and the worker."""
    stream, victim = _start_held(s, wids, hold, ids, max_tokens)
    before = _kill(s, victim)
    got = stream.rest()
    assert stream.error is None, stream.error
    assert _tokens_of(got) == hf_greedy(reference, ids, max_tokens)
    return got, victim, before


def _pool_name(wid: str) -> str:
    return "prefill" if wid.startswith("prefill") else "decode"


def _seen_down(s, wid: str, before: str) -> None:
    """Until the router has seen process `before` of `wid` go: marked down (its KV event feed's long poll
    failed), or already taken the restarted process into service (the periodic health check can do both
    before the test looks). No sleep."""
    pool = _pool_name(wid)

    def gone(svc) -> bool:
        slot = getattr(svc, pool).slot(wid)
        return not slot.healthy or slot.incarnation != before

    s.on_router(lambda svc: svc.feed.wait_until(lambda: gone(svc), WAIT_S), timeout_s=WAIT_S + 5)


@contextmanager
def _only(s, wid: str):
    """Route every new request of `wid`'s pool to it (the others draining) for the block."""
    pool = _pool_name(wid)

    def drain(svc, on: bool):
        for slot in getattr(svc, pool).slots:
            if slot.worker_id != wid:
                slot.draining = on

    s.on_router(lambda svc: drain(svc, True))
    try:
        yield
    finally:
        s.on_router(lambda svc: drain(svc, False))


def _pools_intact(s, dead: tuple[str, ...] = ()) -> None:
    """Every live worker idle (no request, lease or transfer) with its block pool intact, leak-free."""
    live = [h for h in s.cluster.workers if h.worker_id not in dead]
    assert all(ray.get([h.actor.wait_idle.remote(30) for h in live], timeout=WAIT_S))
    ray.get([h.actor.leak_check.remote() for h in live], timeout=WAIT_S)
    assert s.on_router(lambda svc: svc.wait_idle(30), timeout_s=40)  # the router's side: handlers and cleanups done
    assert s.on_router(lambda svc: svc.router.open_tickets) == 0


def _greedy(s, ids: list[int], n: int):
    responses = list(TandemClient(s.address).generate(token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True))
    return _tokens_of(responses), responses


PREFILL = ("prefill-0", "prefill-1")
DECODE = ("decode-0", "decode-1")


# ---- workers killed -----------------------------------------------------------------------------------------------


def test_prefill_worker_killed_mid_prefill_is_retried_on_another(cluster, reference):
    s = cluster
    got, victim, before = _kill_held(s, reference, PREFILL, Hold(FaultPoint.PREFILL), _tokens(30, 1), 10)
    assert got[0].prefill_worker != victim and got[-1].retries == 1
    _restarted_and_rejoined(s, victim, before)
    with _only(s, victim):  # the restarted process serves: D pulls from its new NIXL agent
        tokens, responses = _greedy(s, _tokens(20, 2), 6)
    assert responses[0].prefill_worker == victim and tokens == hf_greedy(reference, _tokens(20, 2), 6)
    _pools_intact(s)


def test_prefill_worker_killed_mid_transfer_resumes_after_token_one(cluster, reference):
    """Token 1 reached the client; D is about to pull when P dies. The pull fails, D frees its blocks,
    and the router resumes after token 1 (prefilled again as prompt + token 1 elsewhere)."""
    s = cluster
    ids = _tokens(30, 3)
    stream, held_on = _start_held(s, DECODE, Hold(FaultPoint.BEFORE_PULL), ids, 10)
    first = stream.next()
    victim = first.prefill_worker
    assert first.decode_worker == held_on and len(first.token_ids) == 1
    before = _kill(s, victim)
    _seen_down(s, victim, before)  # the process is gone (its KV feed's call failed), not just asked to go
    ray.get(_actor(s, held_on).release_faults.remote())
    got = [first, *stream.rest()]
    assert stream.error is None
    assert _tokens_of(got) == hf_greedy(reference, ids, 10)  # token 1 once, nothing missing
    assert got[-1].retries == 1
    _disarm(s, [held_on])
    _restarted_and_rejoined(s, victim, before)
    _pools_intact(s)


def test_decode_worker_killed_mid_stream_migrates(cluster, reference):
    """D dies after streaming some tokens: the request moves to the other D, prefilled as prompt +
    the tokens sent, and the client's stream goes on exactly as an undisturbed run."""
    s = cluster
    got, victim, before = _kill_held(s, reference, DECODE, Hold(FaultPoint.STREAM), _tokens(30, 4), 16)
    assert got[0].decode_worker == victim and got[-1].retries == 1
    assert got[-1].usage.completion_tokens == 16
    assert {r.request_id for r in got} == {got[0].request_id}
    _restarted_and_rejoined(s, victim, before)
    _pools_intact(s)


def test_the_only_decode_worker_dies_and_the_stream_waits_for_its_restart(cluster, reference):
    """No other D to move to: the retry waits (router.failover_wait_s) until Ray has restarted the
    worker and it has rejoined, then resumes on it."""
    s = cluster
    ids = _tokens(30, 5)
    victim = "decode-0"
    with _only(s, victim):
        _arm(s, [victim], WorkerFaultPlan(holds=(Hold(FaultPoint.STREAM),)))
        stream = Stream(TandemClient(s.address), ids, 12)
        assert _held(s, [victim], FaultPoint.STREAM) == victim
        before = _kill(s, victim)
        _restarted_and_rejoined(s, victim, before)
        got = stream.rest()
    assert stream.error is None
    assert _tokens_of(got) == hf_greedy(reference, ids, 12) and got[-1].retries == 1
    _pools_intact(s)


def test_deadline_ends_a_stuck_request_and_frees_everything(cluster):
    """A worker that holds a stream forever: the client's deadline ends the call with
    DEADLINE_EXCEEDED naming the stage, and the cleanup frees the request on every worker."""
    s = cluster
    _arm(s, DECODE, WorkerFaultPlan(holds=(Hold(FaultPoint.STREAM),)))  # both hold: the retry stalls too
    stream = Stream(TandemClient(s.address), _tokens(30, 6), 12, timeout=2 * IDLE_S + 2)
    held_on = _held(s, DECODE, FaultPoint.STREAM)
    got = stream.rest()
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(_tokens_of(got)) >= 1 and got[0].decode_worker == held_on
    _disarm(s, DECODE)
    _pools_intact(s)


def test_a_stalled_decode_worker_is_left_for_another(cluster, reference):
    """A worker that is alive but stops streaming (a hung engine): after router.stream_idle_timeout_s
    the request resumes on the other D; the stalled one is not marked down (only this request avoids it)."""
    s = cluster
    ids = _tokens(30, 13)
    stream, stalled = _start_held(s, DECODE, Hold(FaultPoint.STREAM), ids, 12)
    got = stream.rest()
    assert stream.error is None and _tokens_of(got) == hf_greedy(reference, ids, 12)
    assert got[0].decode_worker == stalled and got[-1].retries == 1
    assert s.on_router(lambda svc: svc.decode.healthy(stalled))
    _disarm(s, [stalled])
    _pools_intact(s)


# ---- the transport fails, stalls, is late -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, plan, retries",
    [
        (21, FaultPlan(fail_polls=frozenset({1})), 1),  # the READ completes with an error
        (22, FaultPlan(fail_submits=frozenset({1})), 1),  # the READ is refused at submit
        (23, FaultPlan(stall_polls=frozenset({1})), 1),  # never completes: the pull's deadline (lease-bound) ends it
        (24, FaultPlan(delay_polls=200), 0),  # late, but within the deadline: no retry
        (25, FaultPlan(fail_polls=frozenset({1, 2})), 2),  # from both prefill workers: the third attempt prefills on D
    ],
    ids=["fail", "refused", "stall", "late", "every-prefill-worker"],
)
def test_transport_faults(cluster, reference, seed, plan, retries):
    s = cluster
    ids = _tokens(26, seed)
    failures = s.on_router(lambda svc: svc.metrics.transfer_failures._value.get())
    with _only(s, "decode-1"):
        _arm(s, ["decode-1"], WorkerFaultPlan(transport=plan))
        try:
            tokens, responses = _greedy(s, ids, 8)
        finally:
            _disarm(s, ["decode-1"])
    assert tokens == hf_greedy(reference, ids, 8)
    assert responses[-1].retries == retries
    assert s.on_router(lambda svc: svc.metrics.transfer_failures._value.get()) == failures + retries
    _pools_intact(s)


def test_an_id_is_reusable_after_its_request_was_retried(cluster, reference):
    """The router's cleanup abort of a failed attempt reaches D after D's stream ended: D must not take
    it for an abort "before arriving" and refuse the next request that reuses the id (ids may be reused
    once their request has ended)."""
    s = cluster
    first_ids, again_ids = _tokens(30, 15), _tokens(30, 16)
    client = TandemClient(s.address)
    with _only(s, "decode-0"):
        _arm(s, ["decode-0"], WorkerFaultPlan(transport=FaultPlan(fail_polls={1})))
        try:
            first = list(
                client.generate(token_ids=first_ids, max_tokens=6, temperature=0.0, ignore_eos=True, request_id="same")
            )
        finally:
            _disarm(s, ["decode-0"])
        assert first[-1].retries == 1 and _tokens_of(first) == hf_greedy(reference, first_ids, 6)
        again = list(
            client.generate(token_ids=again_ids, max_tokens=6, temperature=0.0, ignore_eos=True, request_id="same")
        )
    assert _tokens_of(again) == hf_greedy(reference, again_ids, 6) and again[-1].retries == 0
    _pools_intact(s)


# ---- leases ---------------------------------------------------------------------------------------------------------


def test_a_lease_nobody_pulls_expires_and_frees_its_blocks(cluster):
    """P's side: a prompt prefilled for a decode worker that never pulls is released once its lease
    ends (the worker's clock is advanced through the call, not waited for)."""
    from common.sampling_params import SamplingParams

    s = cluster
    p = _actor(s, "prefill-0")
    result = ray.get(p.prefill.remote("orphan", _tokens(24, 9), SamplingParams(max_tokens=4, ignore_eos=True)))
    assert result.kv is not None and not ray.get(p.wait_idle.remote(0.1))  # the lease holds the blocks
    assert ray.get(p.reap_expired.remote(float("inf"))) == ["orphan"]
    _pools_intact(s)


# ---- a worker that stays dead -------------------------------------------------------------------------------------


def test_decode_worker_killed_for_good_mid_stream(cluster, reference):
    """Last in the module: the worker does not come back. The stream migrates, the worker stays down
    and every later request is served by the survivors."""
    s = cluster
    ids = _tokens(30, 10)
    stream, victim = _start_held(s, DECODE, Hold(FaultPoint.STREAM), ids, 12)
    survivor = next(w for w in DECODE if w != victim)
    ray.kill(_actor(s, victim))
    got = stream.rest()
    assert stream.error is None and _tokens_of(got) == hf_greedy(reference, ids, 12) and got[-1].retries == 1
    s.on_router(lambda svc: svc.refresh_health(), timeout_s=WAIT_S)
    assert not s.on_router(lambda svc: svc.decode.healthy(victim))
    for seed in (11, 12):
        tokens, responses = _greedy(s, _tokens(20, seed), 6)
        assert tokens == hf_greedy(reference, _tokens(20, seed), 6) and responses[0].decode_worker == survivor
    _pools_intact(s, dead=(victim,))


# ---- aggregated mode ------------------------------------------------------------------------------------------------


def test_aggregated_worker_killed_mid_stream_migrates(tiny_dir, reference):
    """Aggregated mode has no prefill pool: the request resumes on the other worker with generate(prior)."""
    with serve(
        str(tiny_dir),
        mode="aggregated",
        ray_namespace="tandem-faults-agg",
        fault_injection=True,
        **{"both.block_size": BS},
    ) as s:
        workers = tuple(h.worker_id for h in s.cluster.workers)
        got, victim, before = _kill_held(s, reference, workers, Hold(FaultPoint.STREAM), _tokens(30, 14), 14)
        assert got[0].decode_worker == victim and got[-1].retries == 1
        _restarted_and_rejoined(s, victim, before)
        _pools_intact(s)
