"""Undoing an attempt on its workers: the calls the request path makes after a request ended early or an
attempt failed (abort on the decode and prefill workers, release of a prefill worker's KV lease).

Each runs as a background task that the request's own cancellation cannot stop, bounded by a timeout,
and never raises: a call that is not answered in time stays queued on a busy worker and lands later
(a lease ends at expiry anyway); a worker that never answers is found by the health check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from router.attempts import Attempt

log = logging.getLogger(__name__)


class Cleanups:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.tasks: set[asyncio.Task] = set()

    def background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """A task that outlives the request's own (cancellation of the request must not stop it)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def undo_now(self, attempt: Attempt) -> None:
        """Undo `attempt` and wait for it, shielded: a cancelled caller does not cancel the undo."""
        await asyncio.shield(self.background(self.undo(attempt)))

    async def undo(self, attempt: Attempt) -> None:
        rid = attempt.rid
        if attempt.d is not None and attempt.stream_sent:
            await self.call(attempt.d.abort, attempt.d.worker_id, "abort", rid)
        if attempt.p is not None and attempt.prefill_sent and not attempt.prefill_done:
            await self.call(attempt.p.abort, attempt.p.worker_id, "abort", rid)
        elif attempt.p is not None and attempt.kv_leased:
            await self.call(attempt.p.release, attempt.p.worker_id, "release", rid)

    async def call(
        self,
        method: Callable[[str], Awaitable[Any]],
        worker_id: str,
        name: str,
        rid: str,
        timeout_s: float | None = None,
    ) -> None:
        """`method(rid)` (a WorkerClient's abort or release, `name` for the log), quietly, within the timeout."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await method(rid)
        except TimeoutError:  # expected under overload (seen in the soak), so not a warning
            log.info(
                "cleanup of %s: %s on %s not answered within %g s (a busy worker applies it later; "
                "a lease ends at expiry anyway)",
                rid,
                name,
                worker_id,
                timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - cleanup never raises
            log.warning("cleanup of %s: %s on %s failed: %s: %s", rid, name, worker_id, type(exc).__name__, exc)

    async def wait(self) -> None:
        """Until every cleanup started so far has run (each is bounded by its timeout)."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
