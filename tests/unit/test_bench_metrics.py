"""`tandem bench` arithmetic against hand-computed values: percentiles, per-token ITL with multi-token
chunks, TPOT, the SLO judgement of each target, goodput and attainment, the pinned summary fields."""

from __future__ import annotations

import pytest

from tandem_api.bench.metrics import (
    RequestRecord,
    SloError,
    distribution,
    parse_slo,
    percentile,
    summarize,
    ttft_breakdown,
)


def record(send: float, chunks: list[tuple[float, int]], status: str = "OK", **kw) -> RequestRecord:
    return RequestRecord(index=0, request_id="r", arrival_s=send, send_s=send, chunks=chunks, status=status, **kw)


# A stream sent at t=1.0: token 1 at 1.5, token 2 at 1.7, tokens 3-5 in one chunk at 2.3, token 6 at 2.4.
STREAM = [(1.5, 1), (1.7, 1), (2.3, 3), (2.4, 1)]


def test_percentiles_interpolate_linearly():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d == pytest.approx(
        {"mean": 2.5, "std": 1.118033988749895, "p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97, "max": 4.0}
    )
    assert set(distribution([])) == {"mean", "std", "p50", "p90", "p95", "p99", "max"}


def test_a_multi_token_chunk_shares_its_gap_among_its_tokens():
    r = record(1.0, STREAM)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2el_s == pytest.approx(1.4)
    assert r.itl_s() == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.1])  # 0.6 s over 3 tokens: 0.2 each, none dropped
    assert r.n_output == 6
    assert r.tpot_s == pytest.approx(0.9 / 5)
    assert sum(r.itl_s()) == pytest.approx(r.e2el_s - r.ttft_s)
    assert r.token_times() == [1.5, 1.7, 2.3, 2.3, 2.3, 2.4]


def test_tokens_that_arrive_with_the_first_are_itl_zero_and_one_token_has_no_tpot():
    r = record(1.0, [(1.5, 2), (1.9, 1)])
    assert r.itl_s() == pytest.approx([0.0, 0.4])
    assert r.tpot_s == pytest.approx(0.2)
    single = record(0.0, [(0.3, 1)])
    assert single.tpot_s is None and single.itl_s() == []


def test_each_slo_target_is_judged_on_its_own():
    r = record(1.0, STREAM)  # TTFT 500 ms, TPOT 180 ms, own ITL p99 = 200 ms, E2EL 1400 ms
    assert r.meets({})
    assert r.meets({"ttft_ms": 500}) and not r.meets({"ttft_ms": 499})
    assert r.meets({"tpot_ms": 180.0001}) and not r.meets({"tpot_ms": 179})
    assert r.meets({"itl_ms": 200.0001}) and not r.meets({"itl_ms": 199})
    assert r.meets({"e2el_ms": 1400.0001}) and not r.meets({"e2el_ms": 1399})
    assert not r.meets({"ttft_ms": 1000, "tpot_ms": 100})  # every target must hold
    assert record(0.0, [(0.3, 1)]).meets({"tpot_ms": 1, "itl_ms": 1})  # cannot be judged: holds
    assert not record(0.0, [], status="UNAVAILABLE").meets({})  # a failure never meets the SLO


def test_summary_counts_goodput_and_attainment():
    a = record(1.0, STREAM, input_tokens=10, cached_tokens=4)  # meets ttft 1000 ms
    b = record(0.0, [(2.0, 1), (2.5, 1)], input_tokens=20, cached_tokens=0)  # TTFT 2000 ms: misses
    c = record(0.0, [], status="UNAVAILABLE", error="no worker")
    d = record(0.0, [], status="OK")  # an OK stream with no token is a failure too
    s = summarize([a, b, c, d], duration_s=10.0, slo={"ttft_ms": 1000})
    assert s["num_requests"] == 4 and s["completed"] == 2
    assert s["failed"] == {"EMPTY_STREAM": 1, "UNAVAILABLE": 1}
    assert s["request_throughput"] == pytest.approx(0.2)
    assert s["output_throughput"] == pytest.approx(0.8)  # 6 + 2 tokens in 10 s
    assert s["total_token_throughput"] == pytest.approx(3.8)  # + 30 prompt tokens
    assert s["goodput"] == pytest.approx(0.1) and s["slo_attainment"] == pytest.approx(0.25)
    assert s["cached_tokens"] == 4
    assert s["ttft_ms"]["p50"] == pytest.approx(1250.0)
    assert s["itl_ms"]["max"] == pytest.approx(500.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((180 + 500) / 2)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(s[key]) == {"mean", "std", "p50", "p90", "p95", "p99", "max"}
    # no SLO: every completed request counts
    assert summarize([a, b, c], 10.0, {})["goodput"] == pytest.approx(0.2)


def test_ttft_breakdown_from_server_timings():
    r = record(0.0, [(0.5, 1)], server_timings={"time_to_first_token_s": 0.45, "queue_s": 0.05, "prefill_s": 0.3})
    assert ttft_breakdown([r]) == pytest.approx(
        {"router_queue": 50.0, "prefill": 300.0, "server_other": 100.0, "client_network": 50.0}
    )
    assert ttft_breakdown([record(0.0, [(0.5, 1)])]) is None


def test_parse_slo():
    assert parse_slo("ttft_ms=500, itl_ms=50") == {"ttft_ms": 500.0, "itl_ms": 50.0}
    assert parse_slo(None) == {} and parse_slo("") == {}
    for bad, words in (
        ("ttft=5", "unknown target 'ttft'"),
        ("ttft_ms", "not KEY=VALUE"),
        ("ttft_ms=fast", "not a number"),
        ("ttft_ms=-1", "positive"),
        ("ttft_ms=1,ttft_ms=2", "given twice"),
    ):
        with pytest.raises(SloError, match=words):
            parse_slo(bad)


def test_request_json_line_has_every_token_time_and_latencies_in_ms():
    doc = record(1.0, STREAM, route="remote", prefix_group=3).to_json()
    assert doc["token_times_s"] == [1.5, 1.7, 2.3, 2.3, 2.3, 2.4]
    assert doc["chunk_tokens"] == [1, 1, 3, 1]
    assert doc["ttft_ms"] == pytest.approx(500.0) and doc["tpot_ms"] == pytest.approx(180.0)
    assert doc["itl_ms"] == pytest.approx([200.0, 200.0, 200.0, 200.0, 100.0])
    assert doc["first_token_s"] == 1.5 and doc["output_tokens"] == 6
    assert doc["route"] == "remote" and doc["prefix_group"] == 3
