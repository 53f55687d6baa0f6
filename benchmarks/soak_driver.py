"""The client side of benchmarks/soak.py: the seeded workload and the threads that drive it.

    plan_requests(...)  -> [RequestPlan]      prompts from a few shared-prefix pools plus random
                                              suffixes, max_tokens, and each request's fault:
                                              none | cancel after k chunks | short gRPC deadline
    StreamDriver(address, plans, ...).run()  `concurrency` threads, each with its own TandemClient
                                              (channel), take the next plan until none is left;
                                              every request ends in exactly one `Outcome`

Hang detection (`hang_s`): a request with a deadline must end by start + deadline + hang_s;
one without must end by hang_s after the last request was dispatched. A watchdog thread marks
an overdue request HUNG and closes its thread's channel (the only way to end a blocking gRPC
iterator from another thread); that thread then opens a fresh channel and goes on. A HUNG
request keeps that status whatever its call raises afterwards (the first end wins).

`on_dispatch(index)` runs on the dispatching thread just before request `index` is sent: the
soak kills a worker from there at the half-way point.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from tandem_api.client import TandemClient
from tandem_api.v1 import generation_pb2 as pb

HUNG = "HUNG"
CLIENT_ERROR = "CLIENT_ERROR"  # anything but a grpc.RpcError out of the client: a bug in the client or here
STUCK_THREAD_S = 30.0  # how long a thread may take to return once its call ended or was closed


@dataclass(frozen=True)
class RequestPlan:
    index: int
    request_id: str
    prompt: list[int]
    max_tokens: int
    cancel_after: int | None = None  # cancel once this many chunks arrived (if not finished before)
    deadline_s: float | None = None  # gRPC deadline; None: no deadline


@dataclass
class Outcome:
    """How one request ended (filled in by the driver; `status` None while it runs)."""

    plan: RequestPlan
    status: str | None = None  # a grpc.StatusCode name, HUNG or CLIENT_ERROR
    detail: str = ""
    tokens: list[int] = field(default_factory=list)
    chunks: int = 0
    finish_reason: str = ""
    started_s: float | None = None  # seconds since the driver started
    first_s: float | None = None
    ended_s: float | None = None
    prefill_worker: str = ""
    decode_worker: str = ""
    in_flight_at_kill: bool = False

    @property
    def latency_s(self) -> float | None:
        return None if self.ended_s is None or self.started_s is None else self.ended_s - self.started_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None or self.started_s is None else self.first_s - self.started_s


def plan_requests(
    n: int,
    seed: int,
    token_range: tuple[int, int],
    *,
    prefix_pools: int = 4,
    prompt_tokens: tuple[int, int] = (8, 200),
    max_tokens: tuple[int, int] = (1, 32),
    cancel_rate: float = 0.05,
    deadline_rate: float = 0.05,
    deadline_s: tuple[float, float] = (0.05, 2.0),
    shared_share: float = 0.75,
    id_prefix: str = "soak",
) -> list[RequestPlan]:
    """`n` seeded requests. `shared_share` of the prompts start with one of `prefix_pools` shared
    prefixes (each up to 128 tokens, cut to a random length), the rest is random; every prompt's
    length is drawn from `prompt_tokens`. Faults are exclusive: cancel, else deadline, else none."""
    rng = random.Random(seed)
    lo, hi = token_range
    short, long_ = prompt_tokens

    def ids(k: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(k)]

    prefixes = [ids(rng.randint(min(32, long_), min(128, long_))) for _ in range(prefix_pools)]
    plans = []
    for i in range(n):
        length = rng.randint(short, long_)
        head: list[int] = []
        if prefixes and rng.random() < shared_share:
            head = rng.choice(prefixes)[: rng.randint(1, length)]
        prompt = head + ids(length - len(head))
        new = rng.randint(*max_tokens)
        cancel_after = deadline = None
        roll = rng.random()
        if roll < cancel_rate:
            cancel_after = rng.randint(1, max(1, new))
        elif roll < cancel_rate + deadline_rate:
            deadline = round(rng.uniform(*deadline_s), 3)
        plans.append(RequestPlan(i, f"{id_prefix}-{i}", prompt, new, cancel_after, deadline))
    return plans


class StreamDriver:
    def __init__(
        self,
        address: str,
        plans: list[RequestPlan],
        concurrency: int,
        hang_s: float,
        on_dispatch: Callable[[int], None] = lambda index: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.address, self.plans, self.concurrency, self.hang_s = address, plans, concurrency, hang_s
        self.on_dispatch, self.clock = on_dispatch, clock
        self.outcomes = [Outcome(p) for p in plans]
        self._cond = threading.Condition()
        self._next = 0
        self._open: dict[int, TandemClient] = {}  # index -> the channel its call runs on
        self._dispatched_all_at: float | None = None  # driver time of the last dispatch
        self._t0 = 0.0
        self.wall_s = 0.0
        self.stuck_threads: list[str] = []  # threads that did not end even after their channel closed

    # -- public --------------------------------------------------------------------------------------

    def run(self) -> list[Outcome]:
        self._t0 = self.clock()
        threads = [
            threading.Thread(target=self._worker, name=f"soak-{k}", daemon=True) for k in range(self.concurrency)
        ]
        watchdog = threading.Thread(target=self._watchdog, name="soak-watchdog", daemon=True)
        for t in threads:
            t.start()
        watchdog.start()
        with self._cond:  # every request ends by itself or the watchdog declares it HUNG
            while self._dispatched_all_at is None or self._open:
                self._cond.wait()
        for t in threads:  # a thread whose channel the watchdog closed must come back now
            t.join(STUCK_THREAD_S)
        watchdog.join(STUCK_THREAD_S)
        self.wall_s = self.clock() - self._t0
        self.stuck_threads = [t.name for t in threads if t.is_alive()]
        return self.outcomes

    def now(self) -> float:
        return self.clock() - self._t0

    def open_indices(self) -> list[int]:
        """Requests sent and not ended yet."""
        with self._cond:
            return sorted(self._open)

    # -- threads -------------------------------------------------------------------------------------

    def _worker(self) -> None:
        client = TandemClient(self.address)
        try:
            while True:
                with self._cond:
                    if self._next >= len(self.plans):
                        return
                    i = self._next
                    self._next += 1
                    out = self.outcomes[i]
                    out.started_s = self.now()
                    self._open[i] = client  # open from here: the driver waits for it to end
                    if self._next == len(self.plans):
                        self._dispatched_all_at = out.started_s
                    self._cond.notify_all()
                self.on_dispatch(i)
                self._one(client, out)
                if out.status == HUNG:  # the watchdog closed this channel to end the call
                    client = TandemClient(self.address)
        finally:
            client.close()

    def _one(self, client: TandemClient, out: Outcome) -> None:
        p = out.plan
        try:
            stream = client.generate(  # a generator: closing it cancels the call
                token_ids=p.prompt,
                request_id=p.request_id,
                max_tokens=p.max_tokens,
                temperature=0.0,
                ignore_eos=True,
                timeout=p.deadline_s,
            )
            for resp in stream:
                if out.first_s is None:
                    out.first_s = self.now()
                    out.prefill_worker, out.decode_worker = resp.prefill_worker, resp.decode_worker
                out.tokens.extend(resp.token_ids)
                out.chunks += 1
                if resp.finish_reason:
                    out.finish_reason = pb.FinishReason.Name(resp.finish_reason)
                elif p.cancel_after is not None and out.chunks >= p.cancel_after:
                    stream.close()  # cancels the call on the server (TandemClient's generator does it)
                    self._end(out, "CANCELLED", f"cancelled by the client after {out.chunks} chunk(s)")
                    return
            self._end(out, "OK")
        except grpc.RpcError as exc:
            self._end(out, exc.code().name, exc.details() or "")
        except Exception as exc:  # noqa: BLE001 - counted, never lost: it is a finding of the soak
            self._end(out, CLIENT_ERROR, f"{type(exc).__name__}: {exc}")

    def _end(self, out: Outcome, status: str, detail: str = "") -> None:
        with self._cond:
            if out.status is None:  # first end wins (HUNG, then the closed call's CANCELLED)
                out.status, out.detail, out.ended_s = status, detail, self.now()
            self._open.pop(out.plan.index, None)
            self._cond.notify_all()

    def _hang_at(self, out: Outcome) -> float | None:
        """Driver time by which `out` must have ended (None: not decided yet)."""
        if out.plan.deadline_s is not None and out.started_s is not None:
            return out.started_s + out.plan.deadline_s + self.hang_s
        if self._dispatched_all_at is None:
            return None
        return max(self._dispatched_all_at, out.started_s or 0.0) + self.hang_s

    def _watchdog(self) -> None:
        while True:
            with self._cond:
                if self._dispatched_all_at is not None and not self._open:
                    return
                now = self.now()
                due = [(i, self._hang_at(self.outcomes[i])) for i in self._open]
                overdue = [i for i, at in due if at is not None and at <= now]
                to_close = []
                for i in overdue:
                    out = self.outcomes[i]
                    out.status, out.ended_s = HUNG, None
                    out.detail = f"no end {now - (out.started_s or 0.0):.1f} s after it was sent"
                    to_close.append(self._open.pop(i))
                if not to_close:
                    pending = [at for _, at in due if at is not None]
                    self._cond.wait(min(pending) - now if pending else None)
                    continue
                self._cond.notify_all()
            for client in to_close:  # outside the lock: the closed call's thread takes it to finish
                client.close()  # ends the blocked iterator in its thread (CANCELLED there)
