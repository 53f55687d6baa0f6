"""Scheduler + KV cache manager under random add / step / abort sequences.

A fake model step stands in for the forward pass: it marks the scheduled tokens
computed, commits them, and appends a sampled token to requests that reached the
end of their tokens. The invariants are checked after every rule, and the run
ends in a leak check: every block free, every ref count zero.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.errors import ConfigError
from common.prefill_share import OVERDUE_TARGETS, hopeless
from common.sampling_params import SamplingParams
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.sampler import SamplingState
from engine.scheduler import Scheduler, SchedulerOutput

BLOCK = 4


def make_request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, prompt, params, SamplingState.create(params), None)


def fake_step(sched: Scheduler, rng: random.Random, vocab: int = 8) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step without a model. Returns its schedule and the requests that finished."""
    out = sched.schedule()
    finished: list[Request] = []
    for s in out.scheduled:
        req = s.request
        assert s.block_ids == sched.kv.block_ids(req.request_id)
        assert len(s.block_ids) * BLOCK >= req.num_computed_tokens + s.num_new_tokens
        req.num_computed_tokens += s.num_new_tokens
        sched.kv.commit(req.request_id, req.token_ids, req.num_computed_tokens)
    for s in out.scheduled:
        req = s.request
        if req.num_computed_tokens == req.num_tokens:
            req.token_ids.append(rng.randrange(vocab))
            if req.num_output_tokens >= req.params.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH, FinishReason.LENGTH)
                finished.append(req)
    return out, finished


class SchedulerMachine(RuleBasedStateMachine):
    join_tokens: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.cfg = SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=5, prefill_join_tokens=self.join_tokens)
        self.kv = KVCacheManager(num_blocks=14, block_size=BLOCK)
        self.sched = Scheduler(self.cfg, self.kv)
        self.n = 0
        self.live: dict[str, Request] = {}
        self.preemptions = 0

    @rule(prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 12), shared=st.booleans())
    def add(self, prompt_len: int, max_tokens: int, shared: bool) -> None:
        if prompt_len + max_tokens > 14 * BLOCK:  # the engine refuses these up front
            return
        prefix = [1, 2, 3, 4, 5, 6, 7, 0] if shared else []
        prompt = (prefix + [self.rng.randrange(8) for _ in range(prompt_len)])[:prompt_len]
        rid = f"r{self.n}"
        self.n += 1
        req = make_request(rid, prompt, max_tokens)
        self.sched.add(req)
        self.live[rid] = req

    @rule()
    def step(self) -> None:
        out, finished = fake_step(self.sched, self.rng)
        assert out.num_tokens <= self.cfg.max_num_batched_tokens
        self.preemptions += len(out.preempted)
        for req in finished:
            del self.live[req.request_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.sched.abort(rid)
        assert req is not None and req.status is RequestStatus.FINISHED_ABORTED
        assert self.kv.num_blocks_of(rid) == 0
        del self.live[rid]

    @invariant()
    def consistent(self) -> None:
        self.kv.check_integrity()
        assert len(self.sched.running) <= self.cfg.max_num_seqs
        running = {r.request_id for r in self.sched.running}
        waiting = {r.request_id for r in self.sched.waiting}
        assert not running & waiting
        assert running | waiting == set(self.live)
        for r in self.sched.waiting:  # waiting requests hold no KV
            assert self.kv.num_blocks_of(r.request_id) == 0

    def teardown(self) -> None:
        # drain: every live request must finish within a bounded number of steps (no starvation, no deadlock)
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            _, finished = fake_step(self.sched, self.rng)
            for req in finished:
                self.live.pop(req.request_id)
        assert not self.sched.has_unfinished(), f"scheduler stuck with {self.sched.running + list(self.sched.waiting)}"
        self.kv.leak_check()


class TtftFirstSchedulerMachine(SchedulerMachine):
    """The same invariants with prompts served oldest first (prefill_join_tokens): no starvation either."""

    join_tokens = 6


TestSchedulerMachine = SchedulerMachine.TestCase
TestTtftFirstSchedulerMachine = TtftFirstSchedulerMachine.TestCase
for _case in (TestSchedulerMachine, TestTtftFirstSchedulerMachine):
    _case.settings = settings(
        max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def _first_token_steps(join: int | None, prompts: list[int], budget: int = 64) -> dict[str, int]:
    """The step at which each prompt (all added at once, named p0, p1, ...) gets its first token."""
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, prefill_join_tokens=join), kv)
    reqs = [make_request(f"p{i}", [i + 1] * n, 2) for i, n in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    rng, first, step = random.Random(5), {}, 0
    while sched.has_unfinished():
        step += 1
        out, _ = fake_step(sched, rng)
        assert out.num_tokens <= budget
        for r in reqs:
            if r.num_output_tokens and r.request_id not in first:
                first[r.request_id] = step
    kv.leak_check()
    return first


def test_ttft_first_prefills_the_oldest_prompt_alone() -> None:
    """Three prompts that fit one step: filled, all three wait for it; TTFT first, one per step, in order,
    and the step's prompt tokens are the first prompt's alone."""
    assert _first_token_steps(None, [20, 15, 12]) == {"p0": 1, "p1": 1, "p2": 1}
    assert _first_token_steps(0, [20, 15, 12]) == {"p0": 1, "p1": 2, "p2": 3}
    assert _first_token_steps(8, [20, 15, 12]) == {"p0": 1, "p1": 2, "p2": 3}  # none short enough to join


def test_ttft_first_joins_short_prompts_whole_and_in_order() -> None:
    """Later prompts join whole while the step's prompt tokens stay within join_tokens; the first refused
    closes the step, so a shorter prompt behind it does not overtake it."""
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefill_join_tokens=8), kv)
    for i, n in enumerate([2, 3, 4, 1, 2]):
        sched.add(make_request(f"p{i}", [i + 1] * n, 2))
    out, _ = fake_step(sched, random.Random(6))
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("p0", 2), ("p1", 3)]
    assert [r.request_id for r in sched.waiting] == ["p2", "p3", "p4"]


def test_ttft_first_chunks_a_long_prompt_and_keeps_decoding() -> None:
    """A prompt longer than the budget is chunked as before; decode rows run in every step beside it, and a
    chunked prompt continues before a newer one starts."""
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, prefill_join_tokens=0), kv)
    rng = random.Random(7)
    sched.add(make_request("d", [9, 9], 6))
    fake_step(sched, rng)  # d prefilled: decodes from now on
    sched.add(make_request("long", list(range(20)), 2))
    sched.add(make_request("next", [5, 6, 7], 2))
    steps = []
    while sched.has_unfinished():
        out, _ = fake_step(sched, rng)
        steps.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
    assert steps[:4] == [
        [("d", 1), ("long", 9)],
        [("d", 1), ("long", 9)],
        [("d", 1), ("long", 2)],  # the rest of the long prompt; "next" does not join it
        [("d", 1), ("long", 1), ("next", 3)],
    ]
    kv.leak_check()


def test_prefill_join_tokens_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="prefill_join_tokens must be >= 0"):
        SchedulerConfig(prefill_join_tokens=-1)


def test_preemption_then_recompute_frees_and_finishes() -> None:
    """Two long requests in a cache that holds only one: the newer is preempted, then completes."""
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), kv)
    a = make_request("a", list(range(8)), 12)
    b = make_request("b", list(range(8, 16)), 12)
    sched.add(a)
    sched.add(b)
    rng = random.Random(1)
    preempted = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out, _ = fake_step(sched, rng)
        preempted += [r.request_id for r in out.preempted]
    assert not sched.has_unfinished()
    assert preempted and preempted[0] == "b"  # the newest running request goes first
    assert b.num_preemptions >= 1 and a.num_output_tokens == 12 and b.num_output_tokens == 12
    kv.leak_check()


def test_chunked_prefill_respects_budget_and_continues() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4), kv)
    req = make_request("long", list(range(25)), 2)
    sched.add(req)
    rng = random.Random(2)
    chunks = []
    while sched.has_unfinished():
        out, _ = fake_step(sched, rng)
        chunks.append([s.num_new_tokens for s in out.scheduled])
    assert chunks == [[10], [10], [5], [1]]
    kv.leak_check()


def test_continuous_batching_new_request_joins_running_batch() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), kv)
    rng = random.Random(3)
    sched.add(make_request("a", [1, 2, 3], 5))
    fake_step(sched, rng)
    sched.add(make_request("b", [4, 5, 6, 7], 5))
    out, _ = fake_step(sched, rng)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 4)]
    while sched.has_unfinished():
        fake_step(sched, rng)
    kv.leak_check()


def test_max_num_seqs_caps_running() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2), kv)
    for i in range(4):
        sched.add(make_request(f"r{i}", [i, i + 1], 3))
    out, _ = fake_step(sched, random.Random(4))
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2
    for rid in ("r0", "r1", "r2", "r3"):
        sched.abort(rid)
    kv.leak_check()


@pytest.mark.parametrize("when", ["waiting", "running", "mid_prefill"])
def test_abort_at_any_point_frees_blocks(when: str) -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8 if when == "mid_prefill" else 64, max_num_seqs=4), kv)
    req = make_request("x", list(range(20)), 4)
    sched.add(req)
    if when != "waiting":
        fake_step(sched, random.Random(5))
        assert kv.num_blocks_of("x") > 0
    sched.abort("x")
    assert req.status is RequestStatus.FINISHED_ABORTED and req.finish_reason is FinishReason.ABORT
    assert not sched.has_unfinished()
    kv.leak_check()


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _triage_scheduler(target_s: float, token_s: float) -> tuple[Scheduler, _Clock]:
    clock = _Clock()
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    cfg = SchedulerConfig(max_num_batched_tokens=64, prefill_join_tokens=0, ttft_target_s=target_s)
    sched = Scheduler(cfg, kv, clock)
    sched.prefill_token_s = token_s
    return sched, clock


def _arrive(sched: Scheduler, clock: _Clock, rid: str, tokens: int) -> Request:
    req = make_request(rid, [len(rid)] * tokens, 2)
    req.arrival_time = clock.t
    sched.add(req)
    return req


def test_slo_triage_serves_a_prompt_that_can_still_make_its_target_before_a_lost_one() -> None:
    """Target 10 s, 0.1 s per prompt token. At t=5 the prompt that came at t=0 would end at 5 + 10 s > 10 s
    after its arrival (lost); the one that just came (2 s of prefill) can make it, and goes first. Once lost
    prompts have waited OVERDUE_TARGETS targets they are served in their turn again."""
    sched, clock = _triage_scheduler(10.0, 0.1)
    _arrive(sched, clock, "old", 100)
    clock.t = 5.0
    _arrive(sched, clock, "new", 20)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["new"]
    assert [r.request_id for r in sched.waiting] == ["old"]

    sched, clock = _triage_scheduler(10.0, 0.1)
    _arrive(sched, clock, "old", 100)
    clock.t = 4 * 10.0 + 1  # overdue: first come, first served again
    _arrive(sched, clock, "new", 20)
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["old"]


def test_slo_triage_keeps_first_come_first_served_while_all_can_or_none_can_make_it() -> None:
    sched, clock = _triage_scheduler(10.0, 0.01)  # fast: both can make it
    _arrive(sched, clock, "a", 100)
    clock.t = 5.0
    _arrive(sched, clock, "b", 20)
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["a"]

    sched, clock = _triage_scheduler(10.0, 1.0)  # slow: neither can
    _arrive(sched, clock, "a", 100)
    clock.t = 5.0
    _arrive(sched, clock, "b", 20)
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["a"]

    sched, clock = _triage_scheduler(0.0, 0.1)  # no target: no triage
    _arrive(sched, clock, "a", 100)
    clock.t = 50.0
    _arrive(sched, clock, "b", 20)
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["a"]


def test_slo_triage_speed_is_measured_from_long_prefill_steps_only() -> None:
    sched, _ = _triage_scheduler(10.0, 0.0)
    sched.observe_prefill(8, 5.0)  # too few prompt tokens: a decode-dominated step says nothing
    assert sched.prefill_token_s == 0.0
    sched.observe_prefill(100, 1.0)
    assert sched.prefill_token_s == pytest.approx(0.01)
    sched.observe_prefill(100, 2.0)
    assert sched.prefill_token_s == pytest.approx(0.7 * 0.01 + 0.3 * 0.02)


@pytest.mark.parametrize(
    ("waited", "compute", "target", "lost"),
    [
        (0.0, 3.0, 4.0, False),  # can make it
        (1.0, 3.0, 4.0, False),  # exactly on time
        (1.5, 3.0, 4.0, True),  # would end 0.5 s late
        (16.0, 3.0, 4.0, True),  # waited OVERDUE_TARGETS targets: still lost, not yet overdue
        (16.1, 3.0, 4.0, False),  # overdue: served in its turn again
        (30.0, 3.0, 0.0, False),  # no target: nothing is lost
    ],
)
def test_hopeless_golden_cases(waited: float, compute: float, target: float, lost: bool) -> None:
    assert OVERDUE_TARGETS == 4.0
    assert hopeless(waited, compute, target) is lost
