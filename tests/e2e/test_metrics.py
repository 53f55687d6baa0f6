"""Prometheus metrics of the served cluster (router-aggregated, `--metrics-port`), read two ways:

- the /metrics text itself, parsed: request counts by route and status, the TTFT
  decomposition adding up to the TTFT, KV transfer bytes, per-worker KV gauges
- a real Prometheus server (Debian's package, started here) scraping the cluster:
  PromQL for TTFT p99 and KV usage returns data
No prompt text or token id appears in the exposition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import defaultdict

import grpc
import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import _free_port, serve
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.usefixtures("ray_session")

VOCAB = 512
BS = 4
SECRET = [401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412]  # must never show up in the exposition


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tiny = make_tiny_hf_model(tmp_path_factory.mktemp("metrics"), "llama", vocab_size=VOCAB)
    with serve(
        str(tiny),
        ray_namespace="tandem-metrics",
        **{"both.block_size": BS, "router.metrics_port": 0, "router.conditional_prefill_threshold": 8},
    ) as s:
        yield s


def scrape(s) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label pairs: value} from the text exposition."""
    port = s.on_router(lambda svc: svc.metrics_port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = tuple(sorted(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").split(",") if kv))
        out[name][tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    out["__text__"] = {(): text}  # type: ignore[assignment]
    return out


def total(m: dict, name: str, **labels: str) -> float:
    return sum(v for key, v in m.get(name, {}).items() if all((k, labels[k]) in key for k in labels))


def test_request_metrics_add_up(cluster):
    client = TandemClient(cluster.address)
    before = scrape(cluster)
    for i in range(3):  # remote: long new prompts
        client.complete(token_ids=SECRET + [20 + i] * 20, max_tokens=5, temperature=0.0, ignore_eos=True)
    prompt = [30 + j for j in range(33)]
    client.complete(token_ids=prompt, max_tokens=5, temperature=0.0, ignore_eos=True)
    cluster.on_router(
        lambda svc: svc.feed.wait_until(lambda: svc.router.decode.indexer.num_blocks("decode-0") >= 8, 60), timeout_s=90
    )
    client.complete(token_ids=prompt + [7, 8], max_tokens=5, temperature=0.0, ignore_eos=True)  # local: D holds it
    with pytest.raises(grpc.RpcError):
        client.complete(token_ids=[VOCAB + 1], max_tokens=2)
    after = scrape(cluster)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("gen_ai_server_time_to_first_token_seconds_count", route="remote") == 4
    assert delta("gen_ai_server_time_to_first_token_seconds_count", route="local") == 1
    assert delta("tandem_requests_total", finish_reason="length", code="OK") == 5
    assert delta("tandem_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta("tandem_routing_decisions_total", prefill="local", reason="short") == 1
    assert delta("tandem_routing_decisions_total", prefill="remote", reason="long") == 4
    assert delta("tandem_completion_tokens_total") == 25
    assert delta("tandem_kv_transfer_bytes_total") > 0 and delta("tandem_kv_transfer_seconds_count") == 4
    assert delta("tandem_inter_token_latency_seconds_count") == 5 * 4  # every token after the first
    # the decomposition adds up to the TTFT (exactly, up to float sums): queue + route + prefill + return
    parts = sum(delta("tandem_ttft_part_seconds_sum", part=p) for p in ("queue", "route", "prefill", "return"))
    ttft = delta("gen_ai_server_time_to_first_token_seconds_sum")
    assert ttft > 0 and abs(parts - ttft) <= 0.05 * ttft
    assert delta("tandem_router_decision_seconds_count") == 5
    # per worker, from the statuses the router holds
    for wid, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        assert total(after, "tandem_worker_up", worker=wid, role=role) == 1
        used = total(after, "tandem_worker_kv_blocks", worker=wid, state="used")
        free = total(after, "tandem_worker_kv_blocks", worker=wid, state="free")
        assert used + free > 0
    assert total(after, "tandem_worker_prefix_cache_hit_ratio", worker="decode-0") > 0
    text = after["__text__"][()]
    assert "401, 402" not in text and "401,402" not in text
    cluster.cluster.check_pools()


def test_a_real_prometheus_scrapes_the_cluster(cluster, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("no prometheus binary (scripts/setup.sh --test installs Debian's package where apt can)")
    client = TandemClient(cluster.address)
    metrics_port = cluster.on_router(lambda svc: svc.metrics_port)
    web = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: tandem, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for i in range(4):
            client.complete(token_ids=[50 + i] * 24, max_tokens=4, temperature=0.0, ignore_eos=True)
        queries = {
            "ttft_p99": "histogram_quantile(0.99, sum by (le) (gen_ai_server_time_to_first_token_seconds_bucket))",
            "kv_usage": "tandem_worker_kv_usage_ratio",
        }
        results = {name: _query_until(web, q, proc) for name, q in queries.items()}
        assert float(results["ttft_p99"][0]["value"][1]) > 0
        assert {r["metric"]["worker"] for r in results["kv_usage"]} == {"prefill-0", "decode-0"}
    finally:
        proc.terminate()
        proc.wait(30)


def _query_until(web_port: int, promql: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> list:
    """Ask Prometheus until the query returns data (it scrapes every second); an external process gives
    no event to wait on, so this polls its HTTP API under a deadline."""
    url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            assert proc.stderr is not None  # started with stderr=PIPE
            raise AssertionError(f"prometheus exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            if body.get("status") == "success" and body["data"]["result"]:
                return body["data"]["result"]
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"no data for {promql!r} within {timeout_s} s")
        time.sleep(0.25)
