"""Heterogeneous topologies end to end: every prefill shape x every decode shape, token for token.

On a tiny random llama with 8 attention heads and 4 KV heads (4 layers), real Ray
actors (a worker of tp x pp ranks = its leader + tp*pp-1 rank actors in one placement
group, one gloo group), real NIXL, every pair of

    prefill  TP1 (bs16 NHD) | TP2 (bs16 NHD) | TP4 (bs32 NHD) | PP2 (bs16 HND) | TP2xPP2 (bs16 NHD)
    decode   TP1 (bs32 NHD) | TP2 (bs8 HND)  | PP2 (bs16 NHD)

(so block sizes 16 -> 32, 32 -> 8, 32 -> 16, ... and NHD <-> HND are among the pairs)
must give exactly the greedy tokens of one aggregated TP1 engine: token 1 sampled on P,
the rest on D after each D rank pulled its layers and heads from the P ranks holding
them. A prompt is sent twice to each pair so D's second pull starts after its own
prefix-cache hit. Afterwards every worker is idle, its pool intact, no block leaked.

The shapes also run through the whole served path (gRPC router, `--prefill-tp`-style
config keys) once, and a pair no conversion can bridge is refused at start-up.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import ray

from common.errors import ConfigError
from common.sampling_params import SamplingParams
from deploy.cluster import create_worker
from deploy.config import PoolConfig, ServeConfig, with_overrides
from deploy.topology import replace_pool
from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import engine_greedy

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
NEW = 8
PREFILL = {
    "P-tp1": dict(tp=1, block_size=16),
    "P-tp2": dict(tp=2, block_size=16),
    "P-tp4": dict(tp=4, block_size=32),
    "P-pp2": dict(pp=2, block_size=16, kv_order="HND"),
    "P-tp2pp2": dict(tp=2, pp=2, block_size=16),
}
DECODE = {
    "D-tp1": dict(tp=1, block_size=32),
    "D-tp2": dict(tp=2, block_size=8, kv_order="HND"),
    "D-pp2": dict(pp=2, block_size=16),
}


def _prompts() -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (37, 70)]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy tokens of one aggregated TP1 engine, per prompt."""
    return engine_greedy(tiny_dir, _prompts(), NEW, num_blocks=64)


@pytest.fixture(scope="module")
def workers(tiny_dir):
    """Every shape above, started the way deploy starts workers; handshakes P <-> D all pairs."""
    cfg = ServeConfig(model=str(tiny_dir), ray_namespace="tandem-tests")
    base = PoolConfig(dtype="float32", device="cpu", kv_cache_memory="4MiB", num_cpus=0.25, max_num_batched_tokens=256)
    started, groups = {}, []
    try:
        for names, role in ((PREFILL, "prefill"), (DECODE, "decode")):
            for name, shape in names.items():
                pool = replace_pool(base, **shape)
                handle, pg = create_worker(cfg, name, role, pool)
                started[name] = handle.actor
                groups.append(pg)
        ray.get([a.ready.remote() for a in started.values()], timeout=600)
        payloads = {n: ray.get(started[n].handshake_payload.remote()) for n in started}
        ray.get(
            [started[d].add_peer.remote(payloads[p]) for d in DECODE for p in PREFILL]
            + [started[p].add_peer.remote(payloads[d]) for d in DECODE for p in PREFILL]
        )
        yield started
    finally:
        for actor in started.values():
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the kill is what counts
                pass
            ray.kill(actor)
        for pg in groups:
            if pg is not None:
                ray.util.remove_placement_group(pg)


async def _run_pair(p, d, rid: str, ids: list[int]) -> list[int]:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    result = await p.prefill.remote(rid, ids, params)
    tokens = list(result.first.token_ids)
    try:
        async for ref in d.decode.remote(rid, ids, params, result):
            chunk = await ref
            tokens += chunk.token_ids
    finally:
        await p.release.remote(rid)  # what the router does once D streams
    return tokens


@pytest.mark.parametrize("d_name", list(DECODE))
@pytest.mark.parametrize("p_name", list(PREFILL))
def test_pair_equals_aggregated_tp1(workers, reference, p_name, d_name):
    p, d = workers[p_name], workers[d_name]
    for i, ids in enumerate(_prompts()):
        for attempt in range(2):  # the second pull starts after D's own prefix-cache hit
            got = asyncio.run(_run_pair(p, d, f"{p_name}-{d_name}-{i}-{attempt}", ids))
            assert got == reference[tuple(ids)], f"{p_name} -> {d_name}, prompt {i}, attempt {attempt}"
    for actor in (p, d):
        assert ray.get(actor.wait_idle.remote(30))
        ray.get(actor.leak_check.remote())


def test_served_heterogeneous_pair_through_grpc(tiny_dir, reference):
    """TP2xPP2 (bs16 NHD) prefill -> TP2 (bs8 HND) decode behind the router, config keys as the CLI sets them."""
    overrides = {
        "prefill.tp": 2,
        "prefill.pp": 2,
        "decode.tp": 2,
        "decode.block_size": 8,
        "decode.kv_order": "HND",
        "both.kv_cache_memory": "4MiB",
        "both.num_cpus": 0.25,
    }
    with serve(str(tiny_dir), **overrides) as s:
        client = TandemClient(s.address)
        for ids in _prompts():
            _, tokens, last = client.complete(token_ids=ids, max_tokens=NEW, temperature=0.0, ignore_eos=True)
            assert tokens == reference[tuple(ids)]
            assert last.timings.kv_transfer_s > 0
        assert "P(tp2,pp2,bs16,NHD) x 1D(tp2,pp1,bs8,HND)" in s.cluster.topology()
        s.cluster.check_pools()


def test_impossible_pair_is_refused_before_anything_starts(tiny_dir):
    from deploy.cluster import Cluster

    cfg = with_overrides(ServeConfig(), model=str(tiny_dir), **{"prefill.tp": 3})
    with pytest.raises(ConfigError, match=r"prefill pool \(tp3,pp1,bs16,NHD\).*num_heads \(8\) is not divisible"):
        Cluster.start(cfg)
    cfg = with_overrides(ServeConfig(), model=str(tiny_dir), **{"prefill.dtype": "bfloat16", "decode.dtype": "float32"})
    with pytest.raises(ConfigError, match="dtype: prefill bfloat16 vs decode float32"):
        Cluster.start(cfg)
