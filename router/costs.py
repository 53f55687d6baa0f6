"""The costs the router ranks workers by, and how it picks among them.

Costs (pure functions, golden-tested; every decision can print the filled-in formula):

    prefill_cost = w_uncached * uncached_tokens + w_queued * queued_tokens + w_evict * new_tokens * fill * reuse
        uncached_tokens  prompt tokens minus those in the worker's longest cached prefix
                         (at least 1: the last prompt token is always computed)
        queued_tokens    prefill tokens this router routed to the worker and not yet done
        new_tokens       what the prompt adds to the worker's cache: its uncached full blocks, in tokens
        fill             (content + new) / total blocks, at most 1: the share of the cache that already
                         holds something (blocks in use, or cached prefixes as the router's index has them,
                         plus this router's queued prefill) once the prompt is in. It stands for the chance
                         that what the prompt adds pushes out a prefix that will be asked for again.
        reuse            the pool's recent reuse (`ReuseMeter`): the share of recent prompts' blocks that an
                         earlier prompt had brought. Evicting costs nothing where nothing is asked twice, so
                         on a workload without shared prefixes the term fades and the queue decides.
    decode_cost = w_kv * (used + in_flight + need) / total + w_seqs * running / max_num_seqs
        used             total - free KV blocks, as the worker last reported
        in_flight        KV blocks this router routed to it that it has not pulled yet
        need             blocks this prompt takes there beyond its cached prefix
        running          requests of this router on the worker

In tokens, the first two terms are what the worker computes before this request's first
token on a first-come-first-served worker (the shortest-TTFT guess); the third is what the
choice may cost later requests. Without it, a short match decides: when every prompt shares a
chat template's first block and only one worker has it cached, each new prefix goes to that
worker while the others stay empty, and its cache thrashes (issue 16: 4.7x round-robin's TTFT).
With it, a new prefix goes where the cache has room, so the pool caches the union of prefixes,
one request at a time as much as under load; a long match still wins (its new_tokens are few).
The term is 0 for a worker that has not reported its cache size.

Ties (equal costs, e.g. idle workers with empty caches) go to the prompt's rendezvous home:
the highest hash of (worker, the first block no worker holds), so a prefix placed nowhere yet
gets a stable worker and distinct prefixes spread evenly; the injected random generator breaks
ties of prompts shorter than a block.

Selection: temperature 0 picks the cheapest (ties broken by the injected random
generator); temperature T > 0 samples with weights exp(-x / T), x the cost scaled to
[0, 1] over the candidates, so a small T spreads load among near-equal workers.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.pools import WorkerSlot


@dataclass(frozen=True)
class CostWeights:
    uncached: float = 1.0  # prefill, per uncached prompt token
    queued: float = 1.0  # prefill, per token already queued on the worker
    evict: float = 0.5  # prefill, per token the prompt adds to the cache, times the cache's fill
    kv: float = 1.0  # decode, KV usage after admitting the request (fraction)
    seqs: float = 1.0  # decode, running requests / max_num_seqs (fraction)


@dataclass(frozen=True)
class PrefillTerms:
    worker_id: str
    prompt_tokens: int
    cached_blocks: int
    block_size: int
    queued_tokens: int
    total_blocks: int = 0  # the worker's KV blocks (0: not reported: no eviction term)
    content_blocks: int = 0  # blocks in use or holding cached prefixes (+ this router's queued prefill)
    reuse: float = 1.0  # the pool's recent block reuse, 0..1 (ReuseMeter)

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - min(self.cached_blocks * self.block_size, self.prompt_tokens - 1)

    @property
    def new_blocks(self) -> int:
        """Full blocks the prompt adds to the worker's prefix cache."""
        return max(0, self.prompt_tokens // self.block_size - self.cached_blocks)

    @property
    def fill(self) -> float:
        if self.total_blocks <= 0:
            return 0.0
        return min(1.0, (self.content_blocks + self.new_blocks) / self.total_blocks)

    @property
    def evict_tokens(self) -> float:
        return self.new_blocks * self.block_size * self.fill * self.reuse


def prefill_cost(t: PrefillTerms, w: CostWeights = CostWeights()) -> float:
    return w.uncached * t.uncached_tokens + w.queued * t.queued_tokens + w.evict * t.evict_tokens


def prefill_formula(t: PrefillTerms, w: CostWeights = CostWeights()) -> str:
    evict = ""
    if t.total_blocks > 0:
        evict = (
            f" + {w.evict:g}*evict {t.new_blocks * t.block_size}*fill {t.fill:.2f} "
            f"(({t.content_blocks} + {t.new_blocks})/{t.total_blocks})*reuse {t.reuse:.2f}"
        )
    return (
        f"{t.worker_id}: {w.uncached:g}*uncached {t.uncached_tokens} "
        f"({t.prompt_tokens} - {t.cached_blocks} blocks cached) + {w.queued:g}*queued {t.queued_tokens}"
        f"{evict} = {prefill_cost(t, w):.6g}"
    )


@dataclass(frozen=True)
class DecodeTerms:
    worker_id: str
    prompt_tokens: int
    cached_blocks: int
    block_size: int
    total_blocks: int  # 0: the worker has not reported yet (the KV term is then 0)
    free_blocks: int
    in_flight_blocks: int
    running: int
    max_num_seqs: int

    @property
    def need_blocks(self) -> int:
        return need_blocks(self.prompt_tokens, self.cached_blocks, self.block_size)

    @property
    def kv_usage(self) -> float:
        if self.total_blocks <= 0:
            return 0.0
        used = self.total_blocks - self.free_blocks
        return (used + self.in_flight_blocks + self.need_blocks) / self.total_blocks

    @property
    def seq_usage(self) -> float:
        return self.running / self.max_num_seqs if self.max_num_seqs > 0 else 0.0


def decode_cost(t: DecodeTerms, w: CostWeights = CostWeights()) -> float:
    return w.kv * t.kv_usage + w.seqs * t.seq_usage


def decode_formula(t: DecodeTerms, w: CostWeights = CostWeights()) -> str:
    used = t.total_blocks - t.free_blocks
    return (
        f"{t.worker_id}: {w.kv:g}*kv (used {used} + in flight {t.in_flight_blocks} + need {t.need_blocks})"
        f"/{t.total_blocks} + {w.seqs:g}*seqs {t.running}/{t.max_num_seqs} = {decode_cost(t, w):.4g}"
    )


class ReuseMeter:
    """How much of what prompts bring was brought before: the value of keeping cached blocks, per pool.

    Every routed prompt's full blocks are looked up in a bounded LRU set of the blocks that recent prompts
    brought (wherever they went, evicted since or not). `share` is an exponential moving average, over
    prompts, of (blocks seen before / full blocks). It starts at 1 (assume reuse until shown otherwise: the
    costly mistake is to scatter repeated prefixes, not to keep a cache for prompts that never return).
    """

    def __init__(self, capacity: int = 1 << 16, alpha: float = 0.1, initial: float = 1.0) -> None:
        if capacity < 1 or not 0 < alpha <= 1 or not 0 <= initial <= 1:
            raise ValueError(
                f"ReuseMeter needs capacity >= 1, 0 < alpha <= 1, 0 <= initial <= 1; got {capacity}, {alpha}, {initial}"
            )
        self.capacity, self.alpha, self.share = capacity, alpha, initial
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def observe(self, hashes: Sequence[bytes]) -> None:
        """Count one prompt (its full blocks' hashes) into the share, then remember its blocks."""
        if not hashes:
            return
        seen = sum(1 for h in hashes if h in self._seen)
        self.share += self.alpha * (seen / len(hashes) - self.share)
        for h in hashes:
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


def rendezvous(key: bytes, worker_ids: Sequence[str]) -> int:
    """Index of the worker with the highest hash of (key, worker id): highest-random-weight hashing.
    The same key picks the same worker while it is a candidate; keys spread evenly over workers."""
    return max(
        range(len(worker_ids)), key=lambda i: hashlib.blake2b(key + worker_ids[i].encode(), digest_size=8).digest()
    )


def select(
    costs: Sequence[float], temperature: float, rng: random.Random, home: Callable[[list[int]], int] | None = None
) -> int:
    """Index of the chosen candidate: argmin at temperature 0, else softmax sampling. Ties at the minimum go
    to `home(tied indices)` when given (the prompt's rendezvous home), else to the random generator."""
    if not costs:
        raise ValueError("select needs at least one candidate")
    lo, hi = min(costs), max(costs)
    if temperature <= 0 or hi == lo:
        tol = 1e-9 * max(1.0, abs(lo))
        ties = [i for i, c in enumerate(costs) if c - lo <= tol]
        if len(ties) == 1:
            return ties[0]
        return home(ties) if home is not None else ties[rng.randrange(len(ties))]
    span = hi - lo
    weights = [math.exp(-(c - lo) / span / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


def need_blocks(prompt_tokens: int, cached_blocks: int, block_size: int) -> int:
    """KV blocks a prompt takes on a worker beyond the prefix it has cached."""
    return max(0, -(-prompt_tokens // block_size) - cached_blocks)


def prefill_terms(
    slot: WorkerSlot, prompt_tokens: int, cached_blocks: int, block_size: int, indexed_blocks: int, reuse: float = 1.0
) -> PrefillTerms:
    """A prefill candidate's figures: the worker's last report (total and free blocks), the blocks the router's
    index holds for it, and this router's queued prefill on it (blocks it will cache, not yet reported)."""
    s = slot.status
    total = s.kv_blocks_total if s else 0
    used = total - s.kv_blocks_free if s else 0
    content = max(used, indexed_blocks) + slot.prefill_tokens // block_size
    return PrefillTerms(
        slot.worker_id,
        prompt_tokens,
        cached_blocks,
        block_size,
        slot.prefill_tokens,
        total_blocks=total,
        content_blocks=content,
        reuse=reuse,
    )


def decode_terms(slot: WorkerSlot, prompt_tokens: int, cached_blocks: int, block_size: int) -> DecodeTerms:
    s = slot.status
    return DecodeTerms(
        slot.worker_id,
        prompt_tokens,
        cached_blocks,
        block_size,
        total_blocks=s.kv_blocks_total if s else 0,
        free_blocks=s.kv_blocks_free if s else 0,
        in_flight_blocks=slot.kv_blocks_in,
        running=slot.in_flight,
        max_num_seqs=s.max_num_seqs if s and s.max_num_seqs else 0,
    )
