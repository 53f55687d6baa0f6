"""How the router talks to a worker: the `WorkerClient` protocol and its Ray adapter.

The server only sees `WorkerClient`; `RayWorkerClient(handle, worker_id)` adapts a
Ray actor handle of a PrefillWorker / DecodeWorker (its remote methods are
`common.contract.WorkerAPI`, called by attribute, never by a name in a string): unary
calls are `await handle.method.remote(...)`; `decode` and `generate` are actor async
generators, which Ray runs as streaming generators:

    gen = handle.decode.remote(rid, prompt_ids, params, prefill)   # ObjectRefGenerator
    async for ref in gen:
        chunk = await ref                                          # StreamChunk

Errors are translated at this boundary, so nothing above it knows Ray:
- `RayTaskError` whose `.cause` is an `common.errors.EngineError` -> that error
  (bad input found by the worker; the server maps it to INVALID_ARGUMENT);
- actor / node / worker death, an unreachable actor, a lost object ->
  `WorkerUnavailableError` (UNAVAILABLE; the pool marks the worker down);
- any other failure inside the worker -> `WorkerFailedError` (INTERNAL) with
  one line: the exception type and message, not the remote traceback.

Ray is imported lazily (only when an error must be classified; a live handle
means it is loaded already), so importing this module stays cheap and torch-free.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol, runtime_checkable

from common.contract import (
    EngineError,
    KVEventsReply,
    KVSnapshot,
    PrefillResult,
    SamplingParams,
    StreamChunk,
    WorkerError,
    WorkerStatus,
)
from router.errors import WorkerFailedError, WorkerUnavailableError, one_line


@runtime_checkable
class WorkerClient(Protocol):
    """One worker as the router sees it. Every method may raise `WorkerUnavailableError`,
    `WorkerFailedError` or an `common.errors.EngineError` (bad input)."""

    worker_id: str

    # trace_ctx: the W3C carrier (common.telemetry.inject) of the router's span for this call

    # prior_ids: output the request already streamed (resumed after a failure): the worker prefills
    # prompt + them and continues after them (engine/engine_core.py, EngineCore.resume)

    async def prefill(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> PrefillResult: ...

    def decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prefill: PrefillResult,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]: ...

    def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]: ...

    async def abort(self, request_id: str) -> bool: ...

    async def release(self, request_id: str) -> bool: ...

    async def status(self) -> WorkerStatus: ...

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply: ...

    async def kv_snapshot(self) -> KVSnapshot: ...

    async def wait_idle(self, timeout_s: float) -> bool: ...


def _unavailable_types() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (
        rex.RayActorError,
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.LocalRayletDiedError,
        rex.ObjectLostError,
        rex.ActorUnschedulableError,
    )


def translate_ray_error(exc: BaseException, worker_id: str) -> BaseException:
    """The router-level error for an exception raised by a Ray call to `worker_id`."""
    import ray.exceptions as rex

    cause: BaseException = exc
    if isinstance(exc, rex.RayTaskError) and exc.cause is not None:
        cause = exc.cause
    if isinstance(cause, (EngineError, WorkerError)):
        return cause  # typed: status_for maps each kind (bad input, admission, transfer) to its own code
    if isinstance(cause, _unavailable_types()):
        return WorkerUnavailableError(
            f"worker {worker_id} is unavailable: {one_line(type(cause).__name__)}: {one_line(str(cause), 300)}",
            worker_id,
        )
    if isinstance(cause, (WorkerUnavailableError, WorkerFailedError)):
        return cause
    return WorkerFailedError(
        f"worker {worker_id} failed: {type(cause).__name__}: {one_line(str(cause), 300)}", worker_id
    )


def _cancel_quietly(gen: Any) -> None:
    import ray

    try:
        ray.cancel(gen)
    except Exception:  # noqa: BLE001 - best effort; the router's abort() call is the other half
        pass


class RayWorkerClient:
    """`WorkerClient` over a Ray actor handle."""

    def __init__(self, handle: Any, worker_id: str) -> None:
        self.handle = handle
        self.worker_id = worker_id

    def __repr__(self) -> str:
        return f"RayWorkerClient({self.worker_id!r})"

    async def _call(self, method: Any, *args: Any) -> Any:
        """`method`: one of the handle's remote methods (`self.handle.prefill`), named as in WorkerAPI."""
        try:
            return await method.remote(*args)
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            raise translate_ray_error(exc, self.worker_id) from None

    async def _stream(self, method: Any, *args: Any) -> AsyncGenerator[StreamChunk, None]:
        gen = None
        done = False
        try:
            gen = method.remote(*args)
            async for ref in gen:
                chunk = await ref
                yield chunk
            done = True
        except Exception as exc:  # noqa: BLE001
            done = True
            raise translate_ray_error(exc, self.worker_id) from None
        finally:
            if not done and gen is not None:  # the consumer went away: stop the worker's generator too
                _cancel_quietly(gen)

    async def prefill(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> PrefillResult:
        return await self._call(self.handle.prefill, request_id, list(prompt_ids), params, trace_ctx, list(prior_ids))

    def decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prefill: PrefillResult,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        return self._stream(
            self.handle.decode, request_id, list(prompt_ids), params, prefill, trace_ctx, list(prior_ids)
        )

    def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        trace_ctx: dict[str, str] | None = None,
        prior_ids: Sequence[int] = (),
    ) -> AsyncGenerator[StreamChunk, None]:
        return self._stream(self.handle.generate, request_id, list(prompt_ids), params, trace_ctx, list(prior_ids))

    async def abort(self, request_id: str) -> bool:
        return await self._call(self.handle.abort, request_id)

    async def release(self, request_id: str) -> bool:
        return await self._call(self.handle.release, request_id)

    async def status(self) -> WorkerStatus:
        return await self._call(self.handle.status)

    async def kv_events(self, after_seq: int, timeout_s: float) -> KVEventsReply:
        return await self._call(self.handle.kv_events, after_seq, timeout_s)

    async def kv_snapshot(self) -> KVSnapshot:
        return await self._call(self.handle.kv_snapshot)

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self._call(self.handle.wait_idle, timeout_s)
