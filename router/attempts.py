"""A request's attempts: what the router tracks per request and per try, and which failures are retried.

A request (`Run`) runs as attempts (`Attempt`): one route, one (P, D) pair or a local prefill.
When an attempt fails through the worker's fault (`retry_reason` says which failures those are),
GenerationService undoes it and starts the next one after the tokens already sent; the table is
in router/README.md ("Failover").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from common.contract import KVTransferFailedError, WorkerShuttingDownError
from router.errors import NoHealthyWorkerError, WorkerStalledError, WorkerUnavailableError
from router.responses import RequestTrace
from router.routing import Route
from router.validation import ValidatedRequest
from router.workers import WorkerClient


@dataclass
class Attempt:
    """One try at a request on one (P, D) pair, so that cleanup knows what to undo. A failed attempt
    is undone and the next one resumes after the tokens already sent (`prior`)."""

    rid: str  # the id the workers and the router's bookkeeping see: the request id, then "<id>~retry<n>"
    prior: list[int]  # output tokens sent to the client before this attempt
    route: Route | None = None
    p: WorkerClient | None = None
    d: WorkerClient | None = None
    prefill_sent: bool = False
    prefill_done: bool = False
    kv_leased: bool = False
    stream_sent: bool = False  # decode / generate call issued
    first_chunk_seen: bool = False  # the decode / generate stream has produced a chunk


@dataclass
class Run:
    """Where one request is: its current attempt and what the client has been sent."""

    request: ValidatedRequest
    trace: RequestTrace
    stage: str = "admitted"
    attempt: Attempt | None = None
    route: Route | None = None  # the first attempt's (what the first response reported)
    output_ids: list[int] = field(default_factory=list)  # every token sent to the client
    undos: list[asyncio.Task] = field(default_factory=list)  # cleanups of failed attempts, in the background
    observed: bool = False  # metrics recorded
    span: Any = None  # the request's SPAN_GENERATE (an OpenTelemetry Span)
    finished: bool = False


def retry_reason(attempt: Attempt, exc: BaseException) -> tuple[str, str | None] | None:
    """(reason, worker this request should avoid from now on) when a failed attempt may be resumed
    elsewhere; None when the failure is the request's own (bad input, a full decode pool, a bug) or
    there was no worker to try (NoHealthyWorkerError on the first route: UNAVAILABLE at once)."""
    if isinstance(exc, NoHealthyWorkerError):
        return None
    if isinstance(exc, WorkerStalledError):  # alive but silent: not marked down, avoided by this request
        return "worker_stalled", exc.worker_id
    if isinstance(exc, WorkerUnavailableError):  # died or restarting: marked down, back once it rejoins
        return "worker_unavailable", None
    if isinstance(exc, KVTransferFailedError):  # P's KV never arrived: P dead, lease gone or the link down
        return "kv_transfer_failed", attempt.p.worker_id if attempt.p is not None else None
    if isinstance(exc, WorkerShuttingDownError):  # P aborted the prompt (a drain that timed out)
        return "aborted_on_worker", attempt.p.worker_id if attempt.p is not None else None
    return None
