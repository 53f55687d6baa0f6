"""The `kv` policy uses the whole pool's cache, one request at a time (issue 16).

Simulated prefill workers, each a real BlockPool fed to the real Router's index (tests/helpers/sim_pool.py).
The workload is the one that broke the old cost: documents that all start with the same chat-template
block, each asked about several times in shuffled order, sent one after the other to idle workers; more
documents than one worker's cache holds, fewer than the pool's. The old cost (uncached + queued tokens)
sent every request to the worker that had the common block cached: one cache thrashed, the others stayed
empty. Now each document gets a home, the pool caches them all, and every repeated question is a hit.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from tests.helpers.sim_pool import SimPool

BS = 16
HEADER = 32  # tokens every prompt starts with (a chat template's system prompt): 2 blocks
DOC = 768  # 48 blocks
WORKER_BLOCKS = 300  # about 5.8 documents


def workload(n_docs: int, asks: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    rng = random.Random(seed)
    header = [rng.randrange(3, 49_000) for _ in range(HEADER)]
    docs = [[rng.randrange(3, 49_000) for _ in range(DOC)] for _ in range(n_docs)]
    order = [d for d in range(n_docs) for _ in range(asks)]
    rng.shuffle(order)
    return [(d, header + docs[d] + [rng.randrange(3, 49_000) for _ in range(rng.randrange(8, 40))]) for d in order]


def run(pool: SimPool, requests):
    placed: dict[int, set[str]] = defaultdict(set)
    repeat_hits, repeats, computed = [], 0, 0
    seen: set[int] = set()
    for i, (doc, prompt) in enumerate(requests):
        worker, hit = pool.run(f"r{i}", prompt)
        placed[doc].add(worker)
        computed += len(prompt) - hit * BS
        if doc in seen:
            repeats += 1
            repeat_hits.append(hit)
        seen.add(doc)
    for w in pool.workers.values():
        w.pool.check_integrity()
    return placed, repeat_hits, repeats, computed


@pytest.mark.parametrize("n_workers, n_docs", [(2, 8), (3, 12)])
def test_sequential_documents_spread_over_the_pool_and_every_repeat_hits(n_workers, n_docs):
    requests = workload(n_docs, asks=4)
    kv = SimPool(n_workers, WORKER_BLOCKS, BS, policy="kv")
    placed, repeat_hits, repeats, computed = run(kv, requests)
    per_worker = [w.requests for w in kv.workers.values()]
    assert min(per_worker) > 0, f"a worker got nothing: {per_worker}"
    assert all(len(workers) == 1 for workers in placed.values()), placed  # each document stays on its home
    docs_per_worker = [sum(1 for ws in placed.values() if w in ws) for w in kv.workers]
    assert max(docs_per_worker) * BS * (DOC + HEADER) // BS <= WORKER_BLOCKS * BS, docs_per_worker  # each fits
    full = (HEADER + DOC) // BS
    assert repeat_hits == [full] * repeats  # header + document cached for every repeated question

    rr = SimPool(n_workers, WORKER_BLOCKS, BS, policy="round-robin")
    _, rr_hits, _, rr_computed = run(rr, requests)
    assert computed < rr_computed  # kv computes fewer prompt tokens than round-robin
    assert sum(repeat_hits) > sum(rr_hits)


def test_no_shared_prefix_balances_like_round_robin():
    rng = random.Random(1)
    kv = SimPool(2, WORKER_BLOCKS, BS, policy="kv")
    for i in range(40):
        kv.run(f"r{i}", [rng.randrange(3, 49_000) for _ in range(rng.randrange(100, 400))])
    counts = sorted(w.requests for w in kv.workers.values())
    assert counts[1] - counts[0] <= 4, counts  # sequential and unshared: alternates by cache fill


def test_a_long_match_still_wins_over_an_emptier_worker():
    requests = workload(1, asks=1)
    pool = SimPool(2, WORKER_BLOCKS, BS, policy="kv")
    doc, prompt = requests[0]
    first, _ = pool.run("a", prompt)
    again, hit = pool.run("b", prompt[: HEADER + DOC] + [7, 8, 9])
    assert again == first and hit == (HEADER + DOC) // BS
