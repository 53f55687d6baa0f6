"""One simulated worker: its KV block pool with prefix caching, and its token-budget scheduler.

Both mirror the engine's (engine/block_pool.py, engine/scheduler.py) at the granularity that decides
latency: blocks, not bytes; steps, not ops.

- KV: `num_blocks` blocks of `block_size` tokens. A request's full blocks are named by a chained hash of
  what they hold, so equal prefixes share blocks; a block no request holds stays cached (LRU) until an
  allocation needs its room. A request's first schedule looks its prefix up in the cache.
- A step, as `Scheduler.schedule` builds it: running requests oldest first (a decode row takes 1 token,
  a prefill continues its chunk) under `max_num_batched_tokens`; the newest running request is preempted
  (blocks freed, recomputed from the start later) when the cache cannot hold the step; then waiting
  requests first come first served while budget and `max_num_seqs` allow, a long prompt chunked; with
  the profile's `prefill_join_tokens` set, prompt tokens go oldest prompt first (common/prefill_share.py);
  with a TTFT target (SLO triage) a waiting prompt that would miss it yields to one that can meet it.
- Its duration is the profile's `StepModel` of the step's shape.

Requests carry their content as segments `(segment id, tokens)` instead of token ids: a block's hash is
the chain of the segment slices it covers, which names equal content as token ids would, at a fraction
of the cost (the simulator runs millions of tokens in seconds).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.prefill_share import PrefillShare, hopeless, meetable_first
from planner.model import StepShape
from planner.profile import WorkerProfile

Segments = tuple[tuple[int, int], ...]  # (segment id, tokens): a request's content, in order


def block_hashes(segments: Segments, block_size: int, limit: int) -> list[int]:
    """Chained hashes of the first `limit` full blocks of the content."""
    hashes: list[int] = []
    h = 0
    seg_i, seg_off = 0, 0
    for _ in range(limit):
        need = block_size
        parts = []
        while need and seg_i < len(segments):
            sid, n = segments[seg_i]
            take = min(need, n - seg_off)
            parts.append((sid, seg_off, take))
            need -= take
            seg_off += take
            if seg_off == n:
                seg_i, seg_off = seg_i + 1, 0
        if need:
            break
        h = hash((h, tuple(parts)))
        hashes.append(h)
    return hashes


@dataclass(eq=False)
class SimRequest:
    index: int
    arrival_s: float  # when the client sent it
    segments: Segments  # prompt, then the reply it will get (hashes cover the reply once computed)
    prompt_len: int
    output_len: int
    # -- progress --
    computed: int = 0  # tokens whose KV this worker holds
    emitted: int = 0  # output tokens produced
    cached: int = -1  # prompt tokens found in the cache at first schedule (-1: not scheduled yet)
    preemptions: int = 0
    token_times: list[float] = field(default_factory=list)  # when the client got each output token
    hashes: list[int] = field(default_factory=list)  # of its full blocks, computed lazily
    # -- placement --
    prefill_worker: int = -1
    decode_worker: int = -1
    route: str = ""
    handoff: bool = False  # a prefill-role worker: hand the KV off after token 1
    finished_s: float | None = None

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len

    def tokens_now(self) -> int:
        """Tokens the request holds: prompt and the outputs produced so far (the last one not yet computed)."""
        return self.prompt_len + self.emitted

    def hashes_upto(self, blocks: int, block_size: int) -> list[int]:
        """The hashes of its first `blocks` full blocks (all of them are computed at the first call)."""
        if not self.hashes and blocks > 0:
            self.hashes = block_hashes(self.segments, block_size, self.total_len // block_size)
        return self.hashes[:blocks]


class BlockCache:
    """Blocks in use (ref-counted, hashed or private) and cached free blocks (LRU), as the engine's pool."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = True,
        owner: int = 0,
        index: dict[int, set[int]] | None = None,
    ) -> None:
        self.owner = owner
        self.index = index  # block hash -> owners whose cache holds it (shared by a pool: the router's view)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs: dict[int, int] = {}  # hash -> requests holding it
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody: evictable, oldest first
        self.private = 0  # blocks held that have no hash yet (partial, or not committed)
        self.held: dict[SimRequest, tuple[list[int], int]] = {}  # request -> (hashed blocks, private blocks)

    @property
    def used(self) -> int:
        return len(self.refs) + self.private

    @property
    def free(self) -> int:
        """Blocks an allocation can take (cached ones included: it evicts them)."""
        return self.num_blocks - self.used

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the cache holds."""
        n = 0
        if not self.prefix_caching:
            return 0
        for h in hashes:
            if h in self.refs or h in self.lru:
                n += 1
            else:
                break
        return n

    def take_prefix(self, req: SimRequest, hashes: Sequence[int]) -> None:
        shared, private = self.held.get(req, ([], 0))
        for h in hashes:
            if h in self.lru:
                del self.lru[h]
            self.refs[h] = self.refs.get(h, 0) + 1
            shared.append(h)
        self.held[req] = (shared, private)

    def allocate(self, req: SimRequest, tokens: int) -> bool:
        """Room for the request to hold `tokens` tokens; False (nothing changed) if the pool cannot."""
        shared, private = self.held.get(req, ([], 0))
        need = -(-tokens // self.block_size) - len(shared) - private
        if need <= 0:
            return True
        if need > self.free:
            return False
        over = self.used + len(self.lru) + need - self.num_blocks
        for _ in range(max(over, 0)):
            h, _ = self.lru.popitem(last=False)
            if self.index is not None:
                self.index[h].discard(self.owner)
        self.private += need
        self.held[req] = (shared, private + need)
        return True

    def commit(self, req: SimRequest, computed: int) -> None:
        """Full blocks of the first `computed` tokens get their hash (and become shareable)."""
        if not self.prefix_caching:
            return
        shared, private = self.held.get(req, ([], 0))
        full = computed // self.block_size
        if full <= len(shared):
            return
        hashes = req.hashes_upto(full, self.block_size)
        for h in hashes[len(shared) :]:
            if private == 0:
                break
            private -= 1
            self.private -= 1
            if h in self.lru:
                del self.lru[h]
            elif h not in self.refs and self.index is not None:
                self.index.setdefault(h, set()).add(self.owner)
            self.refs[h] = self.refs.get(h, 0) + 1
            shared.append(h)
        self.held[req] = (shared, private)

    def release(self, req: SimRequest) -> None:
        shared, private = self.held.pop(req, ([], 0))
        self.private -= private
        for h in shared:
            n = self.refs[h] - 1
            if n:
                self.refs[h] = n
            else:
                del self.refs[h]
                self.lru[h] = None

    def blocks_of(self, req: SimRequest) -> int:
        shared, private = self.held.get(req, ([], 0))
        return len(shared) + private


def is_decode_row(req: SimRequest, n: int) -> bool:
    """A row computing one token: a decode step (or a prompt chunk of one token, which the engine batches as a
    decode row too: engine/scheduler.py, SchedulerOutput.features)."""
    return n == 1


def prefill_left(req: SimRequest) -> int:
    """Tokens still to compute before the request decodes (0 while it decodes)."""
    left = req.tokens_now() - req.computed
    return 0 if req.emitted > 0 and left <= 1 else left


@dataclass
class StepPlan:
    rows: list[tuple[SimRequest, int]]  # (request, tokens computed this step)
    seconds: float


class SimWorker:
    """A worker's queues, cache and scheduler; the simulator runs its steps in simulated time."""

    def __init__(
        self,
        wid: int,
        role: str,
        profile: WorkerProfile,
        per_step_overhead_s: float = 0.0,
        index: dict[int, set[int]] | None = None,
    ) -> None:
        self.wid = wid
        self.role = role  # "prefill" | "decode" | "aggregated"
        self.profile = profile
        self.cache = BlockCache(profile.num_blocks, profile.shape.block_size, profile.enable_prefix_caching, wid, index)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy_until: float | None = None  # a step in flight ends then
        self.per_step_overhead_s = per_step_overhead_s
        self.queued_prefill_tokens = 0  # router's load figure: prompt tokens waiting or in progress
        self.assigned = 0  # requests the router sent here (as their decode / aggregated worker), not finished
        self.booked_blocks = 0  # prompt blocks routed here and not landed yet (the router's KV in flight)
        self.busy_s = 0.0
        self.steps = 0
        self.contention = 0.0  # step slowdown per busy neighbour (ServedOverhead.contention of its role)
        self.neighbours: list[SimWorker] = []  # the other workers of its host
        self.ttft_target_s = 0.0  # SLO triage (ClusterSpec.slo_triage): the TTFT target it orders prompts by
        self.router_host = False  # it shares its host with the router (planner/simulator.py, _cpu_stretch)
        self.preemptions = 0
        self.step_started = 0.0  # when the step in flight began
        self.paused_until: float | None = None  # a decode worker lending its core: no step before then
        self.lent_s = 0.0
        self.first_step_s: float | None = None
        self.prefill_steps: deque[tuple[float, float]] = deque()  # (end, seconds) of steps with prompt tokens

    def prefill_busy(self, now: float, window_s: float) -> float:
        """The share of the last `window_s` seconds spent in steps that computed prompt tokens (as the worker
        reports it: common/perf_model.py, StepTimes.busy)."""
        while self.prefill_steps and self.prefill_steps[0][0] < now - window_s:
            self.prefill_steps.popleft()
        if self.first_step_s is None:
            return 0.0
        span = min(window_s, max(now - self.first_step_s, 1e-3))
        return min(1.0, sum(sec for _, sec in self.prefill_steps) / span)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self.queued_prefill_tokens += prefill_left(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _lost(self, req: SimRequest, now: float) -> bool:
        if req.emitted:
            return False
        left = req.tokens_now() - req.computed
        return hopeless(now - req.arrival_s, self.profile.step.prefill_s(left), self.ttft_target_s)

    def schedule(self, now: float = 0.0) -> StepPlan | None:
        """The next step as `Scheduler.schedule` builds it at `now`; None when there is nothing to run."""
        bs = self.cache.block_size
        budget = self.profile.max_num_batched_tokens
        rows: list[tuple[SimRequest, int]] = []
        queue = list(self.running)
        kept: list[SimRequest] = []
        prompts = PrefillShare(self.profile.prefill_join_tokens)
        while queue and budget > 0:
            req = queue.pop(0)
            left = req.tokens_now() - req.computed
            if left > 1:
                n = prompts.take(left, budget)
                if not n:
                    kept.append(req)  # its prompt continues in a later step
                    continue
            else:  # a decode row, or 0: its prompt just ended in the step that is ending (a re-entrant kick)
                n = min(left, budget)
            ok = self.cache.allocate(req, req.computed + n)
            while not ok:
                victim = queue.pop() if queue else req
                self._preempt(victim)
                if victim is req:
                    break
                ok = self.cache.allocate(req, req.computed + n)
            if not ok:
                break
            kept.append(req)
            rows.append((req, n))
            budget -= n
        self.running = kept + queue
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            if self.ttft_target_s:  # SLO triage, as the engine's scheduler
                meetable_first(self.waiting, lambda r: self._lost(r, now))
            req = self.waiting[0]
            hit_blocks = 0
            if req.computed == 0:
                lookable = (req.tokens_now() - 1) // bs  # the last token is always computed
                hit_blocks = self.cache.cached_prefix(req.hashes_upto(lookable, bs)) if lookable > 0 else 0
            computed = hit_blocks * bs if req.computed == 0 else req.computed
            left = req.tokens_now() - computed
            n = prompts.take(left, budget) if left > 1 else 1
            if not n:
                break
            if hit_blocks:
                self.cache.take_prefix(req, req.hashes[:hit_blocks])
            if not self.cache.allocate(req, computed + n):
                if hit_blocks:
                    self.cache.release(req)
                break
            self.waiting.popleft()
            if req.cached < 0:
                req.cached = computed
            self.queued_prefill_tokens -= computed - req.computed  # found in the cache
            req.computed = computed
            self.running.append(req)
            rows.append((req, n))
            budget -= n
        if not rows:
            return None
        chunks = [(n, r.computed) for r, n in rows if not is_decode_row(r, n)]
        decodes = [r.computed + 1 for r, n in rows if is_decode_row(r, n)]
        shape = StepShape.of(chunks, decodes)
        seconds = self.profile.step.step_s(shape) + (self.per_step_overhead_s if decodes else 0.0)
        return StepPlan(rows, seconds)

    def _preempt(self, req: SimRequest) -> None:
        self.cache.release(req)
        before = prefill_left(req)
        req.computed = 0  # its whole context is computed again
        self.queued_prefill_tokens += prefill_left(req) - before
        req.preemptions += 1
        self.preemptions += 1
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)

    def finish_step(self, plan: StepPlan) -> list[SimRequest]:
        """Apply a step that ended: KV committed, tokens emitted. Returns the requests that produced a token
        (their prompt is computed: a prefill finished, or a decode row)."""
        produced = []
        for req, n in plan.rows:
            before = prefill_left(req)
            req.computed += n
            self.queued_prefill_tokens -= before - prefill_left(req)
            self.cache.commit(req, req.computed)
            if req.computed >= req.tokens_now():
                produced.append(req)
        self.steps += 1
        self.busy_s += plan.seconds
        return produced

    def remove(self, req: SimRequest) -> None:
        """The request leaves this worker (finished, or handed off): its blocks go back to the pool."""
        if req in self.running:
            self.running.remove(req)
        self.cache.release(req)

    def pin(self, req: SimRequest) -> None:
        """A prefill worker's finished prompt leaves the batch but keeps its blocks (leased until pulled)."""
        if req in self.running:
            self.running.remove(req)
