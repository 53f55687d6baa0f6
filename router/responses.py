"""Turning worker messages (common.contract) into tandem.v1 responses.

- `chunk_response(chunk, worker_id)`: one `StreamChunk` -> one `GenerateResponse`.
  A chunk that reports a failure (`error` set or finish_reason "error") raises
  `WorkerFailedError` instead: failures travel as gRPC statuses, never as a
  response with FINISH_REASON_ERROR (see router/server.py).
- `RequestTrace`: clock readings and counters of one request; `finish()` writes
  `usage` and `timings` into the last response.
- `ServerFacts` (what deploy knows: model, mode, topology, versions) +
  worker statuses -> `ServerInfo`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.contract import Health, LogprobEntry, StreamChunk, acceptance_length
from router.errors import WorkerFailedError, one_line
from router.pools import WorkerReport
from tandem_api.v1 import generation_pb2 as pb

API_VERSION = "tandem.v1"
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def _logprob(entry: LogprobEntry) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top],
    )


def chunk_response(chunk: StreamChunk, worker_id: str) -> pb.GenerateResponse:
    """The response for one chunk; `WorkerFailedError` if the chunk reports a failure."""
    if chunk.error is not None or chunk.finish_reason == "error":
        raise WorkerFailedError(
            f"worker {worker_id} failed the request: {one_line(chunk.error or 'no message')}", worker_id
        )
    response = pb.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        logprobs=[_logprob(e) for e in chunk.logprobs],
    )
    if chunk.finished:
        reason = FINISH_REASONS.get(chunk.finish_reason or "")
        if reason is None:
            raise WorkerFailedError(
                f"worker {worker_id} finished the request with an unknown finish_reason {chunk.finish_reason!r}",
                worker_id,
            )
        response.finish_reason = reason
        response.stop_reason = chunk.stop_reason or ""
    return response


@dataclass
class RequestTrace:
    """What the router measured and counted for one request (all times from the injected clock).

    TTFT decomposes exactly: `ttft_parts()` = queue (receipt -> routing starts: admission and
    validation), route (the routing decision), prefill (routed -> the first worker result
    arrives: the Ray call, the worker's queueing and compute; for a local prefill, the
    decode worker's first chunk), return (that result -> the first response handed to gRPC).
    In Tandem token 1 comes from the prefill worker, so the KV pull and the first decode
    step are in token 2's latency, not in TTFT (`kv_transfer_s` is measured by decode).
    """

    received: float
    prompt_tokens: int
    dispatched: float | None = None  # first worker call issued (= routed)
    routing_started: float | None = None
    first_arrived: float | None = None  # first worker result / chunk received
    first_sent: float | None = None  # first response handed to gRPC
    last_sent: float | None = None
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_transfer_bytes: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    spec: tuple[int, int, int] = (0, 0, 0)  # speculative decoding: (steps, proposed, accepted) of the attempts
    retries: int = 0  # times a worker failed mid-request and the router resumed it elsewhere
    finish_reason: str = ""
    token_gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since last chunk, its tokens)

    def count(self, chunk: StreamChunk) -> None:
        self.completion_tokens += len(chunk.token_ids)
        self.kv_transfer_s = max(self.kv_transfer_s, chunk.kv_transfer_s)
        self.kv_transfer_bytes = max(self.kv_transfer_bytes, chunk.kv_transfer_bytes)
        self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)
        if chunk.spec_steps:  # each attempt's last chunk: a resumed request adds its new attempt's
            s = self.spec
            self.spec = (s[0] + chunk.spec_steps, s[1] + chunk.spec_proposed, s[2] + chunk.spec_accepted)

    @property
    def acceptance_length(self) -> float:
        steps, _, accepted = self.spec
        return acceptance_length(steps, accepted) or 0.0

    def sent(self, now: float, tokens: int) -> None:
        """A response with `tokens` tokens was handed to gRPC at `now`. Tokens that arrive with the first
        count as gaps of 0 (as `tandem bench` counts them): every token after the first is one ITL sample."""
        if self.first_sent is None:
            self.first_sent = now
            if tokens > 1:
                self.token_gaps.append((0.0, tokens - 1))
        elif tokens:
            self.token_gaps.append((now - (self.last_sent or now), tokens))
        self.last_sent = now

    def ttft_parts(self) -> dict[str, float] | None:
        """queue + route + prefill + return == TTFT (None until the first response was sent)."""
        r, d, f, s = self.routing_started, self.dispatched, self.first_arrived, self.first_sent
        if r is None or d is None or f is None or s is None:
            return None
        marks = (self.received, r, d, f, s)
        return {name: b - a for name, a, b in zip(("queue", "route", "prefill", "return"), marks, marks[1:])}

    def finish(self, response: pb.GenerateResponse, now: float) -> None:
        first = self.first_sent if self.first_sent is not None else now
        dispatched = self.dispatched if self.dispatched is not None else self.received
        steps, proposed, accepted = self.spec
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.cached_tokens,
                spec_verify_steps=steps,
                spec_proposed_tokens=proposed,
                spec_accepted_tokens=accepted,
                acceptance_length=self.acceptance_length,
            )
        )
        response.retries = self.retries
        response.timings.CopyFrom(
            pb.Timings(
                time_to_first_token_s=first - self.received,
                total_s=now - self.received,
                queue_s=dispatched - self.received,
                prefill_s=self.prefill_s,
                kv_transfer_s=self.kv_transfer_s,
            )
        )


@dataclass(frozen=True)
class ServerFacts:
    """What deploy knows about the running cluster (returned by the `ServerInfoSource` callable)."""

    model: str
    model_fingerprint: str
    mode: str  # "disaggregated" | "aggregated"
    topology: str  # e.g. "1P(tp1,pp1) x 1D(tp1,pp1)"
    version: str  # tandem version
    kv_transport: str  # "nixl" | "none"
    max_model_len: int
    vocab_size: int
    versions: Mapping[str, str] = field(default_factory=dict)  # component -> version
    model_path: str = ""  # the .gguf file or HF directory the workers loaded


def worker_info(report: WorkerReport, draining: bool = False, indexed: int = 0) -> pb.WorkerInfo:
    s = report.status
    if s is None:
        return pb.WorkerInfo(
            worker_id=report.worker_id,
            role=report.role,
            health=Health.UNKNOWN,
            draining=draining,
            kv_blocks_indexed=indexed,
        )
    return pb.WorkerInfo(
        worker_id=s.worker_id,
        role=s.role,
        health=s.health,
        kv_blocks_total=s.kv_blocks_total,
        kv_blocks_free=s.kv_blocks_free,
        running_requests=s.running,
        waiting_requests=s.waiting,
        leased_requests=s.leased,
        node_id=s.node_id,
        device=s.device,
        block_size=s.block_size,
        dtype=s.dtype,
        draining=draining,
        prefill_tokens=s.prefill_tokens,
        kv_blocks_indexed=indexed,
    )


def server_info(
    facts: ServerFacts, reports: Sequence[WorkerReport], extras: Mapping[str, tuple[bool, int]] | None = None
) -> pb.ServerInfo:
    """`extras`: worker -> (draining, blocks indexed by the router)."""
    extras = extras or {}
    return pb.ServerInfo(
        model=facts.model,
        model_fingerprint=facts.model_fingerprint,
        mode=facts.mode,
        topology=facts.topology,
        version=facts.version,
        api_version=API_VERSION,
        kv_transport=facts.kv_transport,
        versions=dict(facts.versions),
        max_model_len=facts.max_model_len,
        vocab_size=facts.vocab_size,
        workers=[worker_info(r, *extras.get(r.worker_id, (False, 0))) for r in reports],
        model_path=facts.model_path,
    )
