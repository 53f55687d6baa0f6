"""Measuring a worker's step-time model on its own engine: synthetic requests, stepped and timed.

`tandem profile` (deploy/profile_cli.py) calls the worker actor's `profile(plan)`, which runs
`profile_steps(core, plan)` on the engine thread as one command (AsyncEngine.profile): nothing else
steps the engine meanwhile, and the engine must hold no request and no KV lease (ProfileBusyError
otherwise: drain the worker first).

The sweep (common.contract.ProfilePlan; every size is capped by the token budget, max_num_seqs, the
model's context and the KV capacity, and a point that cannot fit is left out):

    warm-up   a short request; its `warmup_steps` steps run and are not recorded (first-touch page
              faults, allocator growth, lazily built kernels)
    prefill   prompts of each length alone, each one chunk (lengths above the token budget are dropped)
    cached    the first ctx tokens of an earlier prompt (cached) plus n new ones: a chunk attending to a
              context (attention pairs apart from prompt tokens)
    decode    per context C: B requests of C distinct tokens each are admitted the way a decode worker
              admits requests prefilled elsewhere (EngineCore.add_remote_request, allocate_remote_kv,
              finish_remote_kv), so each row owns its C tokens' blocks without B x C tokens of prefill;
              the blocks hold what the pool held (zeros, or an earlier prompt's values), which a step
              reads at the same speed as its own. Their first step is already a decode step, and
              `decode_steps` steps are timed at each batch size, largest first (the excess requests are
              aborted between sizes); a batch whose rows' blocks do not fit the pool is left out, as a
              served worker could never run it. Rows sharing one cached prefix (how this sweep set up
              its rows before) read the same blocks, which stay in the CPU's caches: at 16 rows of 512
              tokens a step measured 131 against 163 ms with rows of their own (docs/BENCHMARKS.md)
    mixed     at the batch sizes `mixed` names, a fresh prompt joins the decodes: one mixed step

Every step after the warm-up is recorded with the features the engine computed for it
(EngineCore.last_step_features): what ran, not what the sweep meant to run. `clock()` is read right
before and right after each `step()` (tests inject a clock that advances by a known model).
Afterwards every profiling request is aborted (a lease released), the prefix cache is cleared (its
blocks hold synthetic prompts; the AllCleared event reaches the router with the other KV events),
and the block pool must be intact and hold nothing (EngineCore.check_integrity, leak_check).

Proposals of speculative decoding are not made here: the profiling requests decode without
verification rows unless the engine is configured to speculate (then the rows are counted as the
engine ran them). Imports no torch: it drives EngineCore's public methods only.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from common.contract import ProfilePlan, StepTiming
from common.sampling_params import SamplingParams

MAX_STEPS = 100_000  # a drain that has not ended after this many steps is a bug, not a slow engine


class ProfileBusyError(RuntimeError):
    """The engine holds requests or KV leases; profiling needs an idle worker."""


def profile_steps(core: Any, plan: ProfilePlan, clock: Callable[[], float] = time.perf_counter) -> list[StepTiming]:
    """Run `plan` on an idle EngineCore (its thread: nothing else may touch it meanwhile); every step after
    the warm-up as (prompt tokens, attention pairs, decode rows, decode context, seconds)."""
    running, waiting, leased = core.counts()
    if core.scheduler.requests or core.leases:
        raise ProfileBusyError(
            f"the engine holds {running} running and {waiting} waiting requests and {leased} KV leases: "
            "profile an idle worker (drain it, or wait until its requests finish)"
        )
    sweep = _Sweep(core, plan, clock)
    try:
        sweep.run()
    finally:
        sweep.cleanup()
    return sweep.samples


class _Sweep:
    def __init__(self, core: Any, plan: ProfilePlan, clock: Callable[[], float]) -> None:
        self.core = core
        self.plan = plan
        self.clock = clock
        self.rng = random.Random(plan.seed)
        self.samples: list[StepTiming] = []
        self.ids: list[str] = []
        self.warmup_left = 0
        sched = core.config.scheduler
        self.budget = sched.max_num_batched_tokens
        self.max_seqs = sched.max_num_seqs
        self.block_size = core.kv_spec.block_size
        self.num_blocks = core.kv_spec.num_blocks
        self.max_len = core.max_model_len
        self.vocab = core.model_config.vocab_size

    # ---- the sweep ------------------------------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        if plan.warmup_steps > 0:
            self.warmup_left = plan.warmup_steps
            self.add(self.fresh(min(32, self.budget)), plan.warmup_steps)  # 1 prefill + the rest decode steps
            self.drain()
            self.warmup_left = 0
        for _ in range(max(plan.prefill_repeats, 1)):
            for n in plan.prefill_lengths:
                if n <= self.budget and self.fits(n + 1):
                    self.add(self.fresh(n), 1)
                    self.drain()
        self.cached()
        for context in plan.decode_contexts:
            self.decode(context)

    def cached(self) -> None:
        """Chunks of n new tokens after ctx cached ones: one base prompt, then its prefixes plus new tokens."""
        bs = self.block_size
        points = [((ctx // bs) * bs, n) for ctx, n in self.plan.cached]
        points = [(c, n) for c, n in points if c >= bs and 0 < n <= self.budget and self.fits(c + n + 1)]
        if not points:
            return
        base = self.fresh(max(c for c, _ in points))
        self.add(base, 1)
        self.drain()
        for ctx, n in points:
            self.add(base[:ctx] + self.fresh(n), 1)
            self.drain()

    def decode(self, context: int) -> None:
        """Decode steps at each batch size (largest first) with rows of about `context` tokens each."""
        plan, bs = self.plan, self.block_size
        context = max((context // bs) * bs, bs)
        points = len(plan.decode_batches) + len(plan.mixed)
        max_tokens = plan.decode_steps * points + 4  # never finishes before the sweep aborts it
        if context + 1 + max_tokens > self.max_len - 1:
            return
        per_request = _blocks(context + 1 + max_tokens, bs)
        room = self.num_blocks - 2  # slack for a mixed prompt's tail
        batches = sorted({b for b in plan.decode_batches if 0 < b <= self.max_seqs and b * per_request <= room})
        if not batches:
            return
        live = [self.add(self.fresh(context), max_tokens, prefilled=True) for _ in range(batches[-1])]
        while self.core.pending_prefill_tokens() > 0:
            self.step()
        for batch in reversed(batches):
            for rid in live[batch:]:
                self.core.abort_request(rid)
            live = live[:batch]
            for mixed_batch, n in self.plan.mixed:
                free = self.core.kv_manager.num_free_blocks - _blocks(n + 1, bs)
                if mixed_batch == batch and n + batch <= self.budget and free >= 0:
                    self.add(self.fresh(n), 1)  # computed in the next step, beside the decodes
                    self.step()
            for _ in range(plan.decode_steps):
                self.step()
        for rid in live:
            self.core.abort_request(rid)

    # ---- pieces ---------------------------------------------------------------------------------------------

    def fresh(self, n: int) -> list[int]:
        """n random token ids: no prompt shares a prefix with another by chance."""
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def fits(self, tokens: int) -> bool:
        """A request of `tokens` tokens is valid here and fits the cache beside a few blocks of others."""
        return tokens <= self.max_len - 1 and _blocks(tokens, self.block_size) <= self.num_blocks - 2

    def add(self, prompt: list[int], max_tokens: int, prefilled: bool = False) -> str:
        """A request of `prompt`, computed by the engine's steps; or, `prefilled`, admitted with its KV in
        blocks of its own as if prefilled elsewhere, its first token drawn at random: its next step decodes."""
        rid = f"profile-{len(self.ids)}"
        self.ids.append(rid)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        if not prefilled:
            self.core.add_request(prompt, params, rid)
            return rid
        self.core.add_remote_request(prompt, params, rid, self.rng.randrange(self.vocab))
        if self.core.allocate_remote_kv(rid) is None:  # decode() only asks for rows that fit the pool
            raise RuntimeError(f"profiling: {len(prompt)} tokens of KV do not fit beside the sweep's other rows")
        self.core.finish_remote_kv(rid)
        return rid

    def step(self) -> None:
        t0 = self.clock()
        self.core.step()
        t1 = self.clock()
        features = self.core.last_step_features
        if not (features[0] or features[2]):
            return  # nothing was scheduled
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return
        self.samples.append((*features, t1 - t0))

    def drain(self) -> None:
        for _ in range(MAX_STEPS):
            if not self.core.has_unfinished_requests():
                return
            self.step()
        raise RuntimeError(f"profiling requests still unfinished after {MAX_STEPS} steps")

    def cleanup(self) -> None:
        """Every profiling request gone, the synthetic prefixes forgotten, the pool intact and empty."""
        for rid in self.ids:
            self.core.abort_request(rid)
        self.core.kv_manager.reset_prefix_cache()
        self.core.check_integrity()
        self.core.leak_check()


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)
