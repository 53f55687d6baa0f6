"""`FakeWorker`: the one fake of the router's `WorkerClient` (router/workers.py) for tests; no model, no Ray.

    w = FakeWorker("p0", role="prefill")
    w.script("prefill", result, WorkerUnavailableError("gone", "p0"))  # call 1 returns result, call 2 raises
    w.script("decode", [c1, c2], [c1, WorkerFailedError("boom", "p0")])  # streams; an error mid-stream
    w.script("abort", PASS, False)         # abort call 1 answers as unscripted, call 2 returns False
    w.status_reply = worker_status("p0", role="prefill", health="NOT_SERVING")
    gate = w.hold("wait_idle")             # wait_idle calls block until gate.open(); await gate.reached.wait()
    w.down = True                          # every call fails as a dead Ray actor's does
    w.calls, w.request_ids("abort")        # every call in order; the request ids given to abort

A call to method m, in this order:
1. is appended to `calls` (whatever happens next) and suspends once, as a remote call always does;
2. raises `WorkerUnavailableError` while `down`;
3. waits while `hold(m)`'s gate is shut (events, never sleeps: the test opens it);
4. takes m's next scripted outcome, if any is left: an exception is raised; for decode / generate an
   iterable of `StreamChunk`s is streamed, an exception among them raised at that point; any other
   value is returned; `PASS` goes on to 5;
5. unscripted, forwards to `inner` when given (any WorkerClient, e.g. tests.helpers.inprocess_workers'
   InProcessClient over a real worker: then the fake is a recording spy on it);
6. else answers the default: status -> `status_reply` (SERVING); kv_events -> no event and `status_reply`;
   kv_snapshot -> an empty cache; abort / release / wait_idle -> True; prefill / decode / generate ->
   AssertionError (there is no sensible result to invent: script one).

A FakeWorker whose methods are never called is also the placeholder for routing and pool tests, which
only read `worker_id`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from common.contract import KVEventsReply, PrefillResult, StreamChunk, WorkerStatus
from common.kv_events import KVEventBatch, KVSnapshot, encode_event_batch
from common.sampling_params import SamplingParams
from router.errors import WorkerUnavailableError

PASS = object()  # a scripted outcome: answer this call as if nothing were scripted (inner or default)


def worker_status(worker_id: str, role: str = "decode", **fields: Any) -> WorkerStatus:
    """A WorkerStatus of an idle, SERVING worker with a 64-block cache; `fields` override any field."""
    idle = WorkerStatus(
        worker_id=worker_id,
        role=role,
        health="SERVING",
        kv_blocks_total=64,
        kv_blocks_free=64,
        running=0,
        waiting=0,
        leased=0,
        node_id="fake",
        device="cpu",
        block_size=16,
        dtype="float32",
        max_num_seqs=8,
    )
    return msgspec.structs.replace(idle, **fields)


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[Any, ...]  # every argument of the protocol's signature, in its order, defaults filled in


class Hold:
    """A gate on one method of a FakeWorker: its calls wait until `open()`; `reached` is set by the first
    call that waits."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._open = asyncio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        self.reached.set()
        await self._open.wait()


class FakeWorker:
    """A WorkerClient whose every answer the test sets (see the module docstring)."""

    def __init__(self, worker_id: str, role: str = "decode", inner: Any = None) -> None:
        self.worker_id = worker_id
        self.role = role
        self.inner = inner  # a WorkerClient that answers unscripted calls
        self.down = False
        self.status_reply = worker_status(worker_id, role)
        self.calls: list[Call] = []
        self._scripts: dict[str, deque[Any]] = {}
        self._holds: dict[str, Hold] = {}

    def __repr__(self) -> str:
        return f"FakeWorker({self.worker_id!r})"

    # -- setting it up ---------------------------------------------------------------------------

    def script(self, method: str, *outcomes: Any) -> FakeWorker:
        """Queue the outcomes of `method`'s next calls, one per call (after any queued before)."""
        self._scripts.setdefault(method, deque()).extend(outcomes)
        return self

    def hold(self, method: str) -> Hold:
        """From now on calls to `method` wait until the returned gate is opened."""
        gate = self._holds[method] = Hold()
        return gate

    def request_ids(self, method: str) -> list[str]:
        """The request id of every call to `method` (abort, release, prefill, decode, generate), in order."""
        return [c.args[0] for c in self.calls if c.method == method]

    # -- what every call goes through ------------------------------------------------------------

    async def _answer(self, method: str) -> Any:
        """Steps 1-4 once the call is recorded: its scripted outcome, or PASS."""
        await asyncio.sleep(0)  # a remote call always suspends; a loop that polls a fake must not starve others
        if self.down:
            raise WorkerUnavailableError(f"worker {self.worker_id} is unavailable: actor died (test)", self.worker_id)
        if method in self._holds:
            await self._holds[method].wait()
        queue = self._scripts.get(method)
        outcome = queue.popleft() if queue else PASS
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _unary(self, method: str, *args: Any) -> Any:
        self.calls.append(Call(method, args))
        outcome = await self._answer(method)
        if outcome is not PASS:
            return outcome
        if self.inner is not None:
            return await getattr(self.inner, method)(*args)
        return self._default(method)

    def _default(self, method: str) -> Any:
        if method == "status":
            return self.status_reply
        if method == "kv_events":
            no_event = encode_event_batch(KVEventBatch(self.worker_id, []))
            return KVEventsReply(epoch=f"{self.worker_id}-fake", events=no_event, status=self.status_reply)
        if method == "kv_snapshot":
            return KVSnapshot(self.worker_id, f"{self.worker_id}-fake", self.status_reply.block_size, 0, [])
        if method in ("abort", "release", "wait_idle"):
            return True
        raise AssertionError(f"{self!r}: {method} was called with nothing scripted")

    def _stream(self, method: str, *args: Any) -> AsyncGenerator[StreamChunk, None]:
        self.calls.append(Call(method, args))  # recorded when called; the rest runs when first iterated
        return self._play(method, args)

    async def _play(self, method: str, args: tuple[Any, ...]) -> AsyncGenerator[StreamChunk, None]:
        outcome = await self._answer(method)
        if outcome is PASS:
            if self.inner is None:
                self._default(method)  # raises
            outcome = getattr(self.inner, method)(*args)
        if hasattr(outcome, "__aiter__"):
            async for chunk in outcome:
                yield chunk
            return
        for item in outcome:
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- the WorkerClient protocol ---------------------------------------------------------------

    async def prefill(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> PrefillResult:
        return await self._unary("prefill", request_id, prompt_ids, params, trace_ctx, prior_ids)

    def decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prefill: PrefillResult,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        return self._stream("decode", request_id, prompt_ids, params, prefill, trace_ctx, prior_ids)

    def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        return self._stream("generate", request_id, prompt_ids, params, trace_ctx, prior_ids)

    async def abort(self, request_id: str) -> bool:
        return await self._unary("abort", request_id)

    async def release(self, request_id: str) -> bool:
        return await self._unary("release", request_id)

    async def status(self) -> WorkerStatus:
        return await self._unary("status")

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply:
        return await self._unary("kv_events", after_seq, timeout_s)

    async def kv_snapshot(self) -> KVSnapshot:
        return await self._unary("kv_snapshot")

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self._unary("wait_idle", timeout_s)
