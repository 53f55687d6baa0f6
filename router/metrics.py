"""The router's Prometheus metrics: one registry per router, aggregated over every worker.

Served by deploy on `--metrics-port` at /metrics (one endpoint per cluster: the router
sees every request end to end, and it receives every worker's status with each KV
event reply, so worker gauges come from there too; workers export nothing themselves).

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(`gen_ai.server.*`, written the Prometheus way: dots as underscores, unit suffix) and
carry a `tandem_` prefix otherwise. Every name a dashboard panel queries is listed in
METRIC_NAMES (tests/unit/test_dashboards.py checks the dashboard against it and this
registry against it).

Request metrics are observed once per request, from the router's own clock readings
(router/responses.py RequestTrace), when it ends (success or failure). Prompt text and
token ids are never labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.load_window import LoadWindow

if TYPE_CHECKING:
    from router.responses import RequestTrace

# seconds: 1 ms .. 2 min, dense where TTFT and inter-token latency live
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    120.0,
)
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# the terms of a worker's live step model, in StepModel.coefficients() order (planner/model.py)
STEP_TERMS = ("base", "prefill_token", "attn_pair", "decode_row", "decode_context")

TTFT_PARTS = ("queue", "route", "prefill", "return")  # sum = TTFT (see RequestTrace.ttft_parts)

METRIC_NAMES = {
    # histograms (Prometheus adds _bucket / _sum / _count)
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_server_request_duration_seconds",
    "tandem_inter_token_latency_seconds",
    "tandem_ttft_part_seconds",
    "tandem_kv_transfer_seconds",
    "tandem_router_decision_seconds",
    "tandem_spec_acceptance_length",
    # counters (Prometheus adds _total)
    "tandem_requests_total",
    "tandem_prompt_tokens_total",
    "tandem_completion_tokens_total",
    "tandem_cached_tokens_total",
    "tandem_routing_decisions_total",
    "tandem_kv_transfer_bytes_total",
    "tandem_kv_transfer_failures_total",
    "tandem_request_retries_total",
    "tandem_worker_spec_tokens_total",
    "tandem_worker_spec_verify_steps_total",
    "tandem_worker_widened_steps_total",
    "tandem_worker_core_lent_seconds_total",
    "tandem_planner_decisions_total",
    # gauges
    "tandem_requests_in_flight",
    "tandem_worker_requests_running",
    "tandem_worker_requests_waiting",
    "tandem_worker_kv_blocks",
    "tandem_worker_kv_usage_ratio",
    "tandem_worker_kv_leases",
    "tandem_worker_prefix_cache_hit_ratio",
    "tandem_worker_up",
    "tandem_worker_step_model_seconds",
    "tandem_worker_step_model_steps",
    "tandem_worker_step_model_busy_neighbours",
    "tandem_worker_step_model_decode_shape",
    "tandem_planner_wanted_workers",
    "tandem_planner_request_rate",
    "tandem_planner_slo_attainment",
}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request receipt to the first token sent",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (mean over the request)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from request receipt to its last response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Gap between consecutive tokens as sent by the router",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_part = Histogram(
            "tandem_ttft_part_seconds",
            "TTFT decomposed: queue (receipt -> routed), route (the decision), prefill "
            "(worker call: its queueing + compute), return (result -> first token sent)",
            ["part"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer = Histogram(
            "tandem_kv_transfer_seconds",
            "Decode pulling a prompt's KV (submit -> done)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decision = Histogram(
            "tandem_router_decision_seconds",
            "Router.route: hashing, index lookups, costs",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tandem_requests",
            "Requests by finish reason, outcome (gRPC status code name) and front door (grpc | http)",
            ["finish_reason", "code", "door"],
            registry=r,
        )
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("tandem_completion_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("tandem_cached_tokens", "Prompt tokens served from a prefix cache", registry=r)
        self.decisions = Counter(
            "tandem_routing_decisions",
            "Routing decisions: remote or local prefill, and why",
            ["prefill", "reason"],
            registry=r,
        )
        self.transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes pulled by decode workers", registry=r)
        self.transfer_failures = Counter("tandem_kv_transfer_failures", "KV pulls that failed", registry=r)
        self.retries = Counter(
            "tandem_request_retries",
            "Requests resumed on other workers after a worker failed them, by reason",
            ["reason"],
            registry=r,
        )
        self.acceptance = Histogram(
            "tandem_spec_acceptance_length",
            "Speculative decoding: a finished request's tokens per verification step (1 + accepted / steps)",
            buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0),
            registry=r,
        )
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests in flight through the router", registry=r)
        self.window = LoadWindow()  # recent arrivals and ended requests, for the SLA planner
        # set by the SLA planner (deploy/planner_loop.py) when it runs; absent from a scrape otherwise
        self.planner_decisions = Counter(
            "tandem_planner_decisions_total", "SLA planner decisions", ["action", "pool"], registry=r
        )
        self.planner_wanted = Gauge(
            "tandem_planner_wanted_workers", "Workers the SLA planner sizes each pool to", ["pool"], registry=r
        )
        self.planner_rate = Gauge(
            "tandem_planner_request_rate",
            "Arrival rate the SLA planner observed / predicts (req/s)",
            ["kind"],
            registry=r,
        )
        self.planner_attainment = Gauge(
            "tandem_planner_slo_attainment",
            "SLO attainment the SLA planner observed / predicts for its choice",
            ["kind"],
            registry=r,
        )
        # () -> [(role, worker id, last WorkerStatus or None, eligible)], called at scrape time (the service sets it)
        self.workers_source: Callable[[], Iterable[tuple[str, str, object, bool]]] = list
        r.register(_WorkerCollector(self))

    def observe_request(self, t: RequestTrace, local: bool, code: str, door: str) -> None:
        """One ended request (call once): its count by finish reason, outcome and door, and, if it sent a
        token, its latencies and token counts from the router's clock readings."""
        self.requests.labels(t.finish_reason or "none", code, door).inc()
        self.window.ended(t, code, t.last_sent or t.first_sent or t.received)
        if t.first_sent is None:
            return  # refused or failed before its first token: counted above, nothing else to time
        kind = "local" if local else "remote"
        self.ttft.labels(kind).observe(t.first_sent - t.received)
        self.duration.labels(kind).observe((t.last_sent or t.first_sent) - t.received)
        for part, seconds in (t.ttft_parts() or {}).items():
            self.ttft_part.labels(part).observe(seconds)
        for gap, tokens in t.token_gaps:
            for _ in range(tokens):
                self.itl.observe(gap / tokens)
        if t.completion_tokens > 1 and t.last_sent is not None:
            self.tpot.observe((t.last_sent - t.first_sent) / (t.completion_tokens - 1))
        self.prompt_tokens.inc(t.prompt_tokens)
        self.completion_tokens.inc(t.completion_tokens)
        self.cached_tokens.inc(t.cached_tokens)
        if t.spec[0]:
            self.acceptance.observe(t.acceptance_length)
        if t.kv_transfer_bytes:
            self.kv_transfer.observe(t.kv_transfer_s)
            self.transfer_bytes.inc(t.kv_transfer_bytes)

    def worker_states(self) -> list[tuple[str, str, object, bool]]:
        for _ in range(3):  # the scrape runs on the HTTP server's thread while the loop may change the pools
            try:
                return list(self.workers_source())
            except RuntimeError:  # "dictionary changed size during iteration": read again
                continue
        return []


class _WorkerCollector:
    """Per-worker gauges from the statuses the router already holds (no call at scrape time)."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # collected lazily: the worker set changes while serving

    def collect(self):
        labels = ["role", "worker"]
        running = GaugeMetricFamily("tandem_worker_requests_running", "Requests running on the worker", labels=labels)
        waiting = GaugeMetricFamily(
            "tandem_worker_requests_waiting", "Requests waiting on the worker (incl. for remote KV)", labels=labels
        )
        blocks = GaugeMetricFamily(
            "tandem_worker_kv_blocks", "KV blocks by state (free includes cached-evictable)", labels=[*labels, "state"]
        )
        usage = GaugeMetricFamily("tandem_worker_kv_usage_ratio", "Used KV blocks / total", labels=labels)
        leases = GaugeMetricFamily(
            "tandem_worker_kv_leases", "Prefill: prompts whose KV waits for a pull", labels=labels
        )
        hits = GaugeMetricFamily(
            "tandem_worker_prefix_cache_hit_ratio",
            "Prompt tokens found in the worker's prefix cache / prompt tokens it was given, since start",
            labels=labels,
        )
        spec_tokens = CounterMetricFamily(
            "tandem_worker_spec_tokens",
            "Speculative decoding: tokens proposed and accepted since the worker started",
            labels=[*labels, "kind"],
        )
        spec_steps = CounterMetricFamily(
            "tandem_worker_spec_verify_steps",
            "Speculative decoding: verification steps (acceptance length = 1 + accepted / steps)",
            labels=labels,
        )
        up = GaugeMetricFamily("tandem_worker_up", "1 if the router may send the worker requests", labels=labels)
        step_model = GaugeMetricFamily(
            "tandem_worker_step_model_seconds",
            "The worker's step model refitted from its live steps after its warm-up (planner/model.py LiveFit): "
            "seconds per step (base) or per unit of each term",
            labels=[*labels, "term"],
        )
        step_steps = GaugeMetricFamily(
            "tandem_worker_step_model_steps", "Live steps behind tandem_worker_step_model_seconds", labels=labels
        )
        step_busy = GaugeMetricFamily(
            "tandem_worker_step_model_busy_neighbours",
            "Other workers of the worker's host stepping beside the steps behind tandem_worker_step_model_seconds "
            "(mean per step): the contention those steps include",
            labels=labels,
        )
        step_decode = GaugeMetricFamily(
            "tandem_worker_step_model_decode_shape",
            "The decode-only step the worker typically ran behind tandem_worker_step_model_seconds: median rows "
            "(dim=rows) and context tokens per row (dim=context); the planner compares the fit with its profile there",
            labels=[*labels, "dim"],
        )
        widened = CounterMetricFamily(
            "tandem_worker_widened_steps",
            "Steps the worker ran on cores idle or lent by other workers on its host (worker_core/core_share.py)",
            labels=labels,
        )
        lent = CounterMetricFamily(
            "tandem_worker_core_lent_seconds",
            "Seconds the worker paused between its steps so a peer's prefill could use its core",
            labels=labels,
        )
        for role, wid, s, healthy in self.metrics.worker_states():
            lv = [role, wid]
            up.add_metric(lv, 1.0 if healthy else 0.0)
            if s is None:
                continue
            running.add_metric(lv, s.running)
            waiting.add_metric(lv, s.waiting)
            blocks.add_metric([*lv, "used"], s.kv_blocks_total - s.kv_blocks_free)
            blocks.add_metric([*lv, "free"], s.kv_blocks_free)
            usage.add_metric(lv, (s.kv_blocks_total - s.kv_blocks_free) / s.kv_blocks_total if s.kv_blocks_total else 0)
            leases.add_metric(lv, s.leased)
            hits.add_metric(lv, s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0)
            spec_tokens.add_metric([*lv, "proposed"], s.spec_proposed)
            spec_tokens.add_metric([*lv, "accepted"], s.spec_accepted)
            spec_steps.add_metric(lv, s.spec_steps)
            widened.add_metric(lv, s.widened_steps)
            lent.add_metric(lv, s.lent_s)
            if len(s.live_step) == len(STEP_TERMS):
                for term, value in zip(STEP_TERMS, s.live_step, strict=True):
                    step_model.add_metric([*lv, term], value)
                step_steps.add_metric(lv, s.live_steps)
                step_busy.add_metric(lv, s.live_busy)
                if len(s.live_decode) == 2:
                    step_decode.add_metric([*lv, "rows"], s.live_decode[0])
                    step_decode.add_metric([*lv, "context"], s.live_decode[1])
        yield from (running, waiting, blocks, usage, leases, hits, spec_tokens, spec_steps, widened, lent, up)
        yield from (step_model, step_steps, step_busy, step_decode)
