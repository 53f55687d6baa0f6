"""deploy/cluster.py: Cluster.rejoin_worker (a worker Ray restarted handshakes its peers again) against fake
actors that keep the peers a worker knows, as the real worker does (worker_core/rank_kv.py): a rejoin that
failed part way can be repeated, and an admin removal never interleaves with a rejoin."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest
import ray

from deploy.cluster import Cluster, WorkerHandle
from deploy.config import ServeConfig


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return lambda: self.fn(*args)


class FakeWorker:
    """The actor calls rejoin_worker / remove_worker make, with the worker's peer bookkeeping. A handshake
    names the worker and its process; adding a peer known under the same name with another process's
    handshake is refused, as NIXL refuses (NIXL_ERR_NOT_ALLOWED) loading a new process's metadata under an
    agent name it still holds (the same metadata twice it accepts)."""

    def __init__(self, wid: str) -> None:
        self.wid = wid
        self.known: dict[str, str] = {}  # peer name -> the handshake added
        self.incarnation = "1"  # its process, as WorkerStatus.incarnation reports it
        self.calls: list[tuple[str, str]] = []  # (method, argument) of every add_peer / remove_peer
        self.fail_handshakes = 0  # the next n handshake_payload calls raise (a peer erroring part way)
        self.gate: threading.Event | None = None  # set: handshake_payload waits for it
        self.entered = threading.Event()
        for name in ("ready", "handshake_payload", "add_peer", "remove_peer", "shutdown"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def _ready(self):
        return SimpleNamespace(incarnation=self.incarnation)

    def _handshake_payload(self) -> str:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail_handshakes:
            self.fail_handshakes -= 1
            raise RuntimeError(f"{self.wid}: handshake failed (test)")
        return f"{self.wid}#{self.incarnation}"

    def _add_peer(self, payload: str) -> str:
        name = payload.split("#")[0]
        self.calls.append(("add_peer", name))
        if self.known.get(name, payload) != payload:
            raise RuntimeError(f"{self.wid}: NIXL_ERR_NOT_ALLOWED loading {payload!r}")
        self.known[name] = payload
        return name

    def _remove_peer(self, name: str) -> bool:
        self.calls.append(("remove_peer", name))
        return self.known.pop(name, None) is not None

    @property
    def peers(self) -> set[str]:
        return set(self.known)

    def _shutdown(self) -> None:
        return None


@pytest.fixture
def fake_ray(monkeypatch):
    killed = threading.Event()

    def get(refs, timeout=None):
        return [r() for r in refs] if isinstance(refs, list) else refs()

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor: killed.set())
    return killed


def _actor(w: FakeWorker) -> ray.actor.ActorHandle[Any]:
    """The fake in the place of the worker's Ray actor handle: it answers `handle.method.remote(...)` as one."""
    return cast("ray.actor.ActorHandle[Any]", w)


def _cluster(prefill: list[FakeWorker], decode: list[FakeWorker]) -> Cluster:
    c = Cluster(ServeConfig())
    c.prefill = [WorkerHandle(w.wid, "prefill", _actor(w)) for w in prefill]
    c.decode = [WorkerHandle(w.wid, "decode", _actor(w)) for w in decode]
    return c


def test_a_rejoin_that_failed_part_way_succeeds_when_repeated(fake_ray) -> None:
    """p0's first rejoin handshakes d0, then fails at d1; before the next try d0 restarts too. The retry
    must not trip over the handshake of d0's old process that p0 still holds."""
    p0, d0, d1 = FakeWorker("prefill-0"), FakeWorker("decode-0"), FakeWorker("decode-1")
    c = _cluster([p0], [d0, d1])
    d0.known["prefill-0"] = d1.known["prefill-0"] = "prefill-0#0"  # the dead process's agent, same name
    d1.fail_handshakes = 1
    with pytest.raises(RuntimeError, match="handshake failed"):
        c.rejoin_worker("prefill-0")  # d0 done, d1 not: the router tries again on its next health check
    assert p0.known == {"decode-0": "decode-0#1"}
    d0.incarnation, d0.known = "2", {}  # Ray restarted d0 meanwhile
    c.rejoin_worker("prefill-0")
    assert p0.known == {"decode-0": "decode-0#2", "decode-1": "decode-1#1"}
    assert d0.known == d1.known == {"prefill-0": "prefill-0#1"}


def test_a_process_already_rejoined_is_left_alone(fake_ray) -> None:
    """Two health checks both saw the restart: the second rejoin must not make the peers drop the agents of
    a worker that is serving again; a later restart (a new incarnation) rejoins again."""
    p0, d0 = FakeWorker("prefill-0"), FakeWorker("decode-0")
    c = _cluster([p0], [d0])
    c.rejoin_worker("prefill-0")
    assert d0.calls == [("remove_peer", "prefill-0"), ("add_peer", "prefill-0")]
    d0.calls.clear()
    c.rejoin_worker("prefill-0")
    assert d0.calls == [] and d0.peers == {"prefill-0"}
    p0.incarnation, p0.known = "2", {}  # Ray restarted it again
    c.rejoin_worker("prefill-0")
    assert d0.calls == [("remove_peer", "prefill-0"), ("add_peer", "prefill-0")] and p0.peers == {"decode-0"}


def test_a_removal_waits_for_a_rejoin_in_progress(fake_ray) -> None:
    """Without the lock: the removal makes d0 forget p0 while the rejoin waits on d0, and the rejoin then
    adds the removed worker's agent back to d0, where nothing ever removes it."""
    killed = fake_ray
    p0, d0 = FakeWorker("prefill-0"), FakeWorker("decode-0")
    c = _cluster([p0], [d0])
    d0.gate = threading.Event()
    rejoin = threading.Thread(target=c.rejoin_worker, args=("prefill-0",))
    rejoin.start()
    assert d0.entered.wait(10)  # the rejoin is waiting on d0's handshake
    remove = threading.Thread(target=c.remove_worker, args=("prefill-0",))
    remove.start()
    assert not killed.wait(0.5), "the removal went ahead in the middle of the rejoin"
    d0.gate.set()
    rejoin.join(10)
    remove.join(10)
    assert not rejoin.is_alive() and not remove.is_alive() and killed.is_set()
    assert "prefill-0" not in d0.peers and c.prefill == []
    with pytest.raises(KeyError, match="no worker 'prefill-0'"):
        c.rejoin_worker("prefill-0")  # removed: nothing to rejoin, no peer touched
    assert d0.peers == set()
