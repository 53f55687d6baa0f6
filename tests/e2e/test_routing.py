"""KV-aware routing on the served cluster: real Ray actors, real KV events, real gRPC (tiny random llama).

- prefix affinity: a prompt that extends one already served goes to the prefill worker
  that holds its prefix (the index learnt it from that worker's KV events) and is
  served from that cache; tokens equal transformers
- conditional disaggregation: a prompt the decode worker already holds is prefilled
  there ("local: ..."), a long new one remotely; both equal transformers
- pools that grow and shrink: tandem.v1.Admin adds a prefill worker that then serves;
  removing a worker while a stream runs on it lets the stream finish (drain), then the
  worker is gone from the router, the cluster and its peers
- a dead worker: the feed marks it down and its index entries go; requests keep working
Every test ends with `check_pools()`: idle, block pools intact, no leaked block or lease.
"""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from common.block_hash import hash_full_blocks
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
NEW = 6
BS = 4


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with serve(
        str(tiny_dir), **{"both.block_size": BS, "prefill.replicas": 2, "router.conditional_prefill_threshold": 8}
    ) as s:
        yield s


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _greedy(client: TandemClient, ids: list[int], n: int = NEW):
    responses = list(client.generate(token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True))
    return [t for r in responses for t in r.token_ids], responses[0], responses[-1]


def _indexed(s, pool_role: str, worker: str, ids: list[int]) -> int:
    """Leading blocks of `ids` the router's index says `worker` holds (read on the router's loop)."""

    def read(service):
        ix = service.router.prefill if pool_role == "prefill" else service.router.decode
        return ix.indexer.find_matches(hash_full_blocks(ids, BS)).get(worker, 0)

    return s.on_router(read)


def _wait_indexed(s, pool_role: str, worker: str, ids: list[int], blocks: int) -> None:
    def wait(service):
        ix = service.router.prefill if pool_role == "prefill" else service.router.decode
        hashes = hash_full_blocks(ids, BS)
        return service.feed.wait_until(lambda: ix.indexer.find_matches(hashes).get(worker, 0) >= blocks, 60)

    s.on_router(wait, timeout_s=90)


def test_prefix_affinity_follows_kv_events(cluster, reference):
    client = TandemClient(cluster.address)
    base = _tokens(40, seed=1)  # 10 full blocks
    got, first, last = _greedy(client, base)
    assert got == hf_greedy(reference, base, NEW)
    owner = first.prefill_worker
    assert owner in ("prefill-0", "prefill-1") and first.route.startswith("remote: ")
    _wait_indexed(cluster, "prefill", owner, base, 10)  # the owner's KV events reached the router
    other = "prefill-1" if owner == "prefill-0" else "prefill-0"
    assert _indexed(cluster, "prefill", other, base) == 0

    longer = base + _tokens(20, seed=2)  # shares 10 blocks; 20 new tokens > threshold 8 on decode too
    got, first, last = _greedy(client, longer)
    assert got == hf_greedy(reference, longer, NEW)
    assert first.prefill_worker == owner, first.route
    assert last.usage.cached_tokens == 40  # P computed only the new part (its hit, not decode's)
    cluster.cluster.check_pools()


def test_conditional_disaggregation_prefills_locally_what_decode_holds(cluster, reference):
    client = TandemClient(cluster.address)
    ids = _tokens(33, seed=3)  # 8 full blocks + 1 token
    got, first, _ = _greedy(client, ids)
    assert got == hf_greedy(reference, ids, NEW) and first.route.startswith("remote: 33 uncached tokens")
    _wait_indexed(cluster, "decode", "decode-0", ids, 8)  # D committed the pulled prompt to its cache
    again = ids + _tokens(3, seed=4)  # on D: 36 tokens, 32 cached -> 4 uncached <= 8
    got, first, last = _greedy(client, again)
    assert got == hf_greedy(reference, again, NEW)
    assert first.prefill_worker == "" and first.decode_worker == "decode-0"
    assert first.route == "local: 4 uncached tokens on decode-0 <= threshold 8"
    assert last.usage.cached_tokens == 32 and last.timings.kv_transfer_s == 0.0
    cluster.cluster.check_pools()


def test_admin_adds_a_worker_and_drains_one_with_a_stream_on_it(cluster, reference):
    client = TandemClient(cluster.address)
    reply = client.add_workers("prefill", 1)
    assert list(reply.worker_ids) == ["prefill-2"] and reply.topology.startswith("3P")
    # the new worker serves: fresh prompts spread over every eligible prefill worker (ties break at random)
    seen = set()
    for seed in range(100, 130):
        ids = _tokens(24, seed)
        got, first, _ = _greedy(client, ids)
        assert got == hf_greedy(reference, ids, NEW)
        seen.add(first.prefill_worker)
        if "prefill-2" in seen:
            break
    assert "prefill-2" in seen

    # a long stream decoding on decode-0 while decode-1 is added and decode-0 is removed: it finishes
    assert list(client.add_workers("decode", 1).worker_ids) == ["decode-1"]
    ids = _tokens(30, seed=7)
    want = hf_greedy(reference, ids, 40)
    stream = client.generate(token_ids=ids, max_tokens=40, temperature=0.0, ignore_eos=True)
    first = next(stream)
    victim = first.decode_worker
    removal: dict = {}
    remover = threading.Thread(target=lambda: removal.update(reply=client.remove_worker(victim, 120)))
    remover.start()
    tokens = list(first.token_ids) + [t for r in stream for t in r.token_ids]
    remover.join(180)
    assert tokens == want
    assert removal["reply"].worker_id == victim and removal["reply"].drained
    info = client.server_info()
    assert victim not in {w.worker_id for w in info.workers}
    assert info.topology.startswith("3P") and "x 1D" in info.topology
    # what is left serves, and no worker knows the removed one as a peer any more
    ids = _tokens(24, seed=8)
    got, first, _ = _greedy(client, ids)
    assert got == hf_greedy(reference, ids, NEW) and first.decode_worker != victim
    cluster.cluster.check_pools()


def test_config_reload_grows_and_shrinks_the_pools(cluster, reference):
    """What SIGHUP does with `tandem serve --config F`: the pools follow the file's replicas."""
    from deploy.config import with_overrides

    cfg = cluster.cluster.config
    n = len(cluster.cluster.prefill)
    added, removed = cluster.on_router(
        lambda _: cluster.admin.apply_config(
            with_overrides(cfg, **{"prefill.replicas": n + 1, "decode.replicas": len(cluster.cluster.decode)})
        ),
        300,
    )
    assert len(added) == 1 and removed == [] and len(cluster.cluster.prefill) == n + 1
    added2, removed2 = cluster.on_router(
        lambda _: cluster.admin.apply_config(
            with_overrides(cfg, **{"prefill.replicas": n, "decode.replicas": len(cluster.cluster.decode)})
        ),
        300,
    )
    assert added2 == [] and removed2 == added  # the newest goes first
    client = TandemClient(cluster.address)
    assert {w.worker_id for w in client.server_info().workers if w.role == "prefill"} == {
        h.worker_id for h in cluster.cluster.prefill
    }
    ids = _tokens(24, seed=9)
    assert _greedy(client, ids)[0] == hf_greedy(reference, ids, NEW)
    cluster.cluster.check_pools()


def test_admin_cli(cluster, capsys):
    import json

    from deploy.cli import main

    assert main(["admin", "--server", cluster.address, "remove", "prefill-99"]) == 2
    err = capsys.readouterr().err.splitlines()  # Ray may forward worker log lines here too
    assert any(line.startswith("error: NOT_FOUND: no worker 'prefill-99'") for line in err), err
    n = len(cluster.cluster.prefill)
    assert main(["admin", "--server", cluster.address, "scale", "--pool", "prefill", "--replicas", str(n)]) == 0
    # Ray forwards worker log lines to this process's stdout as well: the reply is the one JSON line
    out = capsys.readouterr().out
    reply = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert reply["added"] == [] and reply["removed"] == [] and reply["topology"].startswith(f"{n}P")


def test_admin_refuses_bad_requests_clearly(cluster):
    client = TandemClient(cluster.address)
    with pytest.raises(grpc.RpcError) as e:
        client.remove_worker("prefill-99")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "prefill-99" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.add_workers("middle", 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill, decode" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.scale_pool("decode", 0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replicas" in e.value.details()
    decode = [w.worker_id for w in client.server_info().workers if w.role == "decode"]
    if len(decode) == 1:
        with pytest.raises(grpc.RpcError) as e:
            client.remove_worker(decode[0])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "last decode worker" in e.value.details()


def test_dead_prefill_worker_is_marked_down_and_forgotten(tiny_dir, reference):
    import ray

    # its own Ray namespace: the module's cluster holds the actor names meanwhile
    with serve(
        str(tiny_dir), ray_namespace="tandem-dead-worker", **{"both.block_size": BS, "prefill.replicas": 2}
    ) as s:
        client = TandemClient(s.address)
        owners = set()
        for seed in range(11, 41):  # fresh prompts cost the same everywhere: ties break at random
            owners.add(_greedy(client, _tokens(24, seed))[1].prefill_worker)
            if len(owners) == 2:
                break
        assert owners == {"prefill-0", "prefill-1"}
        s.on_router(
            lambda svc: svc.feed.wait_until(lambda: svc.router.prefill.indexer.num_blocks("prefill-1") > 0, 60),
            timeout_s=90,
        )
        victim = next(h for h in s.cluster.prefill if h.worker_id == "prefill-1")
        ray.kill(victim.actor)

        def down(service):
            return service.feed.wait_until(lambda: not service.prefill.healthy("prefill-1"), 60)

        s.on_router(down, timeout_s=90)
        assert s.on_router(lambda svc: svc.router.prefill.indexer.num_blocks("prefill-1")) == 0
        for seed in (21, 22, 23):
            ids = _tokens(24, seed)
            got, first, _ = _greedy(client, ids)
            assert got == hf_greedy(reference, ids, NEW) and first.prefill_worker == "prefill-0"
        workers = {w.worker_id: w for w in client.server_info().workers}
        assert workers["prefill-0"].health == "SERVING" and workers["prefill-1"].health == "UNKNOWN"
        survivors = [h for h in s.cluster.workers if h.worker_id != "prefill-1"]
        assert all(ray.get([h.actor.wait_idle.remote(30) for h in survivors]))
        ray.get([h.actor.leak_check.remote() for h in survivors])
