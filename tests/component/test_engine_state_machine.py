"""The real EngineCore under random add / step / abort sequences (Hypothesis state machine).

Each example gets a fresh tiny llama engine (the model loads in milliseconds)
with a deliberately cramped configuration:

    24 KV blocks of 4 tokens   -> two long requests already force preemption
    16 tokens per step         -> prompts longer than 16 are prefilled in chunks
    prefix caching on          -> prompts start from a few shared prefixes, so hits happen

After every rule the block pool's integrity is checked and the queues must
hold exactly the live requests. Each example ends by stepping until every
request is done (bounded), then `leak_check()`; and every request that
finished (was not aborted) must have produced exactly the greedy tokens a
separate big-cache engine gives for its prompt run alone. Whatever the
batching, chunking, preemption or prefix sharing did, the output is the same.

`test_cramped_engine_preempts_chunks_and_hits_prefix_cache` is the
deterministic witness that those paths are actually taken by this config.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from common.sampling_params import SamplingParams
from engine.engine_core import EngineCore
from engine.llm import LLM
from engine.request import Request, RequestStatus
from engine.scheduler import SchedulerOutput
from tests.helpers.tiny_models import make_tiny_hf_model

VOCAB = 512
BLOCK = 4
NUM_BLOCKS = 24
BUDGET = 16
MAX_PROMPT = 40
MAX_TOKENS = 10
_rng = random.Random(1234)
PREFIXES: tuple[tuple[int, ...], ...] = tuple(tuple(_rng.randrange(3, VOCAB) for _ in range(n)) for n in (8, 13, 20))


@dataclass
class ScheduleStats:
    """What the scheduler did, recorded by wrapping `scheduler.schedule` (no engine change needed)."""

    preemptions: int = 0
    chunked_prefills: int = 0  # a request scheduled fewer tokens than it had left
    max_step_tokens: int = 0
    prefix_hits: int = 0  # finished requests whose first schedule found cached prefix blocks (counted by the machine)

    def wrap(self, engine: EngineCore) -> None:
        inner = engine.scheduler.schedule

        def schedule() -> SchedulerOutput:
            out = inner()
            self.preemptions += len(out.preempted)
            self.max_step_tokens = max(self.max_step_tokens, out.num_tokens)
            for s in out.scheduled:
                if s.num_new_tokens < s.request.num_tokens - s.request.num_computed_tokens:
                    self.chunked_prefills += 1
            return out

        engine.scheduler.schedule = schedule  # type: ignore[method-assign]


class GreedyReference:
    """Greedy output of a prompt run alone on a big-cache engine, computed once per (prompt, max_tokens)."""

    def __init__(self, model_dir: Path) -> None:
        self.llm = LLM(str(model_dir), dtype="float32", block_size=16, num_blocks=64, enable_prefix_caching=False)
        self.cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self.cache:
            (out,) = self.llm.generate(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))
            self.cache[key] = out.token_ids
            self.llm.engine.leak_check()
        return self.cache[key]


def cramped_engine(model_dir: Path) -> LLM:
    return LLM(
        str(model_dir),
        dtype="float32",
        block_size=BLOCK,
        num_blocks=NUM_BLOCKS,
        max_num_batched_tokens=BUDGET,
        max_num_seqs=8,
        enable_prefix_caching=True,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("engine-sm"), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> GreedyReference:
    return GreedyReference(model_dir)


def long_prompt(seed: int, n: int = 30) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def drain(engine: EngineCore, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError(f"engine did not finish within {max_steps} steps: {list(engine.scheduler.requests.values())}")


class EngineMachine(RuleBasedStateMachine):
    def __init__(self, model_dir: Path, reference: GreedyReference, stats: ScheduleStats) -> None:
        super().__init__()
        # A fresh engine per example (loading the tiny model takes milliseconds): a prefix cache left
        # warm by an earlier example would change scheduling, and Hypothesis needs replays to match.
        self.engine = cramped_engine(model_dir).engine
        stats.wrap(self.engine)
        self.stats = stats
        self.reference = reference
        self.live: dict[str, Request] = {}
        self.finished: dict[str, Request] = {}
        self.streamed: dict[str, list[int]] = {}

    @rule(
        prefix=st.sampled_from([None, 0, 1, 2]),
        suffix=st.lists(st.integers(0, VOCAB - 1), max_size=MAX_PROMPT),
        length=st.integers(1, MAX_PROMPT),
        max_tokens=st.integers(1, MAX_TOKENS),
    )
    def add(self, prefix: int | None, suffix: list[int], length: int, max_tokens: int) -> None:
        prompt = (list(PREFIXES[prefix]) if prefix is not None else []) + suffix
        prompt = prompt[:length] or [1]
        rid = self.engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        req = self.engine.get_request(rid)
        assert req is not None and req.status is RequestStatus.WAITING
        self.live[rid] = req
        self.streamed[rid] = []

    @rule()
    def step(self) -> None:
        self._step()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live.pop(rid)
        assert self.engine.abort_request(rid)
        assert req.status is RequestStatus.FINISHED_ABORTED
        assert self.engine.kv_manager.num_blocks_of(rid) == 0
        assert not self.engine.abort_request(rid)  # second abort is a no-op
        event("aborted a request")

    @invariant()
    def consistent(self) -> None:
        self.engine.check_integrity()
        sched = self.engine.scheduler
        running = {r.request_id for r in sched.running}
        waiting = {r.request_id for r in sched.waiting}
        assert not running & waiting
        assert running | waiting == set(self.live) == set(sched.requests)
        for r in sched.waiting:
            assert self.engine.kv_manager.num_blocks_of(r.request_id) == 0

    def _step(self) -> None:
        for out in self.engine.step():
            assert out.request_id in self.live, f"output for a request that is not live: {out.request_id}"
            self.streamed[out.request_id] += out.new_token_ids
            if out.finished:
                req = self.live.pop(out.request_id)
                assert req.status.finished and out.finish_reason in ("stop", "length")
                self.finished[out.request_id] = req

    def teardown(self) -> None:
        for _ in range(1000):
            if not self.engine.has_unfinished_requests():
                break
            self._step()
        assert not self.live, f"requests never finished: {list(self.live.values())}"
        self.engine.leak_check()
        for rid, req in self.finished.items():
            assert self.streamed[rid] == req.output_token_ids, "streamed tokens differ from the request's tokens"
            expected = self.reference(req.prompt_token_ids, req.params.max_tokens)
            assert req.output_token_ids == expected, (
                f"{req!r} (preempted {req.num_preemptions}x, {req.num_cached_tokens} cached tokens) "
                f"gave {req.output_token_ids}, alone it gives {expected}"
            )
            if req.num_preemptions:
                event("finished after preemption")
            if req.num_cached_tokens > 0:
                self.stats.prefix_hits += 1
                event("finished with a prefix-cache hit")


def test_engine_state_machine(model_dir: Path, reference: GreedyReference) -> None:
    stats = ScheduleStats()

    class Machine(EngineMachine):  # a class, not a factory function: what hypothesis's annotation asks for
        def __init__(self) -> None:
            super().__init__(model_dir, reference, stats)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    assert stats.max_step_tokens <= BUDGET
    # derandomized, so these are facts about a fixed set of examples, not luck
    assert stats.preemptions > 0 and stats.chunked_prefills > 0 and stats.prefix_hits > 0, stats


def test_cramped_engine_preempts_chunks_and_hits_prefix_cache(model_dir: Path, reference: GreedyReference) -> None:
    """Deterministic witness: this configuration really exercises preemption, chunked prefill and prefix hits."""
    llm = cramped_engine(model_dir)
    stats = ScheduleStats()
    stats.wrap(llm.engine)
    engine = llm.engine
    shared = list(PREFIXES[2])  # 20 tokens = 5 full blocks
    prompts = [shared + [100] * 10, shared + [101] * 12, long_prompt(1), long_prompt(2)]  # 30, 32, 30, 30 tokens

    def request(rid: str) -> Request:
        req = engine.get_request(rid)
        assert req is not None
        return req

    first = engine.add_request(prompts[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    requests = [request(first)]
    engine.step()
    engine.step()  # 30 tokens in chunks of 16 + 14: the shared prefix is now committed
    for prompt in prompts[1:]:
        rid = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        requests.append(request(rid))
    # 10 + 11 + 10 + 10 blocks at the end, 5 of them shared: more than the 24 the cache has
    drain(engine)
    engine.leak_check()
    assert stats.preemptions > 0 and sum(r.num_preemptions for r in requests) == stats.preemptions
    assert stats.chunked_prefills > 0
    assert requests[1].num_cached_tokens >= len(shared), [r.num_cached_tokens for r in requests]
    for prompt, req in zip(prompts, requests):
        assert req.output_token_ids == reference(prompt, MAX_TOKENS)
