"""`TandemClient`: a small synchronous Python client of tandem.v1 (grpcio only; no torch, no Ray).

    with TandemClient("127.0.0.1:50051") as client:
        for response in client.generate(prompt="The capital of France is", max_tokens=16, temperature=0):
            print(response.text, end="", flush=True)
        text, token_ids, last = client.complete(chat=[{"role": "user", "content": "Hi"}], max_tokens=32)
        print(last.finish_reason, last.usage.completion_tokens, last.timings.time_to_first_token_s)
        client.server_info().workers        # every worker's status
        client.health()                     # "SERVING" | "NOT_SERVING" | ...
        client.add_workers("prefill", 1)    # tandem.v1.Admin: grow / shrink the pools while serving
        client.remove_worker("prefill-1", drain_timeout_s=60)
        client.scale_pool("decode", 2)

Errors are `grpc.RpcError` with `.code()` and `.details()` (INVALID_ARGUMENT for a
bad field, RESOURCE_EXHAUSTED when the server is full, ...); the client does not
retry on its own. `timeout` (seconds) becomes the call's gRPC deadline.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem_api.v1 import admin_pb2 as apb
from tandem_api.v1 import admin_pb2_grpc as apb_grpc
from tandem_api.v1 import generation_pb2 as pb
from tandem_api.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = frozenset(pb.SamplingOptions.DESCRIPTOR.fields_by_name)  # every tandem.v1 sampling option
Chat = Sequence[Mapping[str, str] | tuple[str, str]]


def build_request(
    prompt: str | None = None,
    token_ids: Iterable[int] | None = None,
    chat: Chat | None = None,
    request_id: str = "",
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of prompt / token_ids / chat plus sampling keywords."""
    inputs = (("prompt", prompt), ("token_ids", token_ids), ("chat", chat))
    given = [name for name, value in inputs if value is not None]
    if len(given) != 1:
        raise TypeError(f"give exactly one of prompt=, token_ids=, chat= (got {', '.join(given) or 'none'})")
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    options = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingOptions(**options))
    if prompt is not None:
        request.prompt = prompt
    elif token_ids is not None:
        request.token_ids.CopyFrom(pb.TokenIds(ids=list(token_ids)))
    else:
        messages = [m if isinstance(m, tuple) else (m["role"], m["content"]) for m in chat or ()]
        request.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))
    return request


class TandemClient:
    """A channel to one Tandem router. Thread-safe (gRPC channels are)."""

    def __init__(
        self,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        tls: bool = False,
    ) -> None:
        """`token`: sent as `authorization: Bearer <token>` on every call. TLS when `tls` or any tls_*
        is given: `tls_ca` (PEM) verifies the server (None: the system roots); `tls_cert` + `tls_key` (PEM)
        are this client's certificate for mutual TLS."""
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls or tls_ca or tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
            )
            self._channel = grpc.secure_channel(target, creds, options=list(options))
        else:
            self._channel = grpc.insecure_channel(target, options=list(options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._admin = apb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Iterable[int] | None = None,
        chat: Chat | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Streams the responses of one request; the last has finish_reason, usage and timings.

        Closing the iterator early (or dropping it) cancels the call on the server.
        """
        request = build_request(prompt, token_ids, chat, request_id, **sampling)  # bad arguments raise here
        return _responses(self._stub.Generate(request, timeout=timeout, metadata=self._metadata))

    def complete(self, prompt: str | None = None, **kwargs: Any) -> tuple[str, list[int], pb.GenerateResponse]:
        """(whole text, every token id, the last response) of one request."""
        texts: list[str] = []
        ids: list[int] = []
        last = None
        for last in self.generate(prompt, **kwargs):
            texts.append(last.text)
            ids.extend(last.token_ids)
        if last is None:  # the server always sends at least one response on success
            raise RuntimeError("the server ended the stream without a response")
        return "".join(texts), ids, last

    def server_info(self, timeout: float | None = 10.0) -> pb.ServerInfo:
        return self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    # -- tandem.v1.Admin ---------------------------------------------------------------------------

    def add_workers(self, pool: str, count: int = 1, timeout: float | None = 900.0) -> apb.AddWorkersResponse:
        """Start `count` workers in pool "prefill" or "decode"; returns once they take requests."""
        return self._admin.AddWorkers(
            apb.AddWorkersRequest(pool=pool, count=count), timeout=timeout, metadata=self._metadata
        )

    def remove_worker(
        self, worker_id: str, drain_timeout_s: float = 0.0, timeout: float | None = 900.0
    ) -> apb.RemoveWorkerResponse:
        """Drain a worker (running requests finish) and stop it; drain_timeout_s 0 = the server's default."""
        return self._admin.RemoveWorker(
            apb.RemoveWorkerRequest(worker_id=worker_id, drain_timeout_s=drain_timeout_s),
            timeout=timeout,
            metadata=self._metadata,
        )

    def scale_pool(
        self, pool: str, replicas: int, drain_timeout_s: float = 0.0, timeout: float | None = 900.0
    ) -> apb.ScalePoolResponse:
        """Grow or shrink a pool to `replicas` workers (removing the newest first)."""
        return self._admin.ScalePool(
            apb.ScalePoolRequest(pool=pool, replicas=replicas, drain_timeout_s=drain_timeout_s),
            timeout=timeout,
            metadata=self._metadata,
        )

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name of `service` ("" = the whole server), e.g. "SERVING"."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Blocks until health reports SERVING (watching it, no polling); TimeoutError after `timeout` s."""
        watch = self._health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True)
        try:
            for response in watch:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            watch.cancel()
        raise TimeoutError(f"{self.target} did not report SERVING within {timeout} s")


def _responses(call: Any) -> Generator[pb.GenerateResponse, None, None]:
    try:
        yield from call
    finally:
        call.cancel()  # a no-op once the stream completed; cancels the request if the caller stopped early
