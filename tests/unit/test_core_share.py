"""CoreShare: a worker widens onto the cores of idle workers on the host, and only those."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker_core.core_share import SLOTS, CoreShare


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

    table.write_bytes(b"".join(_SLOT.pack(pids[i % 2], 1, 1) for i in range(SLOTS)))  # every slot: a live process
    with pytest.raises(RuntimeError, match="all 64 worker slots are taken by live processes"):
        CoreShare(1, table, cpus=2, pid=os.getpid())
