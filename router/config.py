"""The request path's typed settings (deploy builds them from the `router:` section of the serve config;
routing's own settings are router/routing.py's RoutingConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestPathConfig:
    """The request path's settings (deploy builds it from `router:` in the serve config)."""

    max_inflight: int = 256  # beyond this, RESOURCE_EXHAUSTED
    request_timeout_s: float = 600.0  # a request's deadline when the client sets none (or a longer one)
    cleanup_timeout_s: float = 5.0  # each abort / release call to a worker after a failure or cancel
    retry_after_ms: int = 1000  # how long a RESOURCE_EXHAUSTED client should back off
    max_retries: int = 3  # a request resumed on other workers at most this often after workers failed it
    failover_wait_s: float = 30.0  # a retry with no worker to take it waits this long for one to come back
    stream_idle_timeout_s: float = 30.0  # a stream silent this long after its first chunk: retried (0: off)

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_retries < 0 or self.failover_wait_s < 0:
            raise ValueError(
                f"max_retries and failover_wait_s must be >= 0, got {self.max_retries}, {self.failover_wait_s}"
            )
