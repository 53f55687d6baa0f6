"""CoreShare: a worker widens onto the cores of idle workers on the host, and only those, or of a busy peer
that pauses for it within its requests' TPOT budget (LendBudget)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.helpers.fake_time import FakeTime
from worker_core.core_share import LEND_HORIZON_TOKENS, LEND_SAFETY, SLOTS, CoreShare, LendBudget


@pytest.fixture
def table(tmp_path):
    return tmp_path / "cores"


def _live_pids(n: int):
    """Real processes to stand for other workers (a slot of a dead pid counts for nothing)."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(n)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def pids():
    yield from _live_pids(2)


def test_a_worker_widens_only_onto_idle_peers(table, pids):
    p, d = CoreShare(1, table, cpus=2, pid=pids[0]), CoreShare(1, table, cpus=2, pid=pids[1])
    assert p.slot != d.slot
    assert p.threads(busy=True) == 2  # d registered idle: its core is free
    assert d.threads(busy=True) == 1  # p is busy now: d keeps its own
    assert p.threads(busy=True) == 1  # and p is back at its base while d works
    d.threads(busy=False)
    assert p.threads(busy=True) == 2
    assert p.threads(busy=False) == 1  # idle: base (it runs nothing)
    d.close()
    assert p.threads(busy=True) == 2  # a closed slot: that core is nobody's
    p.close()


def test_busy_peers_counts_the_others_stepping_not_idle_or_lending_ones(table):
    gen = _live_pids(3)
    pids = next(gen)
    me, a, b = (CoreShare(1, table, cpus=4, pid=pid) for pid in pids)
    assert me.busy_peers() == 0
    a.threads(busy=True)
    me.threads(busy=True)  # this worker's own state is not a neighbour's
    assert me.busy_peers() == 1 and a.busy_peers() == 1
    b.threads(busy=True)
    assert me.busy_peers() == 2
    b.widen(wait_s=0.0)
    a.lend(0.0)  # a zero budget: no pause
    assert me.busy_peers() == 2
    a.threads(busy=False)
    assert me.busy_peers() == 1
    b.close()
    assert me.busy_peers() == 0
    me.close()
    assert me.busy_peers() == 0  # a closed slot reads nothing
    a.close()
    next(gen, None)  # kills the stand-in processes


def test_never_more_than_the_host_and_unclaimed_cores_count(table, pids):
    alone = CoreShare(2, table, cpus=8, pid=pids[0])
    assert alone.threads(True) == 8  # nobody claims the other 6
    peer = CoreShare(4, table, cpus=8, pid=pids[1])
    peer.threads(True)
    assert alone.threads(True) == 4  # 8 - its own 2 - the busy peer's 4 = 2 unclaimed
    over = CoreShare(1, table, cpus=1, pid=os.getpid())  # more bases than cores: never below base
    assert over.threads(True) == 1
    for s in (alone, peer, over):
        s.close()


def test_nobody_widens_on_a_host_whose_workers_already_claim_every_core(table, pids):
    gen = _live_pids(1)
    [third] = next(gen)
    p0, p1 = CoreShare(1, table, cpus=2, pid=pids[0]), CoreShare(1, table, cpus=2, pid=pids[1])
    assert p0.threads(True) == 2  # two workers on two cores: the idle one's core is free
    d = CoreShare(1, table, cpus=2, pid=third)  # a third worker joins (the planner added one): 3 bases, 2 cores
    d.offer(True)
    d.threads(busy=True)
    t = FakeTime(100.0)
    p0.clock, p0.sleep = t.clock, t.sleep
    assert p0.widen(wait_s=1.0) == 1 and t.sleeps == 0  # p1 idle, d may lend: still one thread, and no waiting
    assert not d.peer_wants()
    for s in (p0, p1, d):
        s.close()
    next(gen, None)


def test_a_dead_workers_slot_is_reused_and_lends_nothing(table):
    gen = _live_pids(1)
    [pid] = next(gen)
    dead = CoreShare(1, table, cpus=2, pid=pid)
    slot = dead.slot
    dead.threads(True)  # it dies busy, without closing its slot
    next(gen, None)  # kills it
    me = CoreShare(1, table, cpus=2, pid=os.getpid())
    assert me.slot == slot  # the dead process's slot
    assert me.threads(True) == 2
    me.close()


def test_the_table_fills_up_with_a_clear_error(table, pids):
    from worker_core.core_share import _SLOT

    table.write_bytes(b"".join(_SLOT.pack(pids[i % 2], 1, 1, 0) for i in range(SLOTS)))  # every slot: a live process
    with pytest.raises(RuntimeError, match="all 64 worker slots are taken by live processes"):
        CoreShare(1, table, cpus=2, pid=os.getpid())


def test_a_widening_worker_waits_for_a_busy_peer_that_may_lend(table, pids):
    lending = threading.Event()
    p = CoreShare(1, table, cpus=2, pid=pids[0], sleep=lambda s: lending.wait(30))  # waits for d's pause
    real_sleep = threading.Event().wait

    def d_sleep(s: float) -> None:  # d polls inside its pause: p may go on now
        lending.set()
        real_sleep(s)

    d = CoreShare(1, table, cpus=2, pid=pids[1], sleep=d_sleep)
    d.threads(busy=True)
    d.offer(True)
    assert not d.peer_wants()
    pause = threading.Thread(target=lambda: d.lend(30.0))
    p._write(1, 1)  # WANT up before d looks, as widen() does first
    pause.start()
    assert p.widen(wait_s=30.0) == 2  # d paused: its core is p's for this step
    assert d.peer_wants()
    p.threads(busy=True)  # p's next step is narrow: WANT drops, d's pause ends
    pause.join(30)
    assert not pause.is_alive() and d.lent_s > 0
    assert p.threads(busy=True) == 1  # d is stepping again
    p.close()
    d.close()


def test_nobody_lends_in_time_the_step_stays_narrow_and_asks_no_pause(table, pids):
    t = FakeTime(100.0)
    p = CoreShare(1, table, cpus=2, pid=pids[0], clock=t.clock, sleep=t.sleep)
    d = CoreShare(1, table, cpus=2, pid=pids[1])
    d.threads(busy=True)
    d.offer(True)
    assert p.widen(wait_s=0.1) == 1
    assert 0.1 <= t.now - 100.0 < 0.11  # it waited its bound, polling
    assert not d.peer_wants()  # a step on one core: nobody should pause for it
    d.offer(False)
    t.sleeps = 0
    assert p.widen(wait_s=0.1) == 1 and t.sleeps == 0  # a peer that may not lend is not waited for
    p.close()
    d.close()


def test_an_idle_peer_is_borrowed_at_once_and_a_pause_is_bounded(table, pids):
    t = FakeTime(100.0)
    p = CoreShare(1, table, cpus=2, pid=pids[0])
    d = CoreShare(1, table, cpus=2, pid=pids[1], clock=t.clock, sleep=t.sleep)
    assert d.lend(5.0) == 0.0  # nobody wants: no pause
    assert p.widen() == 2  # d idle: no waiting
    d.threads(busy=True)  # d gets work during p's widened step
    assert d.peer_wants()
    assert d.lend(0.5) == pytest.approx(0.5, abs=0.002)  # p never drops WANT: the pause ends at its bound
    assert d.lend(5.0, stop=lambda: True) == 0.0  # a command for d's engine ends it at once
    assert p.widen() == 1  # d back at work, not lending: p stays narrow
    p.close()
    d.close()


def test_lend_budget_golden_cases():
    b = LendBudget(tpot_s=0.2, min_s=1.0)
    assert b.allowed(10.0, []) == 0.0  # nothing running: nothing to protect, but no reason to pause either
    b.observe(0.04, 0, 1)
    b.observe(5.0, 512, 1)  # a step with a prefill chunk says nothing about decode steps
    assert b.step_s == 0.04
    b.observe(0.09, 0, 3)
    assert b.step_s == pytest.approx(0.8 * 0.04 + 0.2 * 0.09)
    b.step_s = 0.04
    # 10 tokens out of 128 after 0.5 s: slack = 0.2 * 127 - 0.5 - 118 * 0.04 = 20.18 s
    assert b.allowed(10.5, [(10.0, 10, 128)]) == pytest.approx(LEND_SAFETY * 20.18)
    # the tightest request decides: 100 of 128 after 17 s: 0.2 * 127 - 17 - 28 * 0.04 = 7.28 s
    assert b.allowed(27.0, [(26.5, 10, 128), (10.0, 100, 128)]) == pytest.approx(LEND_SAFETY * 7.28)
    # a long max_tokens counts only the horizon: end = 10 + LEND_HORIZON_TOKENS
    end = 10 + LEND_HORIZON_TOKENS
    assert b.allowed(10.5, [(10.0, 10, 4096)]) == pytest.approx(
        LEND_SAFETY * (0.2 * (end - 1) - 0.5 - (end - 10) * 0.04)
    )
    assert b.allowed(31.0, [(10.0, 10, 128)]) == 0.0  # 25.4 - 21 - 4.72 < 0: behind its target, never negative
    assert b.allowed(10.5, [(10.0, 10, 128), (10.4, 0, 128)]) == 0.0  # a request waiting for its first token
    assert b.allowed(10.5, [(10.0, 128, 128)]) == 0.0  # finishing: no constraint, and nothing else runs
    with pytest.raises(ValueError, match="TPOT target must be > 0"):
        LendBudget(0.0)


def test_the_slack_a_lender_reports_to_the_router():
    b = LendBudget(tpot_s=0.2)
    b.step_s = 0.04
    assert b.slack(10.0, []) == float("inf")  # nothing runs: nothing limits a local prefill
    # the same tightest request as above; one waiting for its first token has no TPOT clock and is left out
    # (it forbids a pause, not a prefill queued behind its own)
    assert b.slack(27.0, [(26.5, 10, 128), (10.0, 100, 128), (26.9, 0, 128)]) == pytest.approx(7.28)
    assert b.slack(31.0, [(10.0, 10, 128)]) == pytest.approx(25.4 - 21 - 4.72)  # behind its target: negative
