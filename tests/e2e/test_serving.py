"""The served cluster through real gRPC, real Ray actors and real NIXL (tiny random model).

Disaggregated (1 prefill + 1 decode actor, KV pulled over NIXL/UCX) and aggregated
(2 actors doing both phases) clusters serve the same tiny llama. Greedy tokens of
both must equal transformers on the same weights; 32 concurrent streams all
finish correctly; cancel and deadline leave both pools intact. Every test that
sends traffic ends with `check_pools()` (idle, integrity, no leaked block or lease).
"""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from tandem_api.client import TandemClient
from tandem_api.v1 import generation_pb2 as pb
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
NEW = 12


@pytest.fixture(scope="module")
def disagg(tiny_dir):
    with serve(str(tiny_dir), **{"both.block_size": 4}) as s:
        yield s


@pytest.fixture(scope="module")
def agg(tiny_dir):
    with serve(str(tiny_dir), mode="aggregated", **{"both.block_size": 4, "router.max_inflight": 1}) as s:
        yield s


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def _greedy(client: TandemClient, ids: list[int], n: int = NEW, **kw) -> tuple[list[int], object]:
    _, tokens, last = client.complete(token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return tokens, last


def test_disaggregated_equals_aggregated_equals_transformers(disagg, agg, reference):
    d, a = TandemClient(disagg.address), TandemClient(agg.address)
    pulls = []
    for ids in _prompts(4) + [list(range(3, 19))]:  # the last one: exactly 4 full blocks
        want = hf_greedy(reference, ids, NEW)
        got_d, last = _greedy(d, ids)
        got_a, last_a = _greedy(a, ids)
        assert got_d == want and got_a == want
        assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == NEW
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last_a.timings.kv_transfer_s == 0.0
        pulls.append(last.timings.kv_transfer_s)
    assert all(p > 0 for p in pulls)  # every prompt's KV really moved P -> D
    disagg.cluster.check_pools()
    agg.cluster.check_pools()
    # the start-up check: one host, so UCX stays on loopback and host memory moves by cma
    host = disagg.cluster.kv_routes[0].split("same host ")[1].split(",")[0]
    assert disagg.cluster.kv_routes == [f"prefill-0 -> decode-0: same host {host}, DRAM->DRAM by cma / shared memory"]
    assert agg.cluster.kv_routes == []


def test_text_chat_stop_and_seeded_sampling_match_between_modes(disagg, agg):
    d, a = TandemClient(disagg.address), TandemClient(agg.address)
    for kw in (
        dict(prompt="The quick brown fox", max_tokens=10, temperature=0.0),
        dict(chat=[("user", "hi there")], max_tokens=10, temperature=0.0),
        dict(prompt="abc", max_tokens=10, temperature=0.8, top_k=40, seed=11, ignore_eos=True),
        dict(prompt="abc", max_tokens=1, temperature=0.0),  # token 1 ends it on the prefill worker
    ):
        text_d, ids_d, last_d = d.complete(**kw)
        text_a, ids_a, last_a = a.complete(**kw)
        assert (text_d, ids_d) == (text_a, ids_a)
        assert last_d.finish_reason == last_a.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    first = next(iter(d.generate(prompt="xyz", max_tokens=3, temperature=0.0, ignore_eos=True)))
    assert first.prefill_worker == "prefill-0" and first.decode_worker == "decode-0"
    disagg.cluster.check_pools()
    agg.cluster.check_pools()


def test_32_concurrent_streams_all_complete_correctly(disagg, reference):
    prompts = _prompts(32, seed=5)
    want = [hf_greedy(reference, ids, NEW) for ids in prompts]
    got: list = [None] * len(prompts)
    client = TandemClient(disagg.address)

    def run(i: int) -> None:
        got[i] = _greedy(client, prompts[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    disagg.cluster.check_pools()


def test_cancelled_stream_leaves_both_pools_intact(disagg):
    client = TandemClient(disagg.address)
    stream = client.generate(token_ids=list(range(3, 40)), max_tokens=1500, temperature=0.0, ignore_eos=True)
    next(stream), next(stream)  # token 1 from prefill, then decode is streaming
    stream.close()  # cancels the call
    disagg.cluster.check_pools()


def test_deadline_exceeded_leaves_both_pools_intact(disagg):
    client = TandemClient(disagg.address)
    with pytest.raises(grpc.RpcError) as e:
        client.complete(token_ids=list(range(3, 40)), max_tokens=1500, temperature=0.0, ignore_eos=True, timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    disagg.cluster.check_pools()


def test_queue_full_is_resource_exhausted(agg):
    client = TandemClient(agg.address)
    stream = iter(client.generate(token_ids=[5, 6, 7], max_tokens=1500, temperature=0.0, ignore_eos=True))
    next(stream)  # in flight: the router's limit (max_inflight=1) is reached
    with pytest.raises(grpc.RpcError) as e:
        client.complete(prompt="hello", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after 1000 ms" in e.value.details()
    assert ("grpc-retry-pushback-ms", "1000") in tuple(e.value.trailing_metadata())  # gRPC's back-off hint
    stream.close()
    agg.cluster.check_pools()


BAD_INPUT = [
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(prompt=""), "empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[VOCAB + 5])), "vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "vocabulary"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])), "role"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=10**6)), "max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(temperature=-1)), "temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(top_p=0)), "top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(top_k=-2)), "top_k"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(min_p=2)), "min_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(logprobs=-1)), "logprobs"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(stop_token_ids=[VOCAB * 2])), "stop_token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 3000)), "context"),
]


def test_bad_input_is_invalid_argument_and_loses_nothing(disagg):
    from tandem_api.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(disagg.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for request, fragment in BAD_INPUT:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, e.value.details())
            assert fragment in e.value.details().lower(), (fragment, e.value.details())
            assert "Traceback" not in e.value.details()
    disagg.cluster.check_pools()


def test_health_reflection_and_server_info(disagg):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(disagg.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "tandem.v1.Generation"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"tandem.v1.Generation", "grpc.health.v1.Health"} <= names
    info = TandemClient(disagg.address).server_info()
    assert info.mode == "disaggregated" and info.api_version == "tandem.v1" and info.kv_transport == "nixl"
    assert info.vocab_size == VOCAB and info.topology.startswith("1P")
    roles = sorted((w.role, w.health) for w in info.workers)
    assert roles == [("decode", "SERVING"), ("prefill", "SERVING")]
    for w in info.workers:
        assert w.kv_blocks_total > 0 and w.kv_blocks_free == w.kv_blocks_total and w.block_size == 4
