"""`tandem bench` end to end.

- over tandem.v1 gRPC against a real served cluster (tiny llama, Ray, NIXL): a small sweep whose
  summary.json has the pinned schema, whose counts add up (requests the router refuses are counted
  in `failed` by status), whose requests.jsonl has a record per request, and whose plots are PNGs;
  the pools are intact afterwards;
- over HTTP against a small real OpenAI-compatible streaming server started in the test (aiohttp,
  SSE; the project has no HTTP front door yet): completions and chat, usage-based token counts,
  HTTP errors counted by status, and Ctrl-C (SIGINT to a bench process) writing what it measured;
- bad input: an unreachable target, a malformed trace line, a bad flag: a message naming it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tandem_api.bench.cli import main as bench_main
from tests.e2e.conftest import serve

REPO = Path(__file__).resolve().parents[2]
DIST_KEYS = {"mean", "std", "p50", "p90", "p95", "p99", "max"}
PINNED = {
    "completed",
    "failed",
    "duration_s",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "goodput",
    "slo_attainment",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2el_ms",
    "metadata",
}


def check_summary(out: Path, rates: list, num_requests: int) -> list[dict]:
    runs = json.loads((out / "summary.json").read_text())
    assert [r["metadata"]["request_rate"] for r in runs] == rates
    for run in runs:
        assert PINNED <= set(run)
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(run[key]) == DIST_KEYS
        assert run["completed"] + sum(run["failed"].values()) == num_requests
        meta = run["metadata"]
        assert meta["machine"]["cores"] == os.cpu_count() and meta["machine"]["cpu_model"]
        assert meta["git_commit"] and meta["seed"] == 5 and meta["dataset"]
    lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == num_requests * len(rates)
    return runs


def check_plots(out: Path, names: list[str]) -> None:
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# -- gRPC against a served cluster ------------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_grpc_sweep_against_a_served_cluster(tiny_dir, tmp_path, capsys):
    with serve(str(tiny_dir), **{"router.max_tokens": 6}) as s:
        out = tmp_path / "grpc"
        # --output-len 4 with a wide spread: some requests ask for more than router.max_tokens allows
        rc = bench_main(
            [
                "--server",
                s.address,
                "--dataset",
                "random",
                "--input-len",
                "24",
                "--output-len",
                "4",
                "--spread",
                "0.8",
                "--ignore-eos",
                "--num-requests",
                "12",
                "--request-rate",
                "40,inf",
                "--max-concurrency",
                "4",
                "--seed",
                "5",
                "--slo",
                "ttft_ms=60000,tpot_ms=60000",
                "--warmup",
                "2",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        assert rc == 0
        s.cluster.check_pools()
    runs = check_summary(out, [40.0, "inf"], 12)
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    for run in runs:
        assert run["failed"] and set(run["failed"]) == {"INVALID_ARGUMENT"}  # refused by the router's cap
        assert run["metadata"]["server"]["model_path"] == str(tiny_dir)
        assert run["metadata"]["server"]["mode"] == "disaggregated"
        assert run["metadata"]["topology"] and run["metadata"]["dtype"] == "float32"
        assert run["metadata"]["tokenizer"] == str(tiny_dir)  # read from the path the server reports
        assert run["ttft_breakdown_ms"]["prefill"] > 0
    for r in records:
        if r["status"] == "OK":
            assert r["output_tokens"] == r["expected_output_tokens"] <= 6  # --ignore-eos: exact lengths
            assert len(r["token_times_s"]) == r["output_tokens"] == sum(r["chunk_tokens"])
            assert len(r["itl_ms"]) == r["output_tokens"] - 1
            assert r["prefill_worker"] == "prefill-0" and r["route"].startswith("remote")
            assert r["server_timings"]["time_to_first_token_s"] > 0
        else:
            assert r["expected_output_tokens"] > 6 and "max_tokens" in r["error"]
    assert [r["input_tokens"] for r in records if r["rate_index"] == 0] == [
        r["input_tokens"] for r in records if r["rate_index"] == 1
    ]  # same seed: same lengths at every rate
    check_plots(out, ["latency_vs_rate.png", "goodput_vs_rate.png", "cdf.png", "ttft_breakdown.png"])
    table = capsys.readouterr().out
    assert "goodput" in table and "failed INVALID_ARGUMENT" in table


# -- a real OpenAI-compatible streaming server -----------------------------------------------------


class OpenAIServer:
    """aiohttp in a thread. Streams max_tokens tokens ("t0 ", "t1 ", ...), two per chunk when
    `pairs`, with a usage chunk when asked; answers 400 when max_tokens > `limit`; a prompt that
    contains "HANG" streams one token and then waits for the client to go away."""

    def __init__(self, limit: int = 6, pairs: bool = False) -> None:
        self.limit, self.pairs = limit, pairs
        self.bodies: list[dict] = []
        self.hanging = threading.Event()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        self._runner = web.AppRunner(app, handler_cancellation=True)  # a client that goes away cancels its stream
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        server = site._server
        assert isinstance(server, asyncio.Server)  # what TCPSite.start() made
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "tiny-test", "object": "model"}]})

    async def complete(self, request):
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        n = body["max_tokens"]
        if n > self.limit:
            return web.json_response({"error": {"message": f"max_tokens {n} > {self.limit}", "code": 400}}, status=400)
        chat = request.path.endswith("/chat/completions")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        prompt = json.dumps(body.get("messages") or body.get("prompt"))
        step = 2 if self.pairs else 1
        for k in range(0, n, step):
            text = "".join(f"t{j} " for j in range(k, min(k + step, n)))
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if "HANG" in prompt:
                self.hanging.set()
                await asyncio.Event().wait()  # until the client goes away (handler_cancellation)
            await asyncio.sleep(0.001)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 3}}
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture
def openai_server():
    server = OpenAIServer()
    yield server
    server.stop()


def test_openai_completions_count_tokens_and_http_failures(openai_server, tmp_path):
    out = tmp_path / "openai"
    rc = bench_main(
        [
            "--openai-url",
            openai_server.url,
            "--dataset",
            "random",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--spread",
            "0.8",
            "--ignore-eos",
            "--num-requests",
            "10",
            "--request-rate",
            "200",
            "--seed",
            "5",
            "--tokenizer",
            "none",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    (run,) = check_summary(out, [200.0], 10)
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert run["failed"] and set(run["failed"]) == {"HTTP_400"}
    for r in records:
        if r["status"] == "OK":
            assert r["output_tokens"] == r["expected_output_tokens"] == len(r["token_times_s"])
            assert r["cached_tokens"] == 3 and r["input_tokens"] == 11  # as the server's usage says
        else:
            assert r["expected_output_tokens"] > 6 and "max_tokens" in r["error"]
    body = openai_server.bodies[0]
    assert body["model"] == "tiny-test" and body["stream"] and body["ignore_eos"] and isinstance(body["prompt"], str)
    assert run["metadata"]["target"] == {"kind": "openai", "url": f"{openai_server.url}/completions"}
    check_plots(out, ["latency_vs_rate.png", "goodput_vs_rate.png", "cdf.png"])
    assert not (out / "ttft_breakdown.png").exists()  # an OpenAI server reports no TTFT parts


def test_openai_chat_with_multi_token_chunks(tmp_path):
    server = OpenAIServer(limit=100, pairs=True)
    try:
        out = tmp_path / "chat"
        rc = bench_main(
            [
                "--openai-url",
                f"{server.url}/chat/completions",
                "--dataset",
                "shared-prefix",
                "--num-groups",
                "2",
                "--prefix-len",
                "20",
                "--input-len",
                "8",
                "--output-len",
                "5",
                "--spread",
                "0",
                "--ignore-eos",
                "--num-requests",
                "4",
                "--seed",
                "5",
                "--output",
                str(out),
                "--no-plots",
                "--quiet",
            ]
        )
        assert rc == 0
    finally:
        server.stop()
    (run,) = check_summary(out, ["inf"], 4)
    assert run["completed"] == 4
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    for r in records:
        # 5 tokens in chunks of 2, 2, 1: usage spreads 5 over the 3 chunks (2, 2, 1); every gap is kept
        assert r["output_tokens"] == 5 and r["chunk_tokens"] == [2, 2, 1] and len(r["itl_ms"]) == 4
    roles = [[m["role"] for m in b["messages"]] for b in server.bodies]
    assert roles == [["system", "user"]] * 4
    assert len({b["messages"][0]["content"] for b in server.bodies}) <= 2  # two groups share two system prompts


def test_ctrl_c_writes_what_was_measured(openai_server, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        json.dumps({"timestamp_s": 0, "input_tokens": 5, "output_tokens": 2})
        + "\n"
        + json.dumps({"timestamp_s": 0.01, "input_tokens": 5, "output_tokens": 3})
        + "\n"
    )
    out = tmp_path / "interrupted"
    # the second request's prompt says HANG: the server streams one token and waits for the client
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_SCRIPT, openai_server.url, str(trace), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert openai_server.hanging.wait(60), proc.stderr.read() if proc.poll() is not None else "no request hung"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    (run,) = json.loads((out / "summary.json").read_text())
    assert run["metadata"]["interrupted"] is True
    assert run["completed"] == 1 and run["failed"] == {"INTERRUPTED": 1}


# The bench, with the trace's second prompt replaced by one the test server hangs on.
_HANG_SCRIPT = """
import sys
import tandem_api.bench.datasets as d
original = d.PromptMaker.make
calls = []
def make(self, n, rng):
    calls.append(n)
    p = original(self, n, rng)
    return d.Prompt(p.ids, "HANG " + p.text) if len(calls) == 2 else p
d.PromptMaker.make = make
from tandem_api.bench.cli import main
url, trace, out = sys.argv[1:]
sys.exit(main(["--openai-url", url, "--dataset", "trace", "--trace-file", trace, "--tokenizer", "none",
               "--output", out, "--no-plots", "--quiet"]))
"""


# -- bad input -------------------------------------------------------------------------------------


def test_bad_targets_and_flags_say_what_to_change(tmp_path, capsys):
    assert bench_main(["--openai-url", "http://127.0.0.1:9/v1", "--quiet"]) == 1
    assert "--openai-url http://127.0.0.1:9/v1: cannot connect" in capsys.readouterr().err
    assert bench_main(["--server", "127.0.0.1:9", "--quiet"]) == 1
    assert "--server 127.0.0.1:9: UNAVAILABLE" in capsys.readouterr().err
    bad_trace = tmp_path / "t.jsonl"
    bad_trace.write_text('{"timestamp_s": 0, "input_tokens": 3, "output_tokens": 1}\n{"timestamp_s": 1}\n')
    server = OpenAIServer()
    try:
        assert bench_main(["--openai-url", server.url, "--dataset", "trace", "--trace-file", str(bad_trace)]) == 2
        assert f"--trace-file {bad_trace} line 2: missing 'input_tokens'" in capsys.readouterr().err
    finally:
        server.stop()
    for argv, words in (
        (["--dataset", "sharegpt"], "unknown dataset 'sharegpt'"),
        (["--slo", "ttft=1"], "--slo: unknown target 'ttft'"),
        (["--request-rate", "fast"], "--request-rate: 'fast' is not a number"),
        (["--find-max-rate", "--request-rate", "1"], "--find-max-rate needs --slo"),
        (["--duration", "5"], "--duration with --request-rate inf needs"),
        (["--token-file", "/nonexistent"], "cannot read the auth token file /nonexistent"),
    ):
        assert bench_main(["--server", "127.0.0.1:9", *argv]) == 2, argv
        assert words in capsys.readouterr().err
    assert bench_main(["--quiet"]) == 2
    assert "give exactly one target" in capsys.readouterr().err


def test_find_max_rate_writes_every_probe(openai_server, tmp_path, capsys):
    out = tmp_path / "search"
    rc = bench_main(
        [
            "--openai-url",
            openai_server.url,
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--spread",
            "0",
            "--num-requests",
            "4",
            "--request-rate",
            "50",
            "--find-max-rate",
            "--slo",
            "e2el_ms=60000",
            "--search-probes",
            "3",
            "--tokenizer",
            "none",
            "--output",
            str(out),
            "--no-plots",
            "--quiet",
        ]
    )
    assert rc == 0
    search = json.loads((out / "search.json").read_text())
    assert [p["request_rate"] for p in search["probes"]] == [50.0, 100.0, 200.0]  # all pass: doubling
    assert search["max_rate"] == 200.0 and search["upper"] is None
    runs = json.loads((out / "summary.json").read_text())
    assert [r["metadata"]["request_rate"] for r in runs] == [50.0, 100.0, 200.0]
    assert "highest rate meeting e2el_ms=60000 for >= 90% of requests: 200 req/s" in capsys.readouterr().out
