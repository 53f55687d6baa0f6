"""KVEventFeed (router/kv_feed.py) over real prefill workers, in-process (no Ray).

Each PrefillWorker (transport "none": no NIXL; `generate` runs a request start to
finish, as conditional disaggregation does) sits behind `InProcessClient`, the
router's WorkerClient implemented by awaiting the worker object's methods. The feed
long-polls `kv_events` into the prefill pool's prefix index of a real Router; tests
wait for index states with `feed.wait_until`, never by sleeping.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from common.block_hash import hash_full_blocks
from common.sampling_params import SamplingParams
from prefill_worker.worker import PrefillWorker
from router.kv_feed import KVEventFeed
from router.pools import WorkerPool
from router.routing import PoolIndex, Router, RoutingConfig
from tests.helpers.fake_workers import FakeWorker
from tests.helpers.inprocess_workers import BS, NUM_BLOCKS, InProcessClient, new_worker
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.timeout(120)  # a broken feed must fail, not hang

WAIT_S = 20.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("kvfeed"), "llama", vocab_size=512))


@dataclass
class Setup:
    clients: dict[str, InProcessClient]
    router: Router
    feed: KVEventFeed
    downs: list[tuple[str, str, str]]  # (pool role, worker id, reason) per on_down call

    @property
    def ix(self) -> PoolIndex:
        assert self.router.prefill is not None  # setup() builds a disaggregated router
        return self.router.prefill

    async def run(self, wid: str, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
        out: list[int] = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for chunk in self.clients[wid].generate(rid, prompt, params):
            out += chunk.token_ids
        assert len(out) == max_tokens
        return out

    def holds_exactly(self, wid: str, hashes: Sequence[bytes]) -> bool:
        """The index holds exactly `hashes` for the worker (no more, no fewer)."""
        ind = self.ix.indexer
        return ind.num_blocks(wid) == len(set(hashes)) and all(wid in ind.find_matches([h]) for h in hashes)


@asynccontextmanager
async def setup(workers: list[PrefillWorker], follow: bool = True) -> AsyncIterator[Setup]:
    clients = {w.host.worker_id: InProcessClient(w) for w in workers}
    prefill = WorkerPool("prefill", list(clients.values()), block_size=BS)
    decode = WorkerPool("decode", [FakeWorker("d0")], block_size=BS)  # the router may choose it; no call is made
    router = Router(decode, prefill, RoutingConfig(), random.Random(0))
    downs: list[tuple[str, str, str]] = []

    def on_down(pool: WorkerPool, worker_id: str, reason: str) -> None:  # what GenerationService does
        downs.append((pool.role, worker_id, reason))
        pool.set_health(worker_id, False, reason)
        router.index_of(pool).forget(worker_id)

    feed = KVEventFeed(on_down, poll_timeout_s=0.05, retry_s=0.01)
    s = Setup(clients, router, feed, downs)
    try:
        if follow:
            feed.follow_pool(s.ix)
        yield s
    finally:
        await feed.close()
        for c in clients.values():
            await c.worker.shutdown()
        for w in workers:
            if all(w is not c.worker for c in clients.values()):
                await w.shutdown()


def prompt_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def test_events_fill_the_index_and_the_status(tiny: str) -> None:
    rng = random.Random(1)
    prompt = prompt_of(rng, 18)  # 4 full blocks + 2 tokens

    async def scenario() -> None:
        async with setup([new_worker(tiny, "A"), new_worker(tiny, "B")]) as s:
            out = await s.run("A", "r1", prompt, max_tokens=6)
            # the engine caches every full block whose KV it computed: 18 + 6 - 1 tokens -> 5 blocks,
            # the 5th made of the prompt's tail and generated tokens
            seq = prompt + out
            hashes = hash_full_blocks(seq, BS)[: (len(seq) - 1) // BS]
            assert len(hashes) == 5
            await s.feed.wait_until(lambda: s.holds_exactly("A", hashes), WAIT_S)
            assert s.ix.indexer.find_matches(hash_full_blocks(prompt, BS)) == {"A": 4}
            assert s.ix.indexer.num_blocks("B") == 0
            assert s.holds_exactly("A", (await s.clients["A"].kv_snapshot()).block_hashes)
            await s.feed.wait_until(lambda: all(sl.status is not None for sl in s.ix.pool.slots), WAIT_S)
            st = s.ix.pool.slot("A").status
            assert st is not None
            assert (st.worker_id, st.role, st.health, st.block_size) == ("A", "prefill", "SERVING", BS)
            assert st.kv_blocks_total == NUM_BLOCKS and st.max_num_seqs > 0
            # and routing sees it: the same prompt goes to A, its cached blocks in the formula
            route = s.router.route("again", prompt)
            assert route.prefill is not None
            assert route.prefill.worker_id == "A"
            # A holds the 5 blocks of r1 (its 64-block cache 8% full); the prompt adds no new block there
            assert (
                "A: 1*uncached 2 (18 - 4 blocks cached) + 1*queued 0 "
                "+ 0.5*evict 0*fill 0.08 ((5 + 0)/64)*reuse 1.00 = 2" in route.describe()
            )
            assert (
                "B: 1*uncached 18 (18 - 0 blocks cached) + 1*queued 0 "
                "+ 0.5*evict 16*fill 0.06 ((0 + 4)/64)*reuse 1.00 = 18.5" in route.describe()
            )
            assert s.downs == [] and s.feed.resyncs == 0

    asyncio.run(scenario())


def test_lost_events_are_recovered_from_a_snapshot(tiny: str) -> None:
    rng = random.Random(2)
    first, second = prompt_of(rng, 40), prompt_of(rng, 40)

    async def scenario() -> None:
        a = new_worker(tiny, "A", publisher_capacity=2)
        async with setup([a], follow=False) as s:
            await s.run("A", "r1", first, max_tokens=3)
            # 40 prompt tokens in chunks of 8: one BlockStored per chunk, and the buffer keeps only the last 2
            assert a.host.publisher.next_seq > 2
            assert a.host.publisher.since(0)[0].seq > 0  # events 0.. are gone
            snap = await a.kv_snapshot()
            s.feed.follow_pool(s.ix)
            await s.feed.wait_until(lambda: s.feed.resyncs >= 1 and s.holds_exactly("A", snap.block_hashes), WAIT_S)
            assert s.ix.indexer.find_matches(hash_full_blocks(first, BS)) == {"A": 10}
            assert not s.ix.indexer.is_stale("A")
            assert s.ix.indexer.expected_seq("A") == snap.next_seq
            # it goes on from the snapshot: later events (lost again or not) keep the index equal to the cache
            await s.run("A", "r2", second, max_tokens=3)
            snap2 = await a.kv_snapshot()
            assert snap2.next_seq > snap.next_seq
            await s.feed.wait_until(
                lambda: s.holds_exactly("A", snap2.block_hashes) and s.ix.indexer.expected_seq("A") == snap2.next_seq,
                WAIT_S,
            )
            assert s.ix.indexer.find_matches(hash_full_blocks(second, BS)) == {"A": 10}
            assert s.downs == []

    asyncio.run(scenario())


def test_a_new_worker_under_the_same_id_is_resynced(tiny: str) -> None:
    rng = random.Random(3)
    old_prompt, new_prompt = prompt_of(rng, 20), prompt_of(rng, 12)

    async def scenario() -> None:
        old, new = new_worker(tiny, "A"), new_worker(tiny, "A")
        async with setup([old, new_worker(tiny, "B")]) as s:
            await s.run("A", "r1", old_prompt, max_tokens=1)
            old_hashes = hash_full_blocks(old_prompt, BS)
            await s.feed.wait_until(lambda: s.ix.indexer.find_matches(old_hashes) == {"A": 5}, WAIT_S)
            assert s.feed.resyncs == 0
            async for _ in new.generate("n1", new_prompt, SamplingParams(max_tokens=1, temperature=0.0)):
                pass
            snap = await new.kv_snapshot()
            assert snap.epoch != old.host.publisher.epoch and len(snap.block_hashes) == 3
            s.clients["A"].worker = new  # the worker restarted: same name, same client, new publisher
            await s.feed.wait_until(lambda: s.feed.resyncs == 1 and s.holds_exactly("A", snap.block_hashes), WAIT_S)
            assert s.ix.indexer.find_matches(old_hashes) == {}  # the old worker's cache is gone
            assert s.ix.indexer.find_matches(hash_full_blocks(new_prompt, BS)) == {"A": 3}
            assert s.downs == []

    asyncio.run(scenario())


def test_an_unavailable_worker_is_reported_down_and_forgotten(tiny: str) -> None:
    rng = random.Random(4)
    pa, pb = prompt_of(rng, 16), prompt_of(rng, 16)

    async def scenario() -> None:
        async with setup([new_worker(tiny, "A"), new_worker(tiny, "B")]) as s:
            await s.run("A", "ra", pa, max_tokens=1)
            await s.run("B", "rb", pb, max_tokens=1)
            ha, hb = hash_full_blocks(pa, BS), hash_full_blocks(pb, BS)
            ind = s.ix.indexer
            await s.feed.wait_until(
                lambda: ind.find_matches(ha) == {"A": 4} and ind.find_matches(hb) == {"B": 4}, WAIT_S
            )
            s.router.route("burst", pa)  # a prediction on A too: it must go with A's entries
            assert s.ix.predicted.find_matches(ha) == {"A": 4}
            s.clients["A"].down = True
            await s.feed.wait_until(lambda: bool(s.downs), WAIT_S)
            role, wid, reason = s.downs[0]
            assert (role, wid) == ("prefill", "A") and "unavailable" in reason
            assert not s.ix.pool.healthy("A") and s.ix.pool.healthy("B")
            assert ind.num_blocks("A") == 0 and "A" not in ind.workers()
            assert s.ix.predicted.find_matches(ha) == {}
            assert ind.find_matches(hb) == {"B": 4}  # the others are untouched
            # back again: the feed keeps retrying and rebuilds A's entries from its events
            s.clients["A"].down = False
            snap = await s.clients["A"].kv_snapshot()
            await s.feed.wait_until(lambda: s.holds_exactly("A", snap.block_hashes), WAIT_S)
            assert ind.find_matches(ha) == {"A": 4}
            # a worker whose engine died answers NOT_SERVING: reported down too
            downs_before = len(s.downs)
            s.clients["B"].worker.host.engine.healthy = False
            await s.feed.wait_until(lambda: any(d[1] == "B" for d in s.downs[downs_before:]), WAIT_S)
            assert ("prefill", "B", "worker B reports NOT_SERVING") in s.downs
            assert ind.num_blocks("B") == 0 and not s.ix.pool.healthy("B")
            s.clients["B"].worker.host.engine.healthy = True  # so shutdown stops its thread normally

    asyncio.run(scenario())
