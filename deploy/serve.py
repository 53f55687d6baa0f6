"""`tandem serve`: the cluster (Ray actors) behind its front doors (gRPC, OpenAI HTTP), until a signal.

    config (file and/or flags) -> Cluster.start (Ray, actors, handshakes)
      -> Membership + RequestPath -> GenerationService + grpc.aio server (health NOT_SERVING)
         and the HTTP door on the same path (router/http_app.py) -> start
      -> health SERVING -> ... -> SIGINT / SIGTERM
      -> health NOT_SERVING, server.stop(grace) (in-flight streams finish or are
         cancelled, their KV freed by the usual cleanup) -> actors killed -> Ray down

`Serving` does the same in a background thread for tests and embedding: it starts
everything, exposes `address` and `cluster`, and `stop()` tears it down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import threading
from collections.abc import Callable
from importlib import metadata
from typing import cast

from prometheus_client import start_http_server

from common.contract import PromptTokenizer
from common.telemetry import setup_tracing
from deploy.admin import AdminService, ray_client
from deploy.cluster import Cluster, WorkerHandle
from deploy.config import ServeConfig, tracing_config
from engine.loader import default_model_path
from router.config import RequestPathConfig
from router.grpc_port import build_server
from router.http_app import HttpDoor
from router.http_server import HttpServer
from router.membership import Membership
from router.pools import Policy, WorkerPool
from router.request_path import RequestPath
from router.responses import ServerFacts
from router.routing import RoutingConfig
from router.security import TlsFiles, read_tokens
from router.server import GenerationService
from router.validation import ModelFacts, RequestValidator
from tandem_api.v1 import admin_pb2 as apb
from tandem_api.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE = apb.DESCRIPTOR.services_by_name["Admin"].full_name  # "tandem.v1.Admin"
STOP_GRACE_S = 5.0
MAX_ROUTES_SHOWN = 8  # P -> D pairs printed at start-up (every pair is logged)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def server_facts(cluster: Cluster) -> ServerFacts:
    cfg, model = cluster.config, cluster.model
    if model is None:
        raise RuntimeError("server facts asked for before the cluster started")
    disagg = cfg.mode == "disaggregated"
    return ServerFacts(
        model=model.name,
        model_fingerprint=model.fingerprint,
        mode=cfg.mode,
        topology=cluster.topology(),
        version=_version("tandem-serve"),
        kv_transport=cfg.transport.backend if disagg else "none",
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        versions={d: _version(d) for d in ("ray", "torch", "nixl-cu12", "grpcio", "protobuf")},
        model_path=os.path.abspath(cfg.model) if cfg.model else default_model_path(),
    )


def routing_config(cfg: ServeConfig) -> RoutingConfig:
    r = cfg.router
    return RoutingConfig(
        policy=Policy.parse(r.policy),
        temperature=r.temperature,
        conditional_prefill_threshold=r.conditional_prefill_threshold,
        max_prefill_queue_tokens=r.max_prefill_queue_tokens,
        slo_ttft_s=r.slo_ttft_ms / 1000,
        slo_tpot_s=r.slo_itl_ms / 1000,
    )


def path_config(cfg: ServeConfig) -> RequestPathConfig:
    r = cfg.router
    return RequestPathConfig(
        max_inflight=r.max_inflight,
        request_timeout_s=r.request_timeout_s,
        cleanup_timeout_s=r.cleanup_timeout_s,
        retry_after_ms=r.retry_after_ms,
        max_retries=r.max_retries,
        failover_wait_s=r.failover_wait_s,
        stream_idle_timeout_s=r.stream_idle_timeout_s,
    )


def build_service(cluster: Cluster) -> GenerationService:
    """Membership (the pools) -> RequestPath (validation, routing, failover) -> the gRPC door over it."""
    cfg = cluster.config
    policy = Policy.parse(cfg.router.policy)

    def pool(role: str, handles: list[WorkerHandle], block_size: int) -> WorkerPool:
        return WorkerPool(role, [ray_client(h) for h in handles], policy=policy, block_size=block_size)

    if cfg.mode == "disaggregated":
        prefill = pool("prefill", cluster.prefill, cfg.prefill.block_size)
        decode = pool("decode", cluster.decode, cfg.decode.block_size)
    else:
        prefill, decode = None, pool("aggregated", cluster.workers, cfg.decode.block_size)
    validator = RequestValidator(
        ModelFacts.from_model_infos(cluster.infos),
        cast(PromptTokenizer, cluster.tokenizer),  # the engine's Tokenizer, pickled by a worker
        max_prompt_tokens=cfg.router.max_prompt_tokens,
        max_tokens=cfg.router.max_tokens,
    )
    membership = Membership(
        decode,
        prefill,
        routing=routing_config(cfg),
        rng=random.Random(cfg.seed),
        cleanup_timeout_s=cfg.router.cleanup_timeout_s,
    )
    path = RequestPath(membership, validator, path_config(cfg), tracing=setup_tracing(tracing_config(cfg, "router")))
    return GenerationService(path=path, info_source=lambda: server_facts(cluster))


def start_metrics_server(service: GenerationService, host: str, port: int | None):
    """The router's Prometheus registry at http://host:port/metrics on its own thread (None: off)."""
    if port is None:
        return None
    httpd, _ = start_http_server(port, addr=host, registry=service.metrics.registry)
    service.metrics_port = httpd.server_port
    log.info("Prometheus metrics on http://%s:%d/metrics", host, httpd.server_port)
    return httpd


async def run_server(
    cluster: Cluster,
    stop: asyncio.Event,
    on_ready=lambda port, service, admin: None,
    reload: Callable[[], ServeConfig] | None = None,
    reload_now: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set; `on_ready(port, service, admin)` is called once SERVING, with the port
    actually bound. Each time `reload_now` is set, the pools follow the replicas of `reload()`."""
    cfg = cluster.config
    service = build_service(cluster)
    membership = service.membership  # pools, health, drain: what deploy and the admin API talk to
    admin = AdminService(cluster, membership, cfg.router.drain_timeout_s)
    r = cfg.router
    tls = TlsFiles(r.tls_cert, r.tls_key, r.tls_client_ca) if r.tls_cert and r.tls_key else None
    tokens = read_tokens(r.auth_token_file) if r.auth_token_file else []
    server = build_server(
        service,
        r.host,
        r.port,
        extra=[(lambda srv: apb_grpc.add_AdminServicer_to_server(admin, srv), ADMIN_SERVICE)],
        tls=tls,
        auth_tokens=tokens,
        max_message_bytes=r.max_message_bytes,
    )
    membership.rejoin = lambda worker_id: asyncio.to_thread(cluster.rejoin_worker, worker_id)
    http: HttpServer | None = None
    if r.http:  # the OpenAI door: the same request path, membership, TLS files and tokens
        door = HttpDoor(service.path, lambda: server_facts(cluster), auth_tokens=tokens)
        http = HttpServer(door, r.host, r.http_port, tls=tls)
        service.http_port, service.http_server = http.port, http
    await server.start()
    if http is not None:
        await http.start()
        log.info("serving the OpenAI API on %s://%s:%d/v1", http.scheme, r.host, http.port)
    metrics_http = start_metrics_server(service, cfg.router.host, cfg.router.metrics_port)
    await membership.refresh_health()  # every worker's status and process, before the first request
    await membership.start_feeds()
    await membership.set_serving()
    if cfg.planner.mode == "sla":  # sizes the pools from the targets (deploy/planner_loop.py)
        from deploy.planner_loop import PlannerLoop

        admin.planner = PlannerLoop(cfg, service, admin)
    on_ready(server.tandem_port, service, admin)
    log.info("serving tandem.v1.Generation on %s:%d (%s)", cfg.router.host, server.tandem_port, cluster.topology())

    async def refresh() -> None:
        while True:
            await asyncio.sleep(cfg.router.health_check_s)
            try:
                await membership.refresh_health()
            except Exception:  # noqa: BLE001 - health polling must not end the server
                log.warning("worker health refresh failed", exc_info=True)

    async def reloader() -> None:
        while reload is not None and reload_now is not None:
            await reload_now.wait()
            reload_now.clear()
            try:
                await admin.apply_config(reload())
            except Exception:  # noqa: BLE001 - a bad edit of the file must not end the server
                log.exception("config reload failed; the pools are as they were or as far as the log says")

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(refresh()), loop.create_task(reloader())]
    if admin.planner is not None:
        tasks.append(loop.create_task(admin.planner.run(stop)))
        log.info("SLA planner on: every %g s, targets %s", cfg.planner.interval_s, cfg.planner_slo())
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        if metrics_http is not None:
            metrics_http.shutdown()
        service.tracing.shutdown()  # export what is queued
        await membership.set_serving(False)
        if http is not None:
            await asyncio.gather(server.stop(STOP_GRACE_S), http.stop())
        else:
            await server.stop(STOP_GRACE_S)
        await service.close()


def serve_forever(config: ServeConfig, reload: Callable[[], ServeConfig] | None = None) -> int:
    """Blocking `tandem serve`: returns 0 after a clean Ctrl-C / SIGTERM shutdown.

    With `reload` (the config file and flags, read again), SIGHUP makes the pools follow its replicas.
    """
    cluster = Cluster.start(config)
    try:
        asyncio.run(_main(cluster, reload))
    finally:
        cluster.shutdown()
    return 0


async def _main(cluster: Cluster, reload: Callable[[], ServeConfig] | None = None) -> None:
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    cfg = cluster.config

    def announce(port: int, service: GenerationService, admin: AdminService) -> None:
        name = cluster.model.name if cluster.model is not None else cfg.model
        print(
            f"tandem: serving {name} ({cluster.topology()}) on {cfg.router.host}:{port}; Ctrl-C to stop",
            flush=True,
        )
        shown = cluster.kv_routes[:MAX_ROUTES_SHOWN]
        for route in shown:
            print(f"tandem: KV transfer {route}", flush=True)
        if len(cluster.kv_routes) > len(shown):
            print(f"tandem: KV transfer: {len(cluster.kv_routes) - len(shown)} more pairs (log level INFO)", flush=True)
        if service.http_port is not None:
            scheme = "https" if cfg.router.tls_cert else "http"
            print(f"tandem: OpenAI API on {scheme}://{cfg.router.host}:{service.http_port}/v1", flush=True)
        if service.metrics_port is not None:
            print(
                f"tandem: Prometheus metrics on http://{cfg.router.host}:{service.metrics_port}/metrics "
                "(dashboard: deploy/observability/)",
                flush=True,
            )

    await run_server(cluster, stop, announce, reload, reload_now)
    print("tandem: stopped", flush=True)


class Serving:
    """The whole server in a background thread (tests, notebooks). Use as a context manager."""

    def __init__(self, config: ServeConfig, ready_timeout_s: float = 600.0) -> None:
        self.cluster = Cluster.start(config)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._bound: list[int] = []
        self.service: GenerationService | None = None  # the router, once serving
        self.admin: AdminService | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-router", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout_s) or self._error is not None:
            self.stop()
            raise RuntimeError(f"router did not start: {self._error!r}")

    @property
    def address(self) -> str:
        return f"{self.cluster.config.router.host}:{self._bound[0]}"

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL (…/v1); RuntimeError when the HTTP door is off."""
        if self.service is None or self.service.http_port is None:
            raise RuntimeError("the HTTP door is off (router.http: false)")
        scheme = "https" if self.cluster.config.router.tls_cert else "http"
        return f"{scheme}://{self.cluster.config.router.host}:{self.service.http_port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        def ready(port: int, service: GenerationService, admin: AdminService) -> None:
            self._bound.append(port)
            self.service, self.admin = service, admin
            self._ready.set()

        async def main() -> None:
            self._stop = asyncio.Event()
            await run_server(self.cluster, self._stop, ready)

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
        self._ready.set()  # also wakes the starter if the server ended before it was ready

    def on_router(self, fn, timeout_s: float = 60.0):
        """Run fn(service) on the router's event loop and return its result (fn may return a coroutine)."""

        async def call():
            out = fn(self.service)
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout_s)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        self.cluster.shutdown()

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
