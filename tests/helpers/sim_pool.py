"""A simulated prefill pool for routing tests: each worker is a real engine `BlockPool` (prefix cache, LRU
eviction, KV events), fed to the real `Router`'s index as the served workers' events would be.

`SimWorker.prefill(prompt)` does what a prefill worker's block bookkeeping does for one request: hit the
longest cached prefix, take new blocks for the rest (evicting the least recently freed cached blocks),
cache the full ones, then free everything (the KV was pulled). No model, no clock: requests run one at a
time, so this simulates a sequential workload exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.block_hash import hash_full_blocks
from common.contract import WorkerStatus
from common.kv_events import KVEventBatch
from engine.block_pool import BlockPool
from router.pools import Policy, WorkerPool
from router.routing import Router, RoutingConfig
from tests.helpers.fake_workers import FakeWorker


class SimWorker:
    def __init__(self, worker_id: str, num_blocks: int, block_size: int) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.requests = 0

    def prefill(self, prompt: Sequence[int]) -> int:
        """Runs one prompt's block bookkeeping; returns how many leading blocks were cache hits."""
        bs = self.block_size
        hashes = hash_full_blocks(prompt, bs)
        hit = []
        for i, h in enumerate(hashes[: (len(prompt) - 1) // bs]):  # the last token is always computed
            block = self.pool.get_cached_block(h, prompt[i * bs : (i + 1) * bs])
            if block is None:
                break
            hit.append(block)
        self.pool.touch(hit)
        new = self.pool.get_new_blocks(-(-len(prompt) // bs) - len(hit))
        full = len(prompt) // bs - len(hit)
        parent = hashes[len(hit) - 1] if hit else None
        if full > 0:
            self.pool.cache_blocks(
                new[:full], hashes[len(hit) : len(hit) + full], parent, prompt[len(hit) * bs : (len(hit) + full) * bs]
            )
        self.pool.free_blocks(list(reversed(hit + new)))  # the tail first: evicted before the prefix
        self.requests += 1
        return len(hit)

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            worker_id=self.worker_id,
            role="prefill",
            health="SERVING",
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free_blocks,
            running=0,
            waiting=0,
            leased=0,
            node_id="sim",
            device="cpu",
            block_size=self.block_size,
            dtype="float32",
            max_num_seqs=8,
        )


@dataclass
class SimPool:
    """A router over `n` simulated prefill workers (and one decode worker it never prefills on)."""

    n: int
    num_blocks: int
    block_size: int = 16
    policy: str = "kv"
    seed: int = 0
    workers: dict[str, SimWorker] = field(init=False)
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        self.workers = {f"p{i}": SimWorker(f"p{i}", self.num_blocks, self.block_size) for i in range(self.n)}
        pool_policy = "least_loaded" if self.policy == "kv" else self.policy
        # routing reads only the clients' worker_id: no call is made to them
        prefill = WorkerPool(
            "prefill", [FakeWorker(w, "prefill") for w in self.workers], pool_policy, block_size=self.block_size
        )
        decode = WorkerPool("decode", [FakeWorker("d0")], pool_policy, block_size=self.block_size)
        self.router = Router(decode, prefill, RoutingConfig(policy=Policy.parse(self.policy)), random.Random(self.seed))
        for w in self.workers.values():
            prefill.set_status(w.worker_id, w.status())
        self._seq = 0

    def run(self, request_id: str, prompt: Sequence[int]) -> tuple[str, int]:
        """Route one prompt, prefill it on the chosen worker, deliver its KV events; (worker, blocks hit)."""
        route = self.router.route(request_id, prompt)
        assert route.prefill is not None and self.router.prefill is not None  # local prefill is off (threshold 0)
        worker = self.workers[route.prefill.worker_id]
        hit = worker.prefill(prompt)
        self.router.prefill.indexer.apply(KVEventBatch(worker.worker_id, worker.pool.take_events()))
        self.router.prefill.pool.set_status(worker.worker_id, worker.status())
        self.router.close(request_id)
        return worker.worker_id, hit
