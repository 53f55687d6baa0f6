"""Worker pools: round_robin and least_loaded choices, health, in-flight counting, decision logs."""

from __future__ import annotations

import logging

import pytest

from router.errors import NoHealthyWorkerError
from router.pools import Candidate, Policy, WorkerPool
from tests.helpers.fake_workers import FakeWorker


def pool(n: int, policy: Policy | str) -> WorkerPool:  # choosing only reads worker_id; no calls are made
    return WorkerPool("decode", [FakeWorker(f"d{i}") for i in range(n)], policy)


def picks(p: WorkerPool, k: int) -> list[str]:
    return [p.choose()[0].worker_id for _ in range(k)]


def test_round_robin_cycles_and_skips_down_workers() -> None:
    p = pool(3, "round_robin")
    assert picks(p, 4) == ["d0", "d1", "d2", "d0"]
    p.set_health("d2", False)
    assert picks(p, 4) == ["d1", "d0", "d1", "d0"]
    p.set_health("d2", True)
    assert picks(p, 3) == ["d1", "d2", "d0"]


def test_round_robin_ignores_load() -> None:
    p = pool(2, Policy.ROUND_ROBIN)
    with p.track("d0"), p.track("d0"):
        assert picks(p, 2) == ["d0", "d1"]


def test_least_loaded_picks_fewest_in_flight_ties_by_index() -> None:
    p = pool(3, "least_loaded")
    assert picks(p, 2) == ["d0", "d0"]  # choosing alone does not count
    with p.track("d0"):
        assert p.choose()[0].worker_id == "d1"
        with p.track("d1"), p.track("d1"):
            assert p.choose()[0].worker_id == "d2"
            with p.track("d2"):
                assert p.choose()[0].worker_id == "d0"  # d0=1 d1=2 d2=1: tie -> lowest index
        p.set_health("d1", False)
        assert p.choose()[0].worker_id == "d2"  # d1 down: d0=1, d2=0
    assert [p.in_flight(f"d{i}") for i in range(3)] == [0, 0, 0]


def test_track_releases_on_error() -> None:
    p = pool(2, "least_loaded")
    with pytest.raises(RuntimeError), p.track("d1"):
        assert p.in_flight("d1") == 1
        raise RuntimeError("worker call failed")
    assert p.in_flight("d1") == 0


def test_all_down_is_unavailable() -> None:
    p = pool(2, "least_loaded")
    p.set_health("d0", False)
    p.set_health("d1", False)
    with pytest.raises(
        NoHealthyWorkerError, match="no healthy decode worker \\(2 of 2 down, 0 draining\\); retry later"
    ):
        p.choose()
    assert not p.healthy("d0")


def test_decision_explains_itself(caplog: pytest.LogCaptureFixture) -> None:
    p = pool(4, "least_loaded")
    p.set_health("d3", False)
    with p.track("d0"), p.track("d0"), p.track("d2"):
        with caplog.at_level(logging.DEBUG, logger="router.decisions"):
            client, decision = p.choose()
    assert client.worker_id == decision.chosen == "d1"
    assert decision.candidates == (
        Candidate("d0", 2, True),
        Candidate("d1", 0, True),
        Candidate("d2", 1, True),
        Candidate("d3", 0, False),
    )
    assert decision.describe() == "decode least_loaded: d0=2 d1=0 d2=1 (d3 down) -> d1"
    assert decision.describe() in caplog.messages


def test_bad_pools() -> None:
    with pytest.raises(ValueError, match="unknown router policy 'random' \\(allowed: kv, round-robin, least-loaded\\)"):
        pool(1, "random")
    with pytest.raises(ValueError, match="at least one worker"):
        WorkerPool("prefill", [])
    with pytest.raises(ValueError, match="must be distinct"):
        WorkerPool("prefill", [FakeWorker("p0"), FakeWorker("p0")])
    with pytest.raises(KeyError, match="no worker 'p9' in the decode pool"):
        pool(1, "round_robin").slot("p9")
    assert pool(1, "round_robin").set_health("p9", False) is False  # removed meanwhile: nothing to mark
