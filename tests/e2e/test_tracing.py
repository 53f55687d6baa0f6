"""One OpenTelemetry trace per request across router, prefill, KV transfer and decode (real Ray, NIXL, gRPC).

Every process of the cluster exports to its in-memory exporter (`tracing.exporter: memory`);
the test gathers the router's spans and each worker's (`finished_spans` over Ray), and
checks that a request sent with a gateway `traceparent` yields one trace under it, with
the parent/child links and the attributes the issue names, and that no span carries
prompt text or token ids.
"""

from __future__ import annotations

import grpc
import pytest

from common import telemetry as tm
from tandem_api.v1 import generation_pb2 as pb
from tandem_api.v1 import generation_pb2_grpc as pb_grpc
from tests.e2e.conftest import serve
from tests.helpers.tiny_models import make_tiny_hf_model
from worker_core.spans import span_dicts

pytestmark = pytest.mark.usefixtures("ray_session")

GATEWAY_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY_SPAN = "00f067aa0ba902b7"
PROMPT = "xyzzy plugh secret prompt text that must never reach a span"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tiny = make_tiny_hf_model(tmp_path_factory.mktemp("tracing"), "llama", vocab_size=512)
    with serve(str(tiny), ray_namespace="tandem-tracing", **{"both.block_size": 4, "tracing.exporter": "memory"}) as s:
        yield s


def all_spans(s) -> list[dict]:
    import ray

    spans = s.on_router(lambda svc: span_dicts(svc.tracing.finished_spans()))
    for h in s.cluster.workers:
        spans += ray.get(h.actor.finished_spans.remote())
    return spans


def test_one_trace_per_request_across_every_process(cluster, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="router")  # every routing decision, every request log line
    caplog.set_level(logging.DEBUG, logger="deploy")
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        request = pb.GenerateRequest(
            prompt=PROMPT, sampling=pb.SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)
        )
        traceparent = f"00-{GATEWAY_TRACE}-{GATEWAY_SPAN}-01"
        responses = list(stub.Generate(request, metadata=(("traceparent", traceparent),), timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 6

    spans = [sp for sp in all_spans(cluster) if sp["trace_id"] == GATEWAY_TRACE]
    by_name: dict[str, list[dict]] = {}
    for sp in spans:
        by_name.setdefault(sp["name"], []).append(sp)
    want = {
        tm.SPAN_GENERATE,
        tm.SPAN_VALIDATE,
        tm.SPAN_ROUTE,
        tm.SPAN_PREFILL,
        tm.SPAN_PREFILL_WORKER,
        tm.SPAN_ENGINE_QUEUE,
        tm.SPAN_ENGINE_COMPUTE,
        tm.SPAN_DECODE,
        tm.SPAN_DECODE_WORKER,
        tm.SPAN_DECODE_ADMISSION,
        tm.SPAN_KV_TRANSFER,
        tm.SPAN_DECODE_FIRST_STEP,
    }
    assert want <= set(by_name), f"missing spans: {want - set(by_name)}"
    one = {name: by_name[name][0] for name in want}
    assert all(len(by_name[name]) == 1 for name in want), {n: len(v) for n, v in by_name.items()}

    def parent(child: str, of: str) -> None:
        assert one[child]["parent_id"] == one[of]["span_id"], f"{child} is not a child of {of}"

    assert one[tm.SPAN_GENERATE]["parent_id"] == GATEWAY_SPAN  # continued from the gateway
    for child in (tm.SPAN_VALIDATE, tm.SPAN_ROUTE, tm.SPAN_PREFILL, tm.SPAN_DECODE):
        parent(child, tm.SPAN_GENERATE)
    parent(tm.SPAN_PREFILL_WORKER, tm.SPAN_PREFILL)  # across the Ray call to the prefill actor
    parent(tm.SPAN_ENGINE_QUEUE, tm.SPAN_PREFILL_WORKER)
    parent(tm.SPAN_ENGINE_COMPUTE, tm.SPAN_PREFILL_WORKER)
    parent(tm.SPAN_DECODE_WORKER, tm.SPAN_DECODE)  # across the Ray call to the decode actor
    parent(tm.SPAN_DECODE_ADMISSION, tm.SPAN_DECODE_WORKER)
    parent(tm.SPAN_KV_TRANSFER, tm.SPAN_DECODE_WORKER)
    parent(tm.SPAN_DECODE_FIRST_STEP, tm.SPAN_DECODE_WORKER)
    assert one[tm.SPAN_KV_TRANSFER]["end"] <= one[tm.SPAN_DECODE_FIRST_STEP]["start"] + 1_000_000
    # the transfer parameters carried P's span: the pull links to it
    assert one[tm.SPAN_PREFILL_WORKER]["span_id"] in one[tm.SPAN_KV_TRANSFER]["links"]

    route = one[tm.SPAN_ROUTE]["attributes"]
    assert route[tm.ATTR_PREFILL_WORKER] == "prefill-0" and route[tm.ATTR_DECODE_WORKER] == "decode-0"
    assert route[tm.ATTR_ROUTE_REASON].startswith("remote: ")
    assert route[tm.ATTR_ROUTE_KIND] in ("disabled", "slo_remote")  # placement by SLO once the step models are ready
    assert tm.ATTR_PREFILL_CACHED_BLOCKS in route and tm.ATTR_DECODE_CACHED_BLOCKS in route
    kv = one[tm.SPAN_KV_TRANSFER]["attributes"]
    assert kv[tm.ATTR_KV_BYTES] > 0 and kv[tm.ATTR_KV_BLOCKS] > 0 and kv[tm.ATTR_KV_GBPS] > 0
    assert kv[tm.ATTR_KV_TRANSPORT] == "nixl/UCX"
    gen = one[tm.SPAN_GENERATE]
    assert gen["attributes"][tm.ATTR_OUTPUT_TOKENS] == 6 and gen["attributes"][tm.ATTR_RPC_STATUS] == "OK"
    assert list(gen["attributes"][tm.ATTR_FINISH_REASONS]) == ["length"] and tm.EVENT_FIRST_TOKEN in gen["events"]
    assert gen["attributes"][tm.ATTR_INPUT_TOKENS] == responses[-1].usage.prompt_tokens
    dec = one[tm.SPAN_DECODE_WORKER]["attributes"]
    assert dec[tm.ATTR_OUTPUT_TOKENS] == 6 and list(dec[tm.ATTR_FINISH_REASONS]) == ["length"]
    # engine timings nest inside the worker span, in order
    q, c, w = one[tm.SPAN_ENGINE_QUEUE], one[tm.SPAN_ENGINE_COMPUTE], one[tm.SPAN_PREFILL_WORKER]
    assert w["start"] <= q["start"] <= q["end"] <= c["start"] + 1_000_000 and c["end"] <= w["end"] + 1_000_000

    # no prompt text, no token ids, anywhere in any span or router log line
    text = repr(spans)
    assert "xyzzy" not in text and "plugh" not in text
    assert any("router.decisions" == r.name for r in caplog.records)  # the decision log did run
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "xyzzy" not in logged and "plugh" not in logged
    ids = [t for r in responses for t in r.token_ids]
    for sp in spans:
        for value in sp["attributes"].values():
            assert not (isinstance(value, (list, tuple)) and len(value) > 1 and list(value) == ids[: len(value)])
    cluster.cluster.check_pools()


def test_without_a_traceparent_each_request_starts_its_own_trace(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for _ in range(2):
            list(
                stub.Generate(
                    pb.GenerateRequest(prompt="hello there", sampling=pb.SamplingOptions(max_tokens=2)), timeout=60
                )
            )
    roots = [sp for sp in all_spans(cluster) if sp["name"] == tm.SPAN_GENERATE and sp["parent_id"] is None]
    assert len({sp["trace_id"] for sp in roots}) == len(roots) >= 2
    cluster.cluster.check_pools()


def test_otlp_export_from_every_process_reaches_a_real_receiver(tmp_path_factory):
    """The served cluster (router and both workers, each its own process) exporting OTLP/gRPC to a receiver
    on loopback: one request's spans arrive from all three services under one trace."""
    from tests.helpers.otlp_receiver import OtlpReceiver

    tiny = make_tiny_hf_model(tmp_path_factory.mktemp("otlp"), "llama", vocab_size=512)
    with OtlpReceiver() as receiver:
        with serve(
            str(tiny),
            ray_namespace="tandem-otlp",
            **{"both.block_size": 4, "tracing.exporter": "otlp", "tracing.endpoint": receiver.url},
        ) as s:
            with grpc.insecure_channel(s.address) as ch:
                list(
                    pb_grpc.GenerationStub(ch).Generate(
                        pb.GenerateRequest(prompt="hello", sampling=pb.SamplingOptions(max_tokens=3)),
                        metadata=(("traceparent", f"00-{GATEWAY_TRACE}-{GATEWAY_SPAN}-01"),),
                        timeout=60,
                    )
                )
        # stopping the cluster flushed every process's batch exporter
        spans = [sp for sp in receiver.spans if f"{sp.trace_id:032x}" == GATEWAY_TRACE]
    services = {sp.resource.get("service.name") for sp in spans}
    assert services == {"tandem-router", "tandem-prefill", "tandem-decode"}, services
    names = {sp.name for sp in spans}
    assert {tm.SPAN_GENERATE, tm.SPAN_PREFILL_WORKER, tm.SPAN_KV_TRANSFER, tm.SPAN_DECODE_WORKER} <= names


def test_http_door_continues_the_traceparent_header(cluster):
    """The OpenAI door: one trace under the gateway's traceparent, the same router and worker spans as
    gRPC's, its SERVER span named for the endpoint."""
    import httpx

    trace_id, span_id = "5" * 32, "6" * 16
    model = httpx.get(f"{cluster.http_url}/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(
        f"{cluster.http_url}/completions",
        timeout=60,
        headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
        json={"model": model, "prompt": "hello there", "max_tokens": 4, "ignore_eos": True},
    )
    assert r.status_code == 200
    spans = {sp["name"]: sp for sp in all_spans(cluster) if sp["trace_id"] == trace_id}
    root = spans["POST /v1/completions"]
    assert root["parent_id"] == span_id and root["attributes"][tm.ATTR_RPC_STATUS] == "OK"
    assert root["attributes"][tm.ATTR_OUTPUT_TOKENS] == 4
    for name in (tm.SPAN_VALIDATE, tm.SPAN_ROUTE, tm.SPAN_PREFILL, tm.SPAN_DECODE):
        assert spans[name]["parent_id"] == root["span_id"]
    assert {tm.SPAN_PREFILL_WORKER, tm.SPAN_DECODE_WORKER, tm.SPAN_KV_TRANSFER} <= set(spans)
    assert tm.SPAN_GENERATE not in spans
    cluster.cluster.check_pools()
