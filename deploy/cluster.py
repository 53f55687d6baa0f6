"""Starting and stopping the worker pools on Ray.

    Cluster.start(config)
      0. deploy.topology.check_pools: every pool shape and the P/D pair are possible
         (before anything starts; an impossible pair names both sides and the field)
      1. ray.init(): a local Ray in this process by default, or join `ray_address`
         / RAY_ADDRESS / "auto" (ray job submit sets it) when given
      2. one actor per worker (PrefillWorker / DecodeWorker), placed by Ray with the
         pool's num_cpus / num_gpus / custom resources / label_selector; a worker of
         tp x pp > 1 ranks first reserves a placement group of tp * pp such bundles
         (bundle 0 for the leader actor, which starts ranks 1.. in the others)
      3. ready(): every engine loaded (in parallel), model fingerprints agree
      4. disaggregated: every (P, D) pair exchanges handshakes both ways; a pair
         whose model, dtype or layout cannot match is refused here, before traffic
    Cluster.add_worker(pool) / remove_worker(id): one worker more or less while
      serving (the admin service drains a worker in the router before removing it)
    Cluster.shutdown(): actors killed, Ray disconnected (and stopped if we started it)

Worker ids are `<pool>-<n>` with n counting up per pool and never reused, so a
removed worker's name cannot be mistaken for a new one (in the prefix index, logs).

Actors are owned by this driver: if the driver dies (Ctrl-C, `ray job stop`), Ray
reclaims them, so nothing outlives the process that served.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import ray

from common.contract import ModelInfo, Role, WorkerStatus, check_wire_version
from common.errors import ConfigError
from deploy.config import PoolConfig, ServeConfig, tracing_config
from deploy.topology import check_pools, pool_engine_config
from engine.loader import load_model_source
from kv_transfer.ucx_net import TransportInfo, pair_route
from worker_core.host import WorkerSettings
from worker_core.net import JOINED_ENV

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # model load on a cold node
CALL_TIMEOUT_S = 60.0  # handshakes and other short calls to a worker
_CREATE_LOCK = threading.Lock()


@dataclass
class WorkerHandle:
    worker_id: str
    role: str
    actor: ray.actor.ActorHandle


@dataclass
class Cluster:
    config: ServeConfig
    prefill: list[WorkerHandle] = field(default_factory=list)
    decode: list[WorkerHandle] = field(default_factory=list)
    model: ModelInfo | None = None
    infos: list[ModelInfo] = field(default_factory=list)
    tokenizer: object = None
    started_ray: bool = False
    placement_groups: dict[str, object] = field(default_factory=dict)  # worker id -> its placement group
    kv_routes: list[str] = field(default_factory=list)  # what carries each P -> D pair's KV, checked at start
    _next_index: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    # rejoin_worker and remove_worker run on threads (the health check's, the admin's): one at a time, so
    # that a removal never interleaves with a rejoin re-adding the removed worker's agents on its peers
    _membership: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rejoined: dict[str, str] = field(default_factory=dict, repr=False)  # worker id -> process (incarnation) rejoined

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    # ---- start --------------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: ServeConfig) -> Cluster:
        config = config.validate()
        check_pools(config, load_model_source(config.model).config)
        started_ray = _init_ray(config)
        try:
            config = _resolve_devices(config)
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
        cluster = cls(config)
        cluster.started_ray = started_ray
        try:
            cluster._create_workers()
            cluster._wait_ready()
            if config.mode == "disaggregated":
                cluster._handshake()
                cluster.kv_routes = cluster.transport_routes(cluster.prefill, cluster.decode)
                for route in cluster.kv_routes:
                    log.info("KV transfer: %s", route)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def _create_workers(self) -> None:
        cfg = self.config
        for pool_name, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
            for _ in range(pool.replicas):
                self.pool_workers(pool_name).append(self._create(pool_name))

    def pool_workers(self, pool_name: str) -> list[WorkerHandle]:
        if pool_name not in ("prefill", "decode"):
            raise ConfigError(f"unknown pool {pool_name!r}: use prefill or decode")
        return self.prefill if pool_name == "prefill" else self.decode

    def _create(self, pool_name: str) -> WorkerHandle:
        cfg = self.config
        disagg = cfg.mode == "disaggregated"
        with _CREATE_LOCK:  # admin operations run on threads: two may never take the same id
            i = self._next_index[pool_name]
            self._next_index[pool_name] = i + 1
        wid = f"{pool_name}-{i}" if disagg else f"worker-{pool_name}-{i}"
        handle, pg = create_worker(cfg, wid, pool_name if disagg else "aggregated", getattr(cfg, pool_name))
        if pg is not None:
            self.placement_groups[wid] = pg
        return handle

    def _wait_ready(self) -> None:
        statuses: list[WorkerStatus] = ray.get([w.actor.ready.remote() for w in self.workers], timeout=READY_TIMEOUT_S)
        infos: list[ModelInfo] = ray.get([w.actor.model_info.remote() for w in self.workers])
        check_workers_agree(infos)
        # the router validates against the smallest cache, so every worker can hold any accepted request
        self.infos = infos
        self.model = min(infos, key=lambda i: i.kv_capacity_tokens)
        self.tokenizer = ray.get(self.workers[0].actor.get_tokenizer.remote())
        for s in statuses:
            log.info(
                "worker %s (%s) ready on %s: %d KV blocks of %d, %s",
                s.worker_id,
                s.role,
                s.device,
                s.kv_blocks_total,
                s.block_size,
                s.dtype,
            )

    def transport_routes(self, prefill: list[WorkerHandle], decode: list[WorkerHandle]) -> list[str]:
        """What carries the KV of each prefill -> decode pair (the start-up check, kv_transfer/ucx_net.py);
        ConfigError for a pair on two hosts whose UCX cannot reach the other (loopback only)."""
        handles = {h.worker_id: h for h in (*prefill, *decode)}
        infos: dict[str, TransportInfo] = dict(
            zip(handles, ray.get([h.actor.transport_info.remote() for h in handles.values()]), strict=True)
        )
        return [pair_route(infos[p.worker_id], infos[d.worker_id]) for p in prefill for d in decode]

    def _handshake(self) -> None:
        p_payloads: list[bytes] = ray.get([p.actor.handshake_payload.remote() for p in self.prefill])
        d_payloads: list[bytes] = ray.get([d.actor.handshake_payload.remote() for d in self.decode])
        calls = [d.actor.add_peer.remote(pp) for d in self.decode for pp in p_payloads]
        calls += [p.actor.add_peer.remote(dp) for p in self.prefill for dp in d_payloads]
        ray.get(calls)  # an incompatible pair raises IncompatiblePeerError naming the mismatch

    # ---- growing and shrinking ------------------------------------------------------------------------------------

    def add_worker(self, pool_name: str) -> WorkerHandle:
        """Start one worker in a pool: loaded, same model, handshaken both ways with every peer (blocking).

        The router learns of it only after this returns; on failure it is stopped again.
        """
        self.pool_workers(pool_name)  # unknown pool -> ConfigError before anything starts
        handle = self._create(pool_name)
        peers = (self.decode if pool_name == "prefill" else self.prefill) if self.config.mode == "disaggregated" else []
        try:
            ray.get(handle.actor.ready.remote(), timeout=READY_TIMEOUT_S)
            info = ray.get(handle.actor.model_info.remote(), timeout=CALL_TIMEOUT_S)
            if self.model is not None:
                check_workers_agree([self.model, info], joining=handle.worker_id)
            if peers:
                mine = ray.get(handle.actor.handshake_payload.remote(), timeout=CALL_TIMEOUT_S)
                theirs = ray.get([w.actor.handshake_payload.remote() for w in peers], timeout=CALL_TIMEOUT_S)
                ray.get(
                    [w.actor.add_peer.remote(mine) for w in peers] + [handle.actor.add_peer.remote(t) for t in theirs],
                    timeout=CALL_TIMEOUT_S,
                )
                pairs = ([handle], peers) if pool_name == "prefill" else (peers, [handle])
                for route in self.transport_routes(*pairs):
                    log.info("KV transfer: %s", route)
        except BaseException:
            self._stop(handle)
            self._forget_peer(handle.worker_id, peers)  # peers that did add it drop it again
            raise
        self.pool_workers(pool_name).append(handle)
        self.infos.append(info)
        log.info("worker %s added: %s", handle.worker_id, self.topology())
        return handle

    def remove_worker(self, worker_id: str) -> None:
        """Stop one worker, then make its peers forget it (blocking). Drain it in the router first.

        Stopped first: a transfer a peer may still have in flight with it (a drain that timed out)
        then fails cleanly before its agent is removed.
        """
        with self._membership:  # after a rejoin of this worker in progress, never in the middle of it
            handle = self.handle(worker_id)
            pool = self.prefill if handle in self.prefill else self.decode
            pool.remove(handle)
            self._rejoined.pop(worker_id, None)
            self._stop(handle)
            if self.config.mode == "disaggregated":
                self._forget_peer(worker_id, list(self.decode if pool is self.prefill else self.prefill))
        log.info("worker %s removed: %s", worker_id, self.topology())

    def rejoin_worker(self, worker_id: str) -> None:
        """Handshake a worker Ray restarted (a new process: new NIXL agents, knows no peer) both ways with
        every peer that answers; each peer first drops the dead process's agents under the same name
        (blocking). A peer that is down itself is skipped: it handshakes everyone when it rejoins.

        Safe to repeat (the router calls it again on its next health check after a failure part way):
        each side drops what it may know of the other before adding it. A process already rejoined is
        left alone (two health checks that both saw the restart): redoing it would make its peers drop
        its agents while it serves. One at a time with `remove_worker`; a worker removed meanwhile raises
        KeyError (nothing to rejoin)."""
        with self._membership:
            handle = self.handle(worker_id)
            status = cast(WorkerStatus, ray.get(handle.actor.ready.remote(), timeout=READY_TIMEOUT_S))
            incarnation = status.incarnation  # this process (WorkerStatus.incarnation)
            if incarnation and self._rejoined.get(worker_id) == incarnation:
                return
            if self.config.mode == "disaggregated":
                self._handshake_again(handle)
            if incarnation:
                self._rejoined[worker_id] = incarnation

    def _handshake_again(self, handle: WorkerHandle) -> None:
        """rejoin_worker's handshakes (caller holds `_membership`)."""
        worker_id = handle.worker_id
        peers = list(self.decode if handle in self.prefill else self.prefill)
        mine = cast(bytes, ray.get(handle.actor.handshake_payload.remote(), timeout=CALL_TIMEOUT_S))
        joined = 0
        for peer in peers:
            try:
                theirs = ray.get(peer.actor.handshake_payload.remote(), timeout=CALL_TIMEOUT_S)
                ray.get(peer.actor.remove_peer.remote(worker_id), timeout=CALL_TIMEOUT_S)
                ray.get(peer.actor.add_peer.remote(mine), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError as exc:  # dead or restarting: its own rejoin covers this pair
                log.warning(
                    "rejoin of %s: peer %s is down (%s); it handshakes when it rejoins",
                    worker_id,
                    peer.worker_id,
                    type(exc).__name__,
                )
                continue
            # a peer that is alive but slow (GetTimeoutError) fails the rejoin: it would never redo this pair
            # the restarted worker's own side: errors end this rejoin (retried on the next check)
            ray.get(handle.actor.remove_peer.remote(peer.worker_id), timeout=CALL_TIMEOUT_S)
            ray.get(handle.actor.add_peer.remote(theirs), timeout=CALL_TIMEOUT_S)
            joined += 1
        log.info("worker %s rejoined after a restart: handshaken with %d of %d peers", worker_id, joined, len(peers))

    @staticmethod
    def _forget_peer(worker_id: str, peers: list[WorkerHandle]) -> None:
        try:
            ray.get([w.actor.remove_peer.remote(worker_id) for w in peers], timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot answer keeps a dead entry; never blocks removal
            log.warning("peers of %s could not forget it: %s", worker_id, exc)

    def handle(self, worker_id: str) -> WorkerHandle:
        for w in self.workers:
            if w.worker_id == worker_id:
                return w
        raise KeyError(f"no worker {worker_id!r} (workers: {', '.join(w.worker_id for w in self.workers)})")

    def pool_name(self, worker_id: str) -> str:
        return "prefill" if self.handle(worker_id) in self.prefill else "decode"

    def _stop(self, handle: WorkerHandle) -> None:
        try:
            ray.get(handle.actor.shutdown.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort; the kill below is what counts
            pass
        try:
            ray.kill(handle.actor)
        except Exception:  # noqa: BLE001
            pass
        pg = self.placement_groups.pop(handle.worker_id, None)
        if pg is not None:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with its job
                pass

    # ---- run time -----------------------------------------------------------------------------------------------

    def topology(self) -> str:
        cfg = self.config
        p, d = cfg.prefill, cfg.decode
        if cfg.mode == "aggregated":
            return f"{len(self.prefill)}A({p.shape()}) + {len(self.decode)}A({d.shape()})"
        return f"{len(self.prefill)}P({p.shape()}) x {len(self.decode)}D({d.shape()})"

    def check_pools(self, timeout_s: float = 30.0) -> None:
        """Wait until every worker is idle, then check integrity and leaks everywhere (tests, admin)."""
        idle: list[bool] = ray.get([w.actor.wait_idle.remote(timeout_s) for w in self.workers])
        busy = [w.worker_id for w, ok in zip(self.workers, idle) if not ok]
        if busy:
            raise AssertionError(f"workers still busy after {timeout_s} s: {busy}")
        ray.get([w.actor.leak_check.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            self._stop(w)
        self.prefill.clear()
        self.decode.clear()
        for pg in self.placement_groups.values():  # a worker that failed before it was listed
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        self.placement_groups.clear()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()  # a Ray we joined (or that a test started) is left running


def check_workers_agree(infos: list[ModelInfo], joining: str | None = None) -> None:
    """Every worker of a cluster serves one model and speculates alike (ModelInfo.fingerprint and
    .speculative); ConfigError names what differs. `joining`: the worker being added to the others."""
    who = f"worker {joining} and the cluster" if joining else "workers"
    for info in infos:
        check_wire_version(info.wire_version)
    prints = sorted({i.fingerprint for i in infos})
    if len(prints) != 1:
        raise ConfigError(f"{who} loaded different models (fingerprints {prints}); use one model")
    specs = sorted({i.speculative or "off" for i in infos})
    if len(specs) != 1:
        raise ConfigError(
            f"{who} run different speculative decoding configs ({specs}); give every worker "
            "the same speculative section"
        )


def create_worker(cfg: ServeConfig, wid: str, role: str, pool: PoolConfig) -> tuple[WorkerHandle, object | None]:
    """Start one worker's leader actor (it starts its other ranks); returns it and its placement group.

    A worker of one rank is placed with the pool's resources / label_selector; a worker of
    tp x pp ranks reserves a placement group of that many bundles (pool.placement_strategy,
    PACK by default) and its leader takes bundle 0.
    """
    t = cfg.transport
    env = _worker_env(cfg)
    borrow, lend_ms = pool.core_sharing(role, cfg.router.slo_itl_ms)
    resources = dict(num_cpus=pool.num_cpus, num_gpus=pool.gpus, resources=dict(pool.resources) or None)
    settings = WorkerSettings(
        worker_id=wid,
        role=role,
        engine=pool_engine_config(cfg.model, pool, cfg.seed, cfg.speculative, cfg.router.slo_ttft_ms),
        transport="nixl" if role != Role.AGGREGATED else "none",
        nixl_backend=t.nixl_backend,
        nixl_progress_thread=t.progress_thread,
        lease_s=t.lease_s,
        transfer_timeout_s=t.transfer_timeout_s,
        admission_timeout_s=t.admission_timeout_s,
        num_threads=pool.num_threads,
        borrow_idle_cores=borrow,
        lend_core_tpot_ms=lend_ms,
        rank_options=dict(resources, runtime_env={"env_vars": env}),
        tracing=tracing_config(cfg, role),
        fault_injection=cfg.fault_injection,
    )
    pg = None
    if pool.world_size == 1:
        placement: dict[str, Any] = dict(resources, label_selector=dict(pool.label_selector) or None)
    else:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": pool.num_cpus, **({"GPU": pool.gpus} if pool.gpus else {}), **pool.resources}
        pg = placement_group(
            [bundle] * pool.world_size,
            strategy=pool.placement_strategy,
            name=f"tandem-{wid}",
            bundle_label_selector=[dict(pool.label_selector)] * pool.world_size if pool.label_selector else None,
        )
        placement = dict(
            resources,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
            ),
        )
    try:
        actor = (
            _actor_class(role)
            .options(
                name=f"tandem-{wid}",
                namespace=cfg.ray_namespace,
                lifetime=None,
                max_concurrency=1000,
                max_restarts=pool.max_restarts,
                max_task_retries=0,  # the router retries requests, Ray must not
                runtime_env={"env_vars": env},
                **placement,
            )
            .remote(settings)
        )
    except BaseException:
        if pg is not None:  # never leave a reservation behind (a taken name, a bad option)
            ray.util.remove_placement_group(pg)
        raise
    return WorkerHandle(wid, role, actor), pg


def _actor_class(role: str):
    if role == Role.PREFILL:
        from prefill_worker.worker import PrefillWorker

        return ray.remote(PrefillWorker)
    from decode_worker.worker import DecodeWorker

    return ray.remote(DecodeWorker)


def _worker_env(cfg: ServeConfig) -> dict[str, str]:
    env = {"TANDEM_KEEP_HEAP": os.environ.get("TANDEM_KEEP_HEAP", "1")}
    t = cfg.transport
    if t.ucx_tls:
        env["UCX_TLS"] = t.ucx_tls
    if t.ucx_net_devices:
        env["UCX_NET_DEVICES"] = t.ucx_net_devices
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # a joined cluster may gain hosts: not loopback
        env[JOINED_ENV] = "1"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "UCX_TLS", "UCX_NET_DEVICES"):
        if key in os.environ and key not in env:
            env[key] = os.environ[key]
    return env


def _resolve_devices(cfg: ServeConfig) -> ServeConfig:
    """Pools with device "auto" go on GPUs when the Ray cluster has any (a GPU machine, a KubeRay GPU group)."""
    if "auto" not in (cfg.prefill.device, cfg.decode.device):
        return cfg
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    resolved = cfg.with_devices(gpus)
    p, d = resolved.prefill, resolved.decode
    log.info(
        "device auto (the Ray cluster has %g GPU(s)): prefill on %s (%g GPU per rank), decode on %s (%g)",
        gpus,
        p.device,
        p.gpus,
        d.device,
        d.gpus,
    )
    return resolved


def _init_ray(cfg: ServeConfig) -> bool:
    """Connect to Ray; True when this call started a local instance (we then own its shutdown)."""
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.ray_namespace, logging_level=logging.WARNING)
        return False
    need_cpus = sum(p.num_cpus * p.replicas * p.world_size for p in (cfg.prefill, cfg.decode))
    ray.init(
        namespace=cfg.ray_namespace,
        include_dashboard=False,
        logging_level=logging.WARNING,
        num_cpus=max(os.cpu_count() or 1, int(need_cpus + 0.999)),
        _node_ip_address="127.0.0.1",
    )
    return True
