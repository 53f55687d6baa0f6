"""Cores a CPU worker may borrow from idle workers on the same host, step by step.

Each CPU worker runs its engine on `base` torch threads (its share of the host: Ray's num_cpus).
When the other workers on the host have nothing to run, their cores sit idle: a long prompt arriving
at an idle 1 prefill + 1 decode cluster was prefilled by one thread while the other core waited.
`CoreShare` lets a worker widen for one step at a time, and only while the others are idle:

    threads for the next step = base + the bases of the idle workers + cores nobody claimed,
                                at most the cores this process may run on

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

Off by default (`PoolConfig.borrow_idle_cores`): on the goodput sweep in docs/BENCHMARKS.md
("Borrowing idle cores") it lowered TTFT p50 at 0.2 req/s by 12% but not goodput, which it lowered
at three of four rates.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

SLOTS = 64
_SLOT = struct.Struct("<qqq")  # pid, busy (0/1), base threads
_SIZE = SLOTS * _SLOT.size


def default_path() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"tandem-cores-{os.getuid()}"


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

    def __init__(self, base: int, path: Path | None = None, cpus: int | None = None, pid: int | None = None) -> None:
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
        self._busy = -1
        self._write(busy=0)

    def _claim(self) -> int:
        free = None
        for i in range(SLOTS):
            pid, _, _ = _SLOT.unpack_from(self._map, i * _SLOT.size)
            if pid == self.pid:
                return i
            if free is None and not _alive(pid):
                free = i
        if free is None:
            raise RuntimeError(f"{self.path}: all {SLOTS} worker slots are taken by live processes")
        return free

    def _write(self, busy: int) -> None:
        if busy != self._busy:
            _SLOT.pack_into(self._map, self.slot * _SLOT.size, self.pid, busy, self.base)
            self._busy = busy

    def threads(self, busy: bool = True) -> int:
        """Mark this worker busy (or idle) and return how many threads its next step may use."""
        if self._map.closed:
            return self.base
        self._write(1 if busy else 0)
        if not busy:
            return self.base
        claimed, idle = 0, 0
        for i in range(SLOTS):
            if i == self.slot:
                continue
            pid, peer_busy, base = _SLOT.unpack_from(self._map, i * _SLOT.size)
            if pid <= 0 or pid == self.pid or not _alive(pid):  # a dead worker's cores are nobody's
                continue
            claimed += base
            if not peer_busy:
                idle += base
        unclaimed = max(0, self.cpus - self.base - claimed)
        return max(self.base, min(self.cpus, self.base + idle + unclaimed))

    def close(self) -> None:
        """Free the slot (a process that dies without it frees its slot by dying)."""
        if self._map.closed:
            return
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0, 0, 0)
        self._map.close()
