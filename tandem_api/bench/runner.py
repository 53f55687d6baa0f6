"""Driving one load at one rate, and the search for the highest rate that still meets the SLO.

`run_load` is open-loop: a producer releases units (a request, or a whole conversation) at their
arrival times, whatever the server is doing; `--max-concurrency` caps the units in flight (a
capped unit waits at the client, and its `send_s` is later than its `arrival_s`). A conversation
holds its slot across its turns and sends turn k+1 when reply k has arrived; a failed turn ends it.

Stop rules: `num_requests` requests planned, the dataset exhausted (traces), or `duration_s`
elapsed (no new unit starts after it; those in flight finish). A `stop` event (Ctrl-C) cancels
what is in flight: those records end as INTERRUPTED, the rest is kept.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from tandem_api.bench.arrivals import gamma_arrivals, trace_times
from tandem_api.bench.datasets import Dataset, Prompt, Unit
from tandem_api.bench.metrics import RequestRecord
from tandem_api.bench.targets import Target, WireRequest

INTERRUPTED = "INTERRUPTED"


@dataclass
class LoadConfig:
    rate: float | None  # requests per second (inf: all at once); None: a trace's own timestamps
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = 0.0


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float
    interrupted: bool = False
    started_at: float = field(default_factory=time.time)  # wall clock (epoch seconds) of t = 0


class Progress:
    """A one-line progress bar on stderr (only on a terminal); `quiet` silences it."""

    def __init__(self, total: int | None, label: str, quiet: bool = False) -> None:
        self.total, self.label, self.done, self.failed = total, label, 0, 0
        self.enabled = not quiet and sys.stderr.isatty()
        self._last = 0.0

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            if self.total:
                filled = int(30 * self.done / self.total)
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
            else:
                bar = f"{self.done} done"
            sys.stderr.write(f"\r{self.label} {bar} failed {self.failed}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def arrival_times(dataset: Dataset, cfg: LoadConfig) -> Iterator[float]:
    if dataset.timestamps is not None:
        return iter(trace_times(dataset.timestamps, cfg.rate))
    per_unit = cfg.rate / dataset.requests_per_unit if cfg.rate is not None else math.inf
    return gamma_arrivals(per_unit, cfg.burstiness, cfg.seed)


def _turn_request(
    request_id: str, unit: Unit, turn: int, history: list[tuple[Prompt, Prompt]], max_tokens: int, cfg: LoadConfig
) -> WireRequest:
    """Turn `turn` of `unit`: system prompt, earlier (user, reply) pairs, then this turn's user prompt."""
    user = unit.turns[turn].user
    parts: list[Prompt] = [unit.system] if unit.system is not None else []
    for asked, answered in history:
        parts.extend((asked, answered))
    parts.append(user)
    ids = None if any(p.ids is None for p in parts) else tuple(i for p in parts for i in p.ids or ())
    messages = None
    if unit.system is not None or history:
        messages = [{"role": "system", "content": unit.system.text}] if unit.system is not None else []
        for asked, answered in history:
            messages += [{"role": "user", "content": asked.text}, {"role": "assistant", "content": answered.text}]
        messages.append({"role": "user", "content": user.text})
    text = "\n\n".join(p.text for p in parts)
    return WireRequest(request_id, ids, text, messages, max_tokens, cfg.ignore_eos, cfg.temperature)


async def run_load(
    target: Target,
    dataset: Dataset,
    cfg: LoadConfig,
    *,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> LoadResult:
    """Runs one load to its stop rule (see the module docstring); never raises for a failed request."""
    stop = stop or asyncio.Event()
    started_at = time.time()
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task] = set()
    run_id = secrets.token_hex(3)

    async def run_unit(unit: Unit, arrival: float, turns: int) -> None:
        if slots is not None:
            await slots.acquire()
        try:
            history: list[tuple[Prompt, Prompt]] = []
            for k in range(turns):
                turn = unit.turns[k]
                record = RequestRecord(
                    index=len(records),
                    request_id=f"bench-{run_id}-{unit.index}-{k}",
                    arrival_s=arrival if k == 0 else clock(),
                    expected_output_tokens=turn.output_tokens,
                    prefix_group=unit.prefix_group,
                    conversation=unit.index if len(unit.turns) > 1 else None,
                    turn=k if len(unit.turns) > 1 else None,
                )
                request = _turn_request(record.request_id, unit, k, history, turn.output_tokens, cfg)
                record.input_tokens = len(request.ids) if request.ids is not None else 0
                records.append(record)
                try:
                    reply = await target.send(request, record, clock)
                except asyncio.CancelledError:
                    record.status, record.error = INTERRUPTED, "the benchmark was interrupted"
                    raise
                if progress is not None:
                    progress.update(record)
                if not record.ok:
                    break
                history.append((turn.user, Prompt(tuple(reply.ids) if reply.ids is not None else None, reply.text)))
        finally:
            if slots is not None:
                slots.release()

    arrivals = arrival_times(dataset, cfg)
    planned = 0
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        for unit in dataset.units:
            if cfg.num_requests is not None and planned >= cfg.num_requests:
                break
            arrival = next(arrivals, None)
            if arrival is None or stop.is_set():
                break
            if cfg.duration_s is not None and arrival >= cfg.duration_s:
                break
            delay = arrival - clock()
            if delay > 0:
                await asyncio.wait([stop_wait], timeout=delay)
                if stop.is_set():
                    break
            if cfg.duration_s is not None and clock() >= cfg.duration_s:
                break
            turns = unit.requests
            if cfg.num_requests is not None:
                turns = min(turns, cfg.num_requests - planned)
            planned += turns
            task = asyncio.create_task(run_unit(unit, arrival, turns))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)  # let the new unit start before the next arrival is computed
        while tasks and not stop.is_set():
            await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted = stop.is_set()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        stop_wait.cancel()
        if progress is not None:
            progress.close()
    for r in records:
        if r.status == "PENDING":  # cancelled before its first byte went out
            r.status, r.error = INTERRUPTED, "the benchmark was interrupted"
    return LoadResult(records, clock(), interrupted, started_at)


# -- the highest rate that meets the SLO ------------------------------------------------------------


@dataclass
class SearchResult:
    max_rate: float  # the highest probed rate whose attainment reached the target (0.0: none did)
    upper: float | None  # the lowest probed rate above it that missed (None: never missed)
    probes: list[tuple[float, float]]  # (rate, attainment) in the order probed


async def find_max_rate(
    evaluate: Callable[[float], Awaitable[float]],
    *,
    start: float = 1.0,
    attainment: float = 0.9,
    rel_tol: float = 0.1,
    max_probes: int = 8,
    min_rate: float = 1e-3,
) -> SearchResult:
    """Doubling (or halving) from `start` until the target attainment is bracketed, then bisection
    in log space until the bracket is within `rel_tol` or `max_probes` runs were spent."""
    if not (0 < attainment <= 1):
        raise ValueError(f"--attainment must be in (0, 1], got {attainment}")
    if start <= 0 or math.isinf(start):
        raise ValueError(f"the search needs a finite positive starting --request-rate, got {start}")
    probes: list[tuple[float, float]] = []

    async def passes(rate: float) -> bool:
        got = await evaluate(rate)
        probes.append((rate, got))
        return got >= attainment

    lo: float | None = None
    hi: float | None = None
    rate = start
    if await passes(rate):
        lo = rate
        while len(probes) < max_probes:
            rate *= 2
            if await passes(rate):
                lo = rate
            else:
                hi = rate
                break
    else:
        hi = rate
        while len(probes) < max_probes and rate / 2 >= min_rate:
            rate /= 2
            if await passes(rate):
                lo = rate
                break
            hi = rate
    while lo is not None and hi is not None and hi / lo > 1 + rel_tol and len(probes) < max_probes:
        mid = math.sqrt(lo * hi)
        if await passes(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo if lo is not None else 0.0, hi, probes)
