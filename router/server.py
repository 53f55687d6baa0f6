"""The gRPC front door: `GenerationService` (tandem.v1.Generation), a thin adapter over the request
path; router/grpc_port.py binds it to a port.

    Generate       -> RequestPath.run(request, context.write, deadline = the client's, carrier = the
                      call's metadata) -> Ended -> the status from router/errors.py's OUTCOMES table
                      (RESOURCE_EXHAUSTED also carries grpc-retry-pushback-ms)
    GetServerInfo  -> ServerFacts + every worker's status (Membership)
    grpc.health.v1 -> NOT_SERVING until Membership.set_serving(True), and again while draining

What a request goes through (admission, validation, routing, failover, cleanup) is in
router/request_path.py; the pools, health, drain and rejoin are in router/membership.py. The HTTP
door (router/http_app.py) calls the same request path.

`GenerationService(...)` with keyword arguments builds all three (the way tests and embedders made
it before the split); deploy builds `Membership` and `RequestPath` itself and passes them in.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from common.telemetry import Tracing
from router.config import RequestPathConfig
from router.delivery import Ended
from router.errors import status_for
from router.grpc_port import SERVICE_NAME, Undecodable
from router.membership import Membership
from router.metrics import RouterMetrics
from router.pools import WorkerPool, WorkerReport
from router.request_path import RequestPath
from router.responses import ServerFacts, server_info
from router.routing import RoutingConfig
from router.validation import RequestValidator
from router.workers import WorkerClient
from tandem_api.v1 import generation_pb2 as pb
from tandem_api.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
ServerInfoSource = Callable[[], ServerFacts]


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 that starts NOT_SERVING for "" and tandem.v1.Generation (the stock one starts "" SERVING)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("", SERVICE_NAME):
            self._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING

    async def follow(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.set(name, status)


class GenerationService(pb_grpc.GenerationServicer):
    """tandem.v1.Generation over a request path. `prefill=None` means aggregated mode (`decode` holds W)."""

    def __init__(
        self,
        *,
        validator: RequestValidator | None = None,
        decode: WorkerPool | None = None,
        prefill: WorkerPool | None = None,
        info_source: ServerInfoSource | None = None,
        max_inflight: int = 256,
        request_timeout_s: float = 600.0,
        cleanup_timeout_s: float = 5.0,
        status_timeout_s: float = 2.0,
        routing: RoutingConfig | None = None,
        rng: random.Random | None = None,
        metrics: RouterMetrics | None = None,
        tracing: Tracing | None = None,
        retry_after_ms: int = 1000,
        max_retries: int = 3,
        failover_wait_s: float = 30.0,
        stream_idle_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        path: RequestPath | None = None,
    ) -> None:
        if path is None:
            if decode is None:
                raise ValueError("GenerationService needs a request path, or the pools (decode=...) to build one")
            membership = Membership(
                decode,
                prefill,
                routing=routing,
                rng=rng,
                status_timeout_s=status_timeout_s,
                cleanup_timeout_s=cleanup_timeout_s,
            )
            config = RequestPathConfig(
                max_inflight=max_inflight,
                request_timeout_s=request_timeout_s,
                cleanup_timeout_s=cleanup_timeout_s,
                retry_after_ms=retry_after_ms,
                max_retries=max_retries,
                failover_wait_s=failover_wait_s,
                stream_idle_timeout_s=stream_idle_timeout_s,
            )
            path = RequestPath(membership, validator, config, metrics=metrics, tracing=tracing, clock=clock)
        self.path, self.membership = path, path.membership
        self.info_source = info_source
        self.metrics_port: int | None = None  # set by deploy when it serves /metrics
        self.http_port: int | None = None  # set by deploy when the HTTP door serves the same path
        self.http_server: Any = None  # and its router.http_server.HttpServer (deploy sets both)
        self.health = _Health()
        self.membership.on_serving(self.health.follow)

    # -- what deploy, the admin API and tests reach through the service ---------------------------

    @property
    def validator(self) -> RequestValidator | None:
        return self.path.validator

    @property
    def router(self):
        return self.membership.router

    @property
    def feed(self):
        return self.membership.feed

    @property
    def metrics(self) -> RouterMetrics:
        return self.path.metrics

    @property
    def tracing(self) -> Tracing:
        return self.path.tracing

    @property
    def prefill(self) -> WorkerPool | None:
        return self.membership.prefill

    @property
    def decode(self) -> WorkerPool:
        return self.membership.decode

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        return self.membership.pools

    @property
    def mode(self) -> str:
        return self.membership.mode

    @property
    def serving(self) -> bool:
        return self.membership.serving

    @property
    def in_flight(self) -> int:
        return self.path.in_flight

    @property
    def _active(self):
        return self.path._active

    @property
    def rejoin(self):
        return self.membership.rejoin

    @rejoin.setter
    def rejoin(self, fn) -> None:
        self.membership.rejoin = fn

    def pool_of(self, worker_id: str) -> WorkerPool:
        return self.membership.pool_of(worker_id)

    def add_worker(self, pool: WorkerPool, client: WorkerClient, incarnation: str = "") -> None:
        self.membership.add_worker(pool, client, incarnation)

    async def drain_worker(self, worker_id: str, timeout_s: float) -> bool:
        return await self.membership.drain_worker(worker_id, timeout_s)

    async def start_feeds(self) -> None:
        await self.membership.start_feeds()

    async def set_serving(self, serving: bool = True) -> None:
        await self.membership.set_serving(serving)

    async def refresh_health(self) -> None:
        await self.membership.refresh_health()

    async def wait_rejoins(self, timeout_s: float) -> bool:
        return await self.membership.wait_rejoins(timeout_s)

    async def worker_reports(self) -> list[WorkerReport]:
        return await self.membership.worker_reports()

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self.path.wait_idle(timeout_s)

    async def close(self) -> None:
        """Stops the KV event feeds and rejoins under way, and waits for the cleanups still running
        (each bounded by `cleanup_timeout_s`); call after server.stop()."""
        await self.membership.close()
        await self.path.close()

    # -- Generate ---------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        ended = await self.path.run(
            request, context.write, deadline_s=context.time_remaining(), carrier=context.invocation_metadata()
        )
        if not ended.ok:
            self._set_status(context, ended)

    @staticmethod
    def _set_status(context: grpc.aio.ServicerContext, ended: Ended) -> None:
        if ended.retry_after_ms is not None:  # how long to back off: gRPC's retry pushback trailer
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(ended.retry_after_ms)),))
        context.set_code(ended.outcome.grpc_code)
        context.set_details(ended.message)

    # -- GetServerInfo ----------------------------------------------------------------------------

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            if self.info_source is None:
                raise RuntimeError("no server facts source was given to this service")
            return server_info(
                self.info_source(), await self.membership.worker_reports(), self.membership.worker_extras()
            )
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            log.exception("GetServerInfo failed")
            code, message = status_for(exc)
            context.set_code(code)
            context.set_details(message)
            return pb.ServerInfo()
