"""profile.json: what `tandem profile` measured, the input of `tandem simulate` and `tandem plan`.

    {"version": 1, "model": ..., "machine": {...},
     "workers": [{"shape": {"tp": 1, "pp": 1, "block_size": 16, ...}, "step": {StepModel}, "num_blocks": ...}],
     "transfer": {TransferModel}, "overhead": {ServedOverhead}, "pools": {"prefill": KEY, "decode": KEY}}

One `WorkerProfile` per worker shape (tp, pp, block size, dtype, device, threads): its step model, KV
capacity and scheduler limits, cost, and the raw step samples (so that profiles can be merged and refitted).
`pools` names the shapes of the configuration profiled (the simulator's default).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from planner.model import StepModel, StepSample, TransferModel

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """An unreadable profile, or one without what was asked of it; the message says what to do."""


class Shape(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tp: int = 1
    pp: int = 1
    block_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int = 1  # torch threads per rank

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def key(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-bs{self.block_size}-{self.dtype}-{self.device}-t{self.num_threads}"


class WorkerProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shape: Shape
    step: StepModel
    num_blocks: int  # KV capacity of one worker, in blocks of shape.block_size tokens
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_join_tokens: int | None = None  # the scheduler's TTFT-first rule (common/prefill_share.py); None: off
    enable_prefix_caching: bool = True
    cost: float = 1.0  # per worker and hour, in the operator's unit (default: ranks x 1)
    warmup_excluded: int = 0  # first steps of the measurement left out of the fit (allocation, page faults)
    samples: list[StepSample] = []

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.shape.block_size


class ServedOverhead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the served path adds on top of engine steps, measured through a running cluster."""

    first_token_s: float = 0.0  # TTFT minus queueing, steps and transfer: gRPC, router, Ray calls
    # per decode step, whatever its rows: served ITL beyond the step model, measured at batch 1 (8-row steps
    # served are as fast as offline ones, so this is not charged per row; the name is the file format's)
    per_token_s: float = 0.0
    samples: int = 0
    # workers sharing a host slow each other (cores, memory bandwidth, caches): a step runs this much longer
    # per other worker of its host busy when it starts, by the role of the slowed worker (0: not measured)
    contention: dict[str, float] = {}
    workers_per_host: int = 0  # how many workers the profiled host ran (0: every worker has its own host)
    # the router (and client) share the first host: CPU seconds per streamed token; with the busy workers'
    # threads they can ask more than the host's cores, and then every step there stretches (0: not measured)
    router_cpu_per_token_s: float = 0.0
    host_cores: float = 0.0
    # core sharing on a CPU host (worker_core/core_share.py): a prefill step of at least WIDEN_MIN_TOKENS
    # prompt tokens runs on `widen_threads` threads when the host's decode worker is idle or lends its core,
    # this many times faster than on the worker's own (0: not measured, or the pools share no host); the
    # decode worker lends while its requests keep `lend_tpot_s` per output token (0: it does not lend)
    widened_prefill_speedup: float = 0.0
    widen_threads: int = 0
    lend_tpot_s: float = 0.0


class Profile(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    workers: list[WorkerProfile]
    version: int = PROFILE_VERSION
    created_at: str = ""
    machine: dict = {}
    transfer: TransferModel = TransferModel()
    overhead: ServedOverhead = ServedOverhead()
    pools: dict[str, str] = {}  # "prefill" / "decode" / "aggregated" -> Shape.key() of the config profiled
    notes: list[str] = []

    def worker(self, key: str | None = None, pool: str | None = None) -> WorkerProfile:
        """The profile of shape `key`, or of the shape `pool` was profiled with, or the only one."""
        if key is None and pool is not None:
            key = self.pools.get(pool)
        if key is None:
            if len(self.workers) == 1:
                return self.workers[0]
            raise ProfileError(f"the profile holds {len(self.workers)} shapes ({', '.join(self.keys())}): name one")
        for w in self.workers:
            if w.shape.key() == key:
                return w
        raise ProfileError(f"the profile has no shape {key!r}; it has {', '.join(self.keys())}")

    def keys(self) -> list[str]:
        return [w.shape.key() for w in self.workers]

    def merged(self, other: Profile) -> Profile:
        """This profile with `other`'s shapes added (a shape in both: other's wins) and its served figures."""
        if other.model != self.model:
            raise ProfileError(f"cannot merge profiles of different models: {self.model!r} and {other.model!r}")
        theirs = {w.shape.key() for w in other.workers}
        workers = [w for w in self.workers if w.shape.key() not in theirs] + list(other.workers)
        return Profile(
            model=self.model,
            workers=workers,
            created_at=other.created_at,
            machine=other.machine or self.machine,
            transfer=other.transfer if other.transfer.samples else self.transfer,
            overhead=other.overhead if other.overhead.samples else self.overhead,
            pools={**self.pools, **other.pools},
            notes=self.notes + [n for n in other.notes if n not in self.notes],
        )


def load_profile(path: str | Path) -> Profile:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ProfileError(f"--profile {path}: {e.strerror or e}") from None
    try:
        profile = msgspec.json.decode(data, type=Profile)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProfileError(f"--profile {path}: not a tandem profile ({e}); write one with `tandem profile`") from None
    if profile.version != PROFILE_VERSION:
        raise ProfileError(
            f"--profile {path}: version {profile.version}, this tandem reads version {PROFILE_VERSION}; profile again"
        )
    if not profile.workers:
        raise ProfileError(f"--profile {path}: no worker shapes in it")
    return profile


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(profile), indent=1) + b"\n")
