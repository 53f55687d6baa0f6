"""KVCacheManager: prefix hits, allocation without side effects on failure, sharing, and a
Hypothesis state machine over allocate / commit / free / preempt / reset with a shadow
KV memory that catches any block handed to two requests that should not share it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from common.block_hash import hash_full_blocks
from common.kv_events import AllCleared, BlockRemoved, BlockStored
from engine.block_pool import BlockLeakError, BlockPoolCorruptionError, BlockPoolError, BlockPoolUsageError
from engine.kv_cache_manager import KVCacheManager, PrefixHit, StalePrefixHitError

BS = 4


def run_prompt(mgr: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    """Admit a request with prefix lookup, compute its whole prompt in one step, commit."""
    hit = mgr.lookup_prefix(tokens)
    ids = mgr.allocate(rid, tokens, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
    assert ids is not None
    mgr.commit(rid, tokens, len(tokens))
    return ids


def snapshot(mgr: KVCacheManager) -> tuple:
    pool = mgr.pool
    blocks = [pool.block(i) for i in range(pool.num_blocks)]
    return (
        pool.num_free_blocks,
        [(b.ref_cnt, b.block_hash) for b in blocks],
        list(pool._free),
        dict(mgr._requests),
        len(pool._events),
    )


def test_prefix_hit_after_commit_and_free() -> None:
    mgr = KVCacheManager(8, BS)
    tokens = list(range(10))
    a_ids = run_prompt(mgr, "a", tokens)
    stored = mgr.take_events()
    assert stored == [BlockStored(0, hash_full_blocks(tokens, BS), None, tokens[:8], BS)]
    mgr.free("a")
    hit = mgr.lookup_prefix(tokens + [99])
    assert hit.num_tokens == 8 and [b.block_id for b in hit.blocks] == a_ids[:2]
    b_ids = mgr.allocate("b", tokens + [99], 8, 3, hit)
    assert b_ids is not None and b_ids[:2] == a_ids[:2] and len(b_ids) == 3
    mgr.commit("b", tokens + [99], 11)
    assert mgr.take_events() == []  # blocks 0-1 were already cached, block 2 is partial
    mgr.check_integrity()
    mgr.free("b")
    mgr.leak_check()


def test_hit_is_capped_to_leave_one_token() -> None:
    mgr = KVCacheManager(8, BS)
    tokens = list(range(12))
    run_prompt(mgr, "a", tokens)
    assert mgr.lookup_prefix(tokens).num_tokens == 8  # all 3 blocks cached, last token recomputed
    assert mgr.lookup_prefix(tokens[:9]).num_tokens == 8
    assert mgr.lookup_prefix(tokens[:8]).num_tokens == 4
    assert mgr.lookup_prefix(tokens[:4]).num_tokens == 0
    assert mgr.lookup_prefix([]).num_tokens == 0
    assert mgr.lookup_prefix([0, 1, 2, 3, 7, 7, 7, 7, 7]).num_tokens == 4  # diverges in block 1
    mgr.free("a")
    mgr.leak_check()


def test_lookup_has_no_side_effects() -> None:
    mgr = KVCacheManager(4, BS)
    run_prompt(mgr, "a", list(range(9)))
    mgr.take_events()
    before = snapshot(mgr)
    mgr.lookup_prefix(list(range(9)))
    assert snapshot(mgr) == before
    mgr.free("a")
    mgr.leak_check()


def test_allocate_none_without_side_effects_when_full() -> None:
    mgr = KVCacheManager(4, BS)
    assert mgr.allocate("a", list(range(12)), 0, 12) is not None  # 3 of 4 blocks
    before = snapshot(mgr)
    assert mgr.allocate("b", list(range(100, 108)), 0, 8) is None
    assert mgr.allocate("a", list(range(20)), 12, 8) is None  # growing an existing request
    assert snapshot(mgr) == before and mgr.num_blocks_of("b") == 0
    mgr.free("a")
    mgr.leak_check()


def test_touching_free_hit_blocks_counts_against_free() -> None:
    mgr = KVCacheManager(4, BS)
    tokens = list(range(9))
    run_prompt(mgr, "a", tokens)
    mgr.free("a")
    assert mgr.num_free_blocks == 4  # 2 of them cached
    long = tokens + list(range(100, 111))  # 20 tokens = 5 blocks > 4: never fits
    hit = mgr.lookup_prefix(long)
    assert hit.num_blocks == 2
    before = snapshot(mgr)
    # 2 hit + 3 new blocks: the 2 free hit blocks cannot also serve as new blocks
    assert mgr.allocate("b", long, 8, 12, hit) is None
    assert snapshot(mgr) == before
    ids = mgr.allocate("b", long, 8, 8, hit)  # 2 hit + 2 new fits exactly
    assert ids is not None and len(ids) == 4 and mgr.num_free_blocks == 0
    mgr.free("b")
    mgr.leak_check()


def test_common_prefix_blocks_shared_with_ref_count_two() -> None:
    mgr = KVCacheManager(8, BS)
    prefix = list(range(8))
    a_ids = run_prompt(mgr, "a", prefix + [50, 51])
    b_ids = run_prompt(mgr, "b", prefix + [60, 61, 62])
    assert a_ids[:2] == b_ids[:2] and a_ids[2] != b_ids[2]
    assert [mgr.pool.block(i).ref_cnt for i in b_ids] == [2, 2, 1]
    mgr.check_integrity()
    mgr.free("a")
    assert [mgr.pool.block(i).ref_cnt for i in b_ids] == [1, 1, 1]
    mgr.free("b")
    mgr.leak_check()


def test_incremental_commit_and_decode_growth() -> None:
    mgr = KVCacheManager(8, BS)
    tokens = list(range(6))
    assert mgr.allocate("a", tokens, 0, 3) is not None and mgr.num_blocks_of("a") == 1  # chunked prefill
    mgr.commit("a", tokens, 3)
    assert mgr.take_events() == []
    assert mgr.allocate("a", tokens, 3, 3) is not None and mgr.num_blocks_of("a") == 2
    mgr.commit("a", tokens, 6)
    (ev,) = mgr.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == hash_full_blocks(tokens, BS)[:1]
    for t in range(6, 13):  # decode one token a step
        tokens.append(t)
        assert mgr.allocate("a", tokens, t, 1) is not None
        mgr.commit("a", tokens, t + 1)
    full = hash_full_blocks(tokens, BS)
    events = mgr.take_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored == events  # decoding only fills blocks: nothing is removed
    assert [h for e in stored for h in e.block_hashes] == full[1:3]
    assert mgr.num_blocks_of("a") == 4 and len(mgr.block_ids("a")) == 4
    mgr.free("a")
    mgr.leak_check()


def test_preempt_frees_tail_first_and_restarts_with_hit() -> None:
    mgr = KVCacheManager(4, BS)
    tokens = list(range(14))
    ids = run_prompt(mgr, "a", tokens)  # 4 blocks, 3 cached
    mgr.free("a")  # preempted
    (evicted,) = mgr.pool.get_new_blocks(1)
    assert evicted.block_id == ids[3]  # the tail goes first
    mgr.pool.free_blocks([evicted])
    hit = mgr.lookup_prefix(tokens)
    assert hit.num_tokens == 12 and mgr.allocate("a", tokens, 12, 2, hit) == ids[:3] + [ids[3]]
    mgr.free("a")
    mgr.leak_check()


def test_stale_hit_and_misuse_raise() -> None:
    mgr = KVCacheManager(3, BS)
    tokens = list(range(9))
    run_prompt(mgr, "a", tokens)
    mgr.free("a")
    hit = mgr.lookup_prefix(tokens)
    assert mgr.allocate("x", list(range(50, 62)), 0, 12) is not None  # evicts every cached block
    with pytest.raises(StalePrefixHitError):
        mgr.allocate("b", tokens, 8, 1, hit)
    mgr.free("x")
    with pytest.raises(BlockPoolUsageError):
        mgr.allocate("b", tokens, 4, 1, PrefixHit(hit.blocks, 8))  # computed != hit tokens
    with pytest.raises(BlockPoolUsageError):
        mgr.commit("nobody", tokens, 4)
    assert mgr.allocate("b", tokens, 0, 4) is not None
    with pytest.raises(BlockPoolUsageError):
        mgr.commit("b", tokens, 8)  # KV beyond the request's blocks
    with pytest.raises(BlockPoolUsageError):
        mgr.allocate("b", tokens, 0, -1)
    mgr.free("b")
    mgr.free("b")  # unknown id: no-op
    assert mgr.block_ids("b") == [] and mgr.num_blocks_of("b") == 0
    mgr.leak_check()


def test_prefix_caching_disabled_and_can_fit() -> None:
    mgr = KVCacheManager(4, BS, enable_prefix_caching=False)
    tokens = list(range(9))
    run_prompt(mgr, "a", tokens)
    mgr.free("a")
    assert mgr.lookup_prefix(tokens).num_tokens == 0 and mgr.take_events() == []
    assert mgr.can_fit(16) and not mgr.can_fit(17) and mgr.can_fit(0)
    mgr.leak_check()


def test_reset_prefix_cache_through_manager() -> None:
    mgr = KVCacheManager(4, BS)
    tokens = list(range(9))
    run_prompt(mgr, "a", tokens)
    assert mgr.reset_prefix_cache() is False
    mgr.free("a")
    assert mgr.reset_prefix_cache() is True
    assert mgr.lookup_prefix(tokens).num_tokens == 0
    assert isinstance(mgr.take_events()[-1], AllCleared)
    mgr.leak_check()


# ---- deliberately broken managers: the checks must catch them ---------------------


class LeakyManager(KVCacheManager):
    """free() forgets the request's last block."""

    def free(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free_blocks(reversed(state.blocks[:-1]))


class NoTouchManager(KVCacheManager):
    """allocate() shares hit blocks without taking a reference on them."""

    def allocate(self, request_id, token_ids, num_computed_tokens, num_new_tokens, prefix_hit=None):
        pool_touch = self.pool.touch
        self.pool.touch = lambda blocks: None  # type: ignore[method-assign]
        try:
            return super().allocate(request_id, token_ids, num_computed_tokens, num_new_tokens, prefix_hit)
        finally:
            self.pool.touch = pool_touch  # type: ignore[method-assign]


def test_leak_check_catches_leaky_manager() -> None:
    mgr = LeakyManager(4, BS)
    run_prompt(mgr, "a", list(range(6)))
    mgr.free("a")
    with pytest.raises(BlockPoolCorruptionError, match="ref count"):
        mgr.check_integrity()
    with pytest.raises(BlockLeakError, match="still referenced"):
        mgr.leak_check()
    good = KVCacheManager(4, BS)  # the same scenario passes without the bug
    run_prompt(good, "a", list(range(6)))
    good.free("a")
    good.leak_check()


# ---- the state machine -------------------------------------------------------------

SM_BLOCKS, SM_BS, MAX_LEN = 8, 2, 14
PREFIXES: tuple[list[int], ...] = ([0, 1, 0, 1, 1, 0], [2, 2, 2, 2], [])


@dataclass
class Req:
    tokens: list[int]
    computed: int = 0
    allocated: bool = False


class KVCacheMachine(RuleBasedStateMachine):
    """Model: requests with token lists; a shadow KV memory per slot holding the token
    prefix whose KV that slot should contain. Every computed position of every live
    request must read back its own prefix, so a block wrongly shared, reused while
    held, or returned for a wrong hit is caught by content, not only by counts."""

    manager_cls: type[KVCacheManager] = KVCacheManager

    def __init__(self) -> None:
        super().__init__()
        self.mgr = self.manager_cls(SM_BLOCKS, SM_BS)
        self.reqs: dict[str, Req] = {}
        self.kv: list[list[tuple[int, ...] | None]] = [[None] * SM_BS for _ in range(SM_BLOCKS)]
        self.next_id = 0
        self.next_seq = 0
        self.index: set[bytes] = set()  # a naive router index fed only by events

    def _pick(self, i: int, allocated: bool | None = None) -> str | None:
        ids = sorted(r for r, q in self.reqs.items() if allocated is None or q.allocated == allocated)
        return ids[i % len(ids)] if ids else None

    def _step(self, rid: str, chunk: int, hit: PrefixHit | None = None) -> None:
        """Allocate for (up to) `chunk` tokens, write their shadow KV, commit."""
        req = self.reqs[rid]
        if req.computed == len(req.tokens):
            req.tokens.append((len(req.tokens) * 7) % 3)  # the "sampled" token
            chunk = 1
        new = min(chunk, len(req.tokens) - req.computed)
        before = snapshot(self.mgr)
        ids = self.mgr.allocate(rid, req.tokens, req.computed, new, hit)
        if ids is None:
            assert snapshot(self.mgr) == before, "a failed allocate changed state"
            return
        req.allocated = True
        assert len(ids) == -(-(req.computed + new) // SM_BS)
        for p in range(req.computed, req.computed + new):
            self.kv[ids[p // SM_BS]][p % SM_BS] = tuple(req.tokens[: p + 1])
        req.computed += new
        self.mgr.commit(rid, req.tokens, req.computed)

    def _admit(self, rid: str, chunk: int) -> None:
        req = self.reqs[rid]
        hit = self.mgr.lookup_prefix(req.tokens)
        assert hit.num_tokens % SM_BS == 0 and hit.num_tokens <= max(0, len(req.tokens) - 1)
        for p in range(hit.num_tokens):  # a hit must hold exactly this prompt's KV
            assert self.kv[hit.blocks[p // SM_BS].block_id][p % SM_BS] == tuple(req.tokens[: p + 1])
        req.computed = hit.num_tokens
        self._step(rid, chunk, hit)
        if not req.allocated:
            req.computed = 0

    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 2), max_size=5))
    def add(self, prefix: list[int], suffix: list[int]) -> None:
        if len(self.reqs) < 8 and prefix + suffix:
            self.reqs[f"r{self.next_id}"] = Req(list(prefix) + suffix)
            self.next_id += 1

    @rule(i=st.integers(0, 7), chunk=st.integers(1, 6))
    def schedule(self, i: int, chunk: int) -> None:
        rid = self._pick(i)
        if rid is None:
            return
        req = self.reqs[rid]
        if not req.allocated:
            self._admit(rid, chunk)
        elif len(req.tokens) < MAX_LEN or req.computed < len(req.tokens):
            self._step(rid, chunk)

    @rule(chunk=st.integers(1, 6))
    def step_all(self, chunk: int) -> None:
        """One engine step: every request in id order, as a scheduler would."""
        for i in range(len(self.reqs)):
            self.schedule(i, chunk)

    @rule(i=st.integers(0, 7))
    def finish(self, i: int) -> None:
        rid = self._pick(i)
        if rid is not None:
            self.mgr.free(rid)
            del self.reqs[rid]

    @rule(i=st.integers(0, 7), chunk=st.integers(1, 6))
    def preempt(self, i: int, chunk: int) -> None:
        rid = self._pick(i, allocated=True)
        if rid is not None:
            self.mgr.free(rid)
            self.reqs[rid].allocated = False
            self.reqs[rid].computed = 0
            self._admit(rid, chunk)

    @rule(now=st.integers(0, 3))
    def reset(self, now: int) -> None:
        if now:  # rare: a successful reset empties the cache the other rules exercise
            return
        idle = not any(q.allocated for q in self.reqs.values())
        assert self.mgr.reset_prefix_cache() is idle
        if idle:
            assert self.mgr.pool.num_cached_blocks == 0

    @invariant()
    def integrity(self) -> None:
        self.mgr.check_integrity()

    @invariant()
    def free_plus_used_is_total(self) -> None:
        used = {b for rid, q in self.reqs.items() if q.allocated for b in self.mgr.block_ids(rid)}
        assert self.mgr.num_free_blocks + len(used) == SM_BLOCKS

    @invariant()
    def only_cached_prefix_blocks_are_shared(self) -> None:
        holders: dict[int, list[tuple[str, int]]] = {}
        for rid, q in self.reqs.items():
            for pos, bid in enumerate(self.mgr.block_ids(rid)):
                holders.setdefault(bid, []).append((rid, pos))
        for bid, owners in holders.items():
            if len(owners) > 1:
                assert self.mgr.pool.block(bid).block_hash is not None, f"uncached block {bid} shared: {owners}"
                assert len({pos for _, pos in owners}) == 1, f"block {bid} at different positions: {owners}"
                assert all((pos + 1) * SM_BS <= self.reqs[r].computed for r, pos in owners)

    @invariant()
    def shadow_kv_reads_back(self) -> None:
        for rid, q in self.reqs.items():
            ids = self.mgr.block_ids(rid)
            for p in range(q.computed if q.allocated else 0):
                assert self.kv[ids[p // SM_BS]][p % SM_BS] == tuple(q.tokens[: p + 1]), f"{rid} pos {p} clobbered"

    @invariant()
    def events_replay_to_the_cache(self) -> None:
        for ev in self.mgr.take_events():
            assert ev.seq == self.next_seq
            self.next_seq += 1
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == len(ev.block_hashes) * SM_BS
                assert hash_full_blocks(ev.token_ids, SM_BS, parent=ev.parent_block_hash) == ev.block_hashes
                assert not self.index & set(ev.block_hashes)
                self.index |= set(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert set(ev.block_hashes) <= self.index
                self.index -= set(ev.block_hashes)
            else:
                self.index.clear()
        pool = self.mgr.pool
        cached = {pool.block(i).block_hash for i in range(pool.num_blocks)} - {None}
        assert self.index == cached

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None:
            return  # a step already failed: report that, not the leak it leaves behind
        for rid in list(self.reqs):
            self.mgr.free(rid)
        self.reqs.clear()
        self.mgr.leak_check()


SM_SETTINGS = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = SM_SETTINGS


@pytest.mark.parametrize("broken", [LeakyManager, NoTouchManager])
def test_state_machine_catches_broken_managers(broken: type[KVCacheManager]) -> None:
    class Broken(KVCacheMachine):
        manager_cls = broken

    quick = settings(max_examples=200, stateful_step_count=30, deadline=None, phases=[Phase.generate], database=None)
    with pytest.raises((AssertionError, BlockPoolError)):
        run_state_machine_as_test(Broken, settings=quick)
