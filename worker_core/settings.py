"""WorkerSettings: everything one worker needs to start, and what every process of it sets first.

deploy builds a `WorkerSettings` per worker from its pool's config and passes it to the
worker's Ray actor (`PrefillWorker` / `DecodeWorker`); the leader hands the same object
to each of its rank actors (worker_core/ranks.py). `apply_process_settings` is the first
thing both kinds of process run, before any engine part exists.

Imports no ray and nothing else of worker_core: the host (host.py) and the ranks
(ranks.py) both depend on it, never the other way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from common.telemetry import TracingConfig
from engine.config import EngineConfig

ROLES = ("prefill", "decode", "aggregated")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to start; built by deploy from its config."""

    worker_id: str
    role: str  # one of ROLES
    engine: EngineConfig
    transport: str = "nixl"  # "nixl" | "none" (aggregated workers move no KV)
    nixl_backend: str = "UCX"
    nixl_progress_thread: bool = False  # off: ~3x the bandwidth on a 2-core host (PLATFORM.md)
    lease_s: float = 30.0  # prefill: how long leased blocks wait for a pull
    transfer_timeout_s: float = 30.0  # decode: one pull, submit to done
    admission_timeout_s: float = 60.0  # decode: waiting for free blocks before giving up
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    borrow_idle_cores: bool = False  # CPU, one rank, one worker per process: widen a step onto cores idle workers
    # on the host leave (worker_core/core_share.py); deploy passes PoolConfig.borrow_idle_cores
    lend_core_tpot_ms: float = 0.0  # CPU, one rank: pause for a peer's widened step while requests keep this TPOT
    env: dict[str, str] = field(default_factory=dict)  # set before the engine starts (UCX_*, OMP_*)
    kv_staging_bytes: int = 32 << 20  # decode: landing buffer per rank for KV that must be rearranged
    rank_options: dict = field(default_factory=dict)  # Ray options of ranks 1..n-1 (num_cpus, num_gpus, ...)
    tracing: TracingConfig = field(default_factory=TracingConfig)  # spans of this worker (off by default)
    fault_injection: bool = False  # accept fault plans (worker_core/faults.py): tests and chaos drills only

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.transport not in ("nixl", "none"):
            raise ValueError(f"transport must be 'nixl' or 'none', got {self.transport!r}")
        for name in ("lease_s", "transfer_timeout_s", "admission_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def apply_process_settings(settings: WorkerSettings) -> None:
    """What every process of a worker (leader or rank actor) sets before its engine part starts."""
    for key, value in settings.env.items():
        os.environ.setdefault(key, value)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
