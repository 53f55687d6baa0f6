"""AsyncEngine: an EngineCore on its own thread, driven from asyncio.

A worker actor is an asyncio program (Ray calls, transfer polling, streams), while
`EngineCore.step()` is blocking tensor work. So the engine gets one thread that owns
it; nothing else ever touches the EngineCore:

    asyncio loop (actor)                         engine thread
    ───────────────────                          ─────────────
    await add_request(..), release_kv(id), ...  (named methods, below)
      -> call(fn) ── command queue ───────────>  fn(core) between two steps
                    <── loop.call_soon_threadsafe(future.set_result)
    open_stream(id) -> asyncio.Queue             step() -> [StepOutput]
                    <── call_soon_threadsafe(_deliver, outputs) ─┘
    wait_capacity()  <── set after every step that finished something
    on_kv_events(ev) <── call_soon_threadsafe: the block pool's KV events, drained
                         after every step and command (before the command's result)

The roles reach the engine only through the named methods below ("what the roles ask of
the engine"): each is one EngineCore call, run as a command between two steps, and says
which EngineCore method it runs. `call(fn)` is the primitive under them (tests use it to
look at engine state directly).

The thread sleeps on an Event while the engine has no work. A failing step is fatal
for the engine: every open stream gets an error chunk and `healthy` turns False.

Imports no ray.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from common.contract import ProfilePlan, StepTiming
from common.kv_events import KVEvent
from common.perf_model import StepTimes
from common.sampling_params import SamplingParams
from engine.engine_core import EngineCore
from engine.outputs import StepOutput
from planner.model import LiveFit
from worker_core.core_share import TPOT_SLACK_IDLE_S, CoreShare, LendBudget
from worker_core.profiling import profile_steps

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineStats:
    """Load figures as of the engine thread's last step or command."""

    free_blocks: int = 0
    running: int = 0
    waiting: int = 0
    leased: int = 0
    prefill_tokens: int = 0  # tokens still to compute before a first token (EngineCore.pending_prefill_tokens)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hit_tokens: int = 0  # ... of which found there
    spec_steps: int = 0  # speculative decoding since start: verification steps, tokens proposed, accepted
    spec_proposed: int = 0
    spec_accepted: int = 0


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a step failed or the worker is shutting down)."""


WIDEN_MIN_PREFILL_TOKENS = 128  # a step borrows idle cores only with at least this much prompt left to compute


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        name: str = "engine",
        on_kv_events: Callable[[list[KVEvent]], None] | None = None,
        core_share: CoreShare | None = None,
        borrow: bool = True,
        lend: LendBudget | None = None,
    ) -> None:
        """`core_share`: this worker's slot in the host's table (worker_core/core_share.py); with `borrow`, a
        step with a long prompt left runs on the cores peers leave idle or lend; with `lend`, the worker pauses
        between its steps while a peer wants its core and the budget allows. None: the torch thread count
        stays as the process set it."""
        self.core = core
        self.core_share = core_share
        self.borrow = borrow and core_share is not None
        self.lend = lend if core_share is not None else None
        self._threads = torch.get_num_threads()
        self.widened_steps = 0  # steps that ran on borrowed cores
        self.lends = 0  # pauses for a peer's widened step
        # the smallest TPOT slack of the running requests, as of the last step (LendBudget.slack; lenders only):
        # what the router weighs a local prefill on this worker against (router/placement.py)
        self.tpot_slack_s: float | None = TPOT_SLACK_IDLE_S if self.lend is not None else None
        self.on_kv_events = on_kv_events
        self.name = name
        self.healthy = True
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[EngineCore], Any], asyncio.Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._dead = False  # set by the engine thread as it exits
        self._thread: threading.Thread | None = None
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._capacity = asyncio.Event()
        # as of the last step or command: status readers must not wait behind a long step
        # (a 2048-token prefill can take seconds)
        self.stats: EngineStats = self._read_stats()
        self.step_times = StepTimes()  # this worker's performance model, from its own steps (engine thread writes)
        self.live_fit = LiveFit()  # the planner's five-feature step model, refitted from live steps (warm only)
        # a worker of several ranks tells them it is alive well within their collective timeout
        world = core.config.parallel.world_size
        self.keepalive_s = core.config.parallel.collective_timeout_s / 4 if world > 1 else None

    def _read_stats(self) -> EngineStats:
        core = self.core
        sched = core.scheduler
        return EngineStats(
            core.kv_manager.num_free_blocks,
            *core.counts(),
            core.pending_prefill_tokens(),
            sched.prefix_query_tokens,
            sched.prefix_hit_tokens,
            core.spec_steps,
            core.spec_proposed,
            core.spec_accepted,
        )

    def _publish(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engine thread, after a step or command: fresh stats, and the KV events it caused to the loop."""
        self.stats = self._read_stats()
        events = self.core.kv_manager.take_events()
        if events and self.on_kv_events is not None:
            loop.call_soon_threadsafe(self.on_kv_events, events)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from inside the event loop that will use this object."""
        self._loop = asyncio.get_running_loop()
        self._capacity = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.core_share is not None:
            self.core_share.close()

    # ---- asyncio side -------------------------------------------------------------------------------------------

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run fn(core) on the engine thread between two steps and return its result (or raise its error).

        The primitive under the named methods below; a role calls those, not this."""
        if self._dead or not self.healthy or self._loop is None:
            raise EngineDeadError(f"{self.name}: engine is not running ({self.error or 'not started'})")
        fut: asyncio.Future = self._loop.create_future()
        self._commands.put((fn, fut))
        self._wake.set()
        if self._dead:  # the thread died between the check and the put: nobody else will answer
            self._drain_commands(self._loop, EngineDeadError(f"{self.name}: engine is not running"))
        return await fut

    def open_stream(self, request_id: str) -> asyncio.Queue[StepOutput | BaseException]:
        """Register for a request's StepOutputs; call before the request is added."""
        q: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = q
        return q

    # ---- what the roles ask of the engine: one EngineCore call each, between two steps ------------------------------

    async def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        kv_handoff: bool = False,
        prior_output_ids: Sequence[int] = (),
    ) -> str:
        """EngineCore.add_request: queue a request to prefill here (open its stream first). `kv_handoff`
        (prefill role): after token 1 its blocks are leased, not freed, until `release_kv`."""
        return await self.call(
            lambda core: core.add_request(
                prompt_ids, params, request_id, kv_handoff=kv_handoff, prior_output_ids=prior_output_ids
            )
        )

    async def add_remote_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        first_token: int,
        prior_output_ids: Sequence[int] = (),
    ) -> StepOutput:
        """EngineCore.add_remote_request (decode role): register a request prefilled elsewhere and replay
        its token 1 through the stop checks and detokenizer; the output says whether that ended it."""
        return await self.call(
            lambda core: core.add_remote_request(prompt_ids, params, request_id, first_token, prior_output_ids)
        )

    async def allocate_remote_kv(self, request_id: str) -> tuple[list[int], int] | None:
        """EngineCore.allocate_remote_kv (decode role): blocks for the prompt's KV, less the local prefix
        cache's hit: (block ids to fill, index of the first in the prompt's block list), or None while
        the pool cannot hold them."""
        return await self.call(lambda core: core.allocate_remote_kv(request_id))

    async def finish_remote_kv(self, request_id: str) -> None:
        """EngineCore.finish_remote_kv (decode role): the KV has landed; the request joins the batch."""
        await self.call(lambda core: core.finish_remote_kv(request_id))

    async def release_kv(self, request_id: str) -> bool:
        """EngineCore.release_kv (prefill role): end a KV lease; its freed blocks wake `wait_capacity`
        waiters. False if there was no lease."""
        released = await self.call(lambda core: core.release_kv(request_id))
        if released:
            self.notify_capacity()
        return released

    async def kv_snapshot(self) -> tuple[int, list[bytes]]:
        """KVCacheManager.kv_snapshot: (next KV event seq, every cached block hash)."""
        return await self.call(lambda core: core.kv_manager.kv_snapshot())

    async def holds_work(self) -> bool:
        """True while the engine holds any request (queued, running, waiting for KV) or KV lease."""
        return await self.call(lambda core: bool(core.scheduler.requests or core.leases))

    async def check_integrity(self) -> None:
        """EngineCore.check_integrity: the block pool's and tables' invariants (raises if broken)."""
        await self.call(lambda core: core.check_integrity())

    async def leak_check(self) -> None:
        """EngineCore.check_integrity, then EngineCore.leak_check: nothing held anywhere."""

        def check(core: EngineCore) -> None:
            core.check_integrity()
            core.leak_check()

        await self.call(check)

    async def profile(self, plan: ProfilePlan) -> list[StepTiming]:
        """worker_core.profiling.profile_steps: synthetic requests stepped and timed on this engine, as one
        command (every other command and request waits until it ends: seconds to minutes). Refused
        (ProfileBusyError) while the engine holds a request or lease; leaves the block pool empty.
        The sweep runs on `plan.threads` torch threads when that is > 0, else on the worker's own (its base
        in the host's core table: the last step may have run widened), then on the engine's count again."""
        threads = plan.threads if plan.threads > 0 else self.core_share.base if self.core_share is not None else 0

        def run(core: EngineCore) -> list[StepTiming]:
            if threads <= 0 or threads == self._threads:
                return profile_steps(core, plan)
            torch.set_num_threads(threads)
            try:
                return profile_steps(core, plan)
            finally:
                torch.set_num_threads(self._threads)

        return await self.call(run)

    async def abort(self, request_id: str) -> bool:
        """EngineCore.abort_request: abort a request in any state; an open stream gets a final "abort"
        output (so no reader hangs)."""
        aborted = await self.call(lambda core: core.abort_request(request_id))
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(StepOutput(request_id, [], "", finished=True, finish_reason="abort"))
        if aborted:
            self.notify_capacity()
        return aborted

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def wait_capacity(self, timeout_s: float) -> bool:
        """Wait until a step finished a request (blocks may be free); False on timeout."""
        event = self._capacity
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def _deliver(self, outputs: list[StepOutput], freed: bool) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if freed:
            self.notify_capacity()

    def notify_capacity(self) -> None:
        """Wake every `wait_capacity` waiter (a finish, abort or release freed blocks)."""
        self._capacity.set()
        self._capacity = asyncio.Event()

    def _fail_all(self, error: str) -> None:
        self.healthy = False
        self.error = error
        for q in self._streams.values():
            q.put_nowait(EngineDeadError(error))
        self.notify_capacity()

    # ---- engine thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None  # set by start()
        self._threads = torch.get_num_threads()  # this thread's own (OpenMP keeps a count per thread)
        try:
            while not self._stop:
                self._run_commands(loop)
                if self.core.has_unfinished_requests():
                    before = len(self.core.scheduler.requests)
                    self._widen(True)
                    if self._lend():
                        continue  # commands came in during the pause: run them, then pause again or step
                    # neighbours stepping as this step starts: what the simulator's contention counts
                    busy = self.core_share.busy_peers() if self.core_share is not None else 0
                    t0 = self.core.clock()
                    outputs = self.core.step()
                    t1 = self.core.clock()
                    # a widened step ran on cores a peer left idle or lent: the models keep this worker's own speed
                    widened = self.core_share is not None and self._threads > self.core_share.base
                    self.step_times.observe(*self.core.last_step_shape, t1 - t0, now=t1, widened=widened)
                    if self.lend is not None:
                        self.lend.observe(t1 - t0, *self.core.last_step_shape)
                    if not widened:  # with the host's load beside it: the planner tells speed from contention
                        self.live_fit.observe(self.core.last_step_features, t1 - t0, t1, busy)
                    self._publish(loop)
                    freed = len(self.core.scheduler.requests) < before or any(o.finished for o in outputs)
                    if outputs or freed:
                        loop.call_soon_threadsafe(self._deliver, outputs, freed)
                else:
                    self._widen(False)
                    if self.lend is not None:
                        self.tpot_slack_s = TPOT_SLACK_IDLE_S
                    if not self._wake.wait(self.keepalive_s) and not self._stop:
                        self.core.executor.keepalive()  # idle tp x pp ranks wait on a collective with a timeout
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - any step failure ends this engine; report, don't vanish
            log.exception("%s: engine step failed", self.name)
            msg = f"engine step failed: {type(e).__name__}: {e}"
            self._dead = True
            loop.call_soon_threadsafe(self._fail_all, msg)
            self._drain_commands(loop, EngineDeadError(msg))
            return
        self._dead = True
        self._drain_commands(loop, EngineDeadError(f"{self.name}: engine stopped"))

    def _widen(self, busy: bool) -> None:
        """Engine thread: say whether this worker has work, and take the threads the host can spare, for a
        step with at least WIDEN_MIN_PREFILL_TOKENS to prefill. Decode steps stay at the base: their ops
        are small, and a thread the OS has not scheduled (the router, a client) stalls every OpenMP
        barrier (benchmarks measured a 4x576 @ 576x1536 matmul 18x slower on two threads of a busy host)."""
        if self.core_share is None:
            return
        if busy and self.borrow and self.core.pending_prefill_tokens() >= WIDEN_MIN_PREFILL_TOKENS:
            threads = self.core_share.widen()
        else:
            self.core_share.threads(busy)
            threads = self.core_share.base
        if busy and threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads
        if busy and threads > self.core_share.base:
            self.widened_steps += 1

    def _lend(self) -> bool:
        """Engine thread, before a step: publish whether this worker may pause for a peer (its requests' TPOT
        slack, LendBudget) and pause while a peer wants its core. True when commands interrupted the pause."""
        if self.lend is None or self.core_share is None:
            return False
        core = self.core
        clocks = [
            (
                r.first_token_time if r.first_token_time is not None else r.arrival_time,
                r.num_output_tokens,
                r.params.max_tokens,
            )
            for r in core.scheduler.requests.values()
        ]
        now = core.clock()
        slack = self.lend.slack(now, clocks)  # once per step: the router's figure and this pause both use it
        self.tpot_slack_s = min(slack, TPOT_SLACK_IDLE_S)
        allowed = self.lend.pause(slack, clocks)
        may = allowed >= self.lend.min_s and allowed > 0
        self.core_share.offer(may)
        if not may or not self.core_share.peer_wants():
            return False
        self.lends += 1
        self.core_share.lend(allowed, stop=lambda: self._stop or not self._commands.empty())
        return not self._stop and not self._commands.empty()

    @property
    def threads(self) -> int:
        """Torch threads of the last step."""
        return self._threads

    def _run_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        """The commands queued when this starts; one that arrives meanwhile waits for the next step, so
        a caller that keeps calling (a poll) cannot hold the engine off its steps."""
        for _ in range(self._commands.qsize()):
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(self.core)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
                self._publish(loop)
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self._publish(loop)  # before the caller resumes: it may ask for status (or a snapshot) next
                loop.call_soon_threadsafe(_set_result, fut, result)

    def _drain_commands(self, loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            loop.call_soon_threadsafe(_set_exception, fut, error)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
