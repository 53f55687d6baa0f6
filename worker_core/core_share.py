"""Cores a CPU worker may borrow from idle workers on the same host, step by step.

Each CPU worker runs its engine on `base` torch threads (its share of the host: Ray's num_cpus).
When the other workers on the host have nothing to run, their cores sit idle: a long prompt arriving
at an idle 1 prefill + 1 decode cluster was prefilled by one thread while the other core waited.
`CoreShare` lets a worker widen for one step at a time, and only while the others are idle:

    threads for the next step = base + the bases of the idle workers + cores nobody claimed,
                                at most the cores this process may run on,
                                and just base when the workers' bases already exceed the cores

Every worker on the host has one slot in a small shared table (a file in /dev/shm, one per user):
its pid, whether it has work, its base. A worker marks itself busy before each step and idle when
its engine has nothing left; reading the others' flags costs a few microseconds and takes no lock.
A slot whose process is gone is free again.

The engine loop (worker_core/engine_loop.py) widens only steps with a prompt of at least
WIDEN_MIN_PREFILL_TOKENS left to compute: prefill is compute-bound and its ops are large, while a
decode step's small ops on two threads stall at every OpenMP barrier whenever the router or a client
holds the other core. When a peer gets work during a widened prefill step, both run oversubscribed
until that step ends (at most one chunk of the token budget); the next step is back at `base`. In a
disaggregated pair a decode worker only gets a request after its prompt's prefill, so a lone
request's prefill gets the whole host.

Borrowing alone seldom finds an idle core: a decode worker with running requests steps without a
break. So a decode worker may also *lend* its core (`lend`), pausing between two of its steps while a
peer runs a widened prefill step, as long as its running requests keep their time-per-output-token
target: the engine loop computes the pause their slack allows (`LendBudget`) and publishes whether it
may lend at all (`offer`). A worker about to widen announces it (`widen` sets WANT) and waits up to
LEND_WAIT_S for a busy peer that may lend to pause; the peer pauses until nobody wants its core or its
allowed pause is spent, whichever comes first. Pausing decode steps for a prefill step is what a single
engine with chunked prefill does anyway (a step holding a 512-token chunk delays every decode in it);
here the pause is bounded by the decode requests' own target.

By default a disaggregated prefill worker borrows and a disaggregated decode worker lends, up to 200 ms
per output token or the router's TPOT target (`PoolConfig.core_sharing`); aggregated workers do neither.
docs/BENCHMARKS.md ("Borrowing idle cores", "Lending the decode core") has what each did to goodput.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SLOTS = 64
_SLOT = struct.Struct("<qqqq")  # pid, state, base threads, flags
_SIZE = SLOTS * _SLOT.size
IDLE, BUSY, LENDING = 0, 1, 2  # state: nothing to run; stepping; has work but paused for a peer's step
WANT, MAY_LEND = 1, 2  # flags: about to run a step on borrowed cores; would pause for one now
LEND_WAIT_S = 0.1  # a widening worker waits at most this long for a busy peer that may lend (~2 decode steps)
POLL_S = 0.001  # while waiting or lending: how often the table is read again


def default_path() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"tandem-cores2-{os.getuid()}"  # 2: the four-field slot (older builds used three)


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreShare:
    """This process's slot in the host's table. `threads(busy)` is called by the engine thread only."""

    def __init__(
        self,
        base: int,
        path: Path | None = None,
        cpus: int | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`clock` and `sleep`: injected by tests (waiting and lending poll the table every POLL_S)."""
        if base < 1:
            raise ValueError(f"base threads must be >= 1, got {base}")
        self.base, self.cpus = base, cpus if cpus is not None else host_cpus()
        self.pid = pid if pid is not None else os.getpid()
        self.path = path or default_path()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # claiming a slot: one process at a time
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
            self.slot = self._claim()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.clock, self.sleep = clock, sleep
        self._state, self._flags = -1, 0
        self._write(IDLE, 0)
        self.lent_s = 0.0  # seconds this worker paused for peers, since start

    def _claim(self) -> int:
        free = None
        for i in range(SLOTS):
            pid = _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
            if pid == self.pid:
                return i
            if free is None and not _alive(pid):
                free = i
        if free is None:
            raise RuntimeError(f"{self.path}: all {SLOTS} worker slots are taken by live processes")
        return free

    def _write(self, state: int, flags: int) -> None:
        if (state, flags) != (self._state, self._flags):
            _SLOT.pack_into(self._map, self.slot * _SLOT.size, self.pid, state, self.base, flags)
            self._state, self._flags = state, flags

    def _peers(self):
        """(state, base, flags) of every other live worker on the host."""
        for i in range(SLOTS):
            if i == self.slot:
                continue
            pid, state, base, flags = _SLOT.unpack_from(self._map, i * _SLOT.size)
            if pid <= 0 or pid == self.pid or not _alive(pid):  # a dead worker's cores are nobody's
                continue
            yield state, base, flags

    def _spare(self) -> tuple[int, bool]:
        """Threads the next step may use, and whether a busy peer would lend its core if asked."""
        claimed, free, lender = 0, 0, False
        for state, base, flags in self._peers():
            claimed += base
            if state != BUSY:  # idle, or paused for a widened step
                free += base
            elif flags & MAY_LEND:
                lender = True
        if self.base + claimed > self.cpus:
            # more workers' threads than cores already (2 prefill + 1 decode on 2 cores): a widened step would
            # run beside a peer that wakes up with nowhere to go, and OpenMP stalls at every barrier
            return self.base, False
        unclaimed = self.cpus - self.base - claimed
        return max(self.base, min(self.cpus, self.base + free + unclaimed)), lender

    def threads(self, busy: bool = True) -> int:
        """Mark this worker busy (or idle), asking nobody to lend, and return how many threads its next step may
        use: its base plus the cores of idle peers and cores nobody claimed."""
        if self._map.closed:
            return self.base
        self._write(BUSY if busy else IDLE, self._flags & MAY_LEND)
        return self._spare()[0] if busy else self.base

    def widen(self, wait_s: float = LEND_WAIT_S) -> int:
        """Before a step that would use more threads: ask peers to lend (WANT), wait up to `wait_s` while a busy
        peer that may lend has not paused yet, and return the threads the step may use. The WANT stays up
        for the whole widened step (until the next `threads` or `widen` call); a step left at the base
        threads drops it at once."""
        if self._map.closed:
            return self.base
        self._write(BUSY, (self._flags & MAY_LEND) | WANT)
        deadline = self.clock() + wait_s
        threads, lender = self._spare()
        while lender and self.clock() < deadline:
            self.sleep(POLL_S)
            threads, lender = self._spare()
        if threads == self.base:  # nobody lent in time: no peer should pause for a step on one core
            self._write(BUSY, self._flags & MAY_LEND)
        return threads

    def offer(self, may_lend: bool) -> None:
        """Say whether this worker would pause for a peer's widened step now (its requests have slack)."""
        if not self._map.closed:
            self._write(self._state, (self._flags & ~MAY_LEND) | (MAY_LEND if may_lend else 0))

    def busy_peers(self) -> int:
        """How many other workers on the host are running a step now (lending or idle ones are not)."""
        if self._map.closed:
            return 0
        return sum(1 for state, _, _ in self._peers() if state == BUSY)

    def peer_wants(self) -> bool:
        """Does another worker on the host want cores for its next step?"""
        return not self._map.closed and any(flags & WANT for _, _, flags in self._peers())

    def lend(self, max_s: float, stop: Callable[[], bool] = lambda: False) -> float:
        """Pause (state LENDING) while a peer wants cores, at most `max_s`; return the seconds paused. The
        caller checks `peer_wants()` first: a pause that finds nobody waiting returns at once."""
        if self._map.closed or max_s <= 0:
            return 0.0
        state, flags = self._state, self._flags & ~WANT
        self._write(LENDING, flags)
        start = self.clock()
        try:
            while self.peer_wants() and self.clock() - start < max_s and not stop():
                self.sleep(POLL_S)
        finally:
            self._write(state, flags)
        paused = self.clock() - start
        self.lent_s += paused
        return paused

    def close(self) -> None:
        """Free the slot (a process that dies without it frees its slot by dying)."""
        if self._map.closed:
            return
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0, 0, 0, 0)
        self._map.close()


LEND_MIN_S = 1.0  # offer to lend only with at least this much pause allowed: a lender that resumes in the middle
# of a peer's widened step oversubscribes it (a 512-token prefill takes ~1 s on two threads of this VM)
LEND_SAFETY = 0.5  # pause at most this share of the smallest slack (the step-time estimate and finish are guesses)
LEND_HORIZON_TOKENS = 128  # a request is assumed to end within this many more tokens (or at its max_tokens)
TPOT_SLACK_IDLE_S = 3600.0  # the slack a lending worker reports when no running request limits it


class LendBudget:
    """How long a decode worker may pause before its next step without any of its requests missing the
    time-per-output-token target, as a client measures it: (last token - first token) / (tokens - 1).

    For a request with `out` tokens whose TPOT clock started at `start` and that ends at `end` tokens
    (max_tokens, or LEND_HORIZON_TOKENS more when that is sooner):

        slack = tpot * (end - 1) - (now - start) - (end - out) * step
        pause = LEND_SAFETY * min over requests of slack

    `step` is a moving average of this worker's pure decode steps. A request still waiting for its own
    first token (a local prefill) has a TTFT this worker cannot judge: no pause then.
    """

    def __init__(self, tpot_s: float, min_s: float = LEND_MIN_S) -> None:
        """`min_s`: the least pause worth offering (LEND_MIN_S)."""
        if tpot_s <= 0:
            raise ValueError(f"the TPOT target must be > 0 s, got {tpot_s}")
        self.tpot_s, self.min_s = tpot_s, min_s
        self.step_s = 0.0

    def observe(self, seconds: float, prompt_tokens: int, decoding: int) -> None:
        """One step of this worker: only pure decode steps refine the estimate."""
        if prompt_tokens == 0 and decoding > 0:
            self.step_s = seconds if self.step_s == 0.0 else 0.8 * self.step_s + 0.2 * seconds

    def slack(self, now: float, requests: list[tuple[float, int, int]]) -> float:
        """The smallest slack (s, may be negative) of the requests with a TPOT clock running (at least one
        output token); inf when none has one. `requests` as for `allowed`."""
        slack = float("inf")
        for start, out, max_tokens in requests:
            end = min(max_tokens, out + LEND_HORIZON_TOKENS)
            if out == 0 or end <= out:
                continue  # no TPOT clock yet, or finishes with this step
            slack = min(slack, self.tpot_s * (end - 1) - (now - start) - (end - out) * self.step_s)
        return slack

    def allowed(self, now: float, requests: list[tuple[float, int, int]]) -> float:
        """Seconds of pause allowed now; `requests`: (TPOT clock start, output tokens, max_tokens) of each
        request on the worker, output tokens 0 for one still waiting for its first token."""
        return self.pause(self.slack(now, requests), requests)

    @staticmethod
    def pause(slack: float, requests: list[tuple[float, int, int]]) -> float:
        """`allowed` from a slack already computed for the same requests."""
        if slack == float("inf") or any(out == 0 for _, out, _ in requests):
            return 0.0
        return max(0.0, LEND_SAFETY * slack)
