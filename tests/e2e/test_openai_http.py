"""The OpenAI-compatible HTTP door against a running cluster: the official `openai` client, raw SSE bytes
through httpx, the error table with its statuses and error objects, and pools left clean.

One disaggregated cluster (1 prefill + 1 decode, tiny llama, block size 4) serves most tests; a second
one with bearer tokens, max_inflight 1 and a 1 s request deadline serves 401, 429 and 504. Tokens and
text over HTTP must equal the gRPC path's (same request path) and transformers' greedy tokens.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy

pytestmark = pytest.mark.usefixtures("ray_session")

NEW = 12
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with serve(str(tiny_dir), **{"both.block_size": 4}) as s:
        yield s


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def grpc_client(cluster):
    return TandemClient(cluster.address)


def _idle(cluster) -> None:
    """Every request ended on the router (HTTP choice tasks included) and every worker is clean."""
    assert cluster.on_router(lambda svc: svc.wait_idle(30))
    cluster.cluster.check_pools()


def _sse_events(raw: bytes) -> list[str]:
    """The data payloads of an SSE body; asserts the framing: only `data: ...` events, each ended by a
    blank line, nothing else."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    for e in events:
        assert re.fullmatch(r"data: [^\n]+", e), repr(e)
    return [e[len("data: ") :] for e in events]


# -- tokens and text ------------------------------------------------------------------------------------


def test_greedy_completion_equals_grpc_and_transformers(client, model, grpc_client, reference, cluster):
    tokenizer = cluster.on_router(lambda svc: svc.validator.tokenizer)
    for ids in ([5, 9, 33, 100, 7], list(range(3, 30))):
        want = hf_greedy(reference, ids, NEW)
        text_g, ids_g, _ = grpc_client.complete(token_ids=ids, max_tokens=NEW, temperature=0.0, ignore_eos=True)
        assert ids_g == want
        r = client.completions.create(model=model, prompt=ids, max_tokens=NEW, **GREEDY)
        assert r.choices[0].text == text_g == tokenizer.decode(want)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            len(ids),
            NEW,
            len(ids) + NEW,
        )
        assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model
        streamed = client.completions.create(model=model, prompt=ids, max_tokens=NEW, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == text_g
    _idle(cluster)


def test_chat_streaming_and_not_equal_grpc_chat(client, model, grpc_client, cluster):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    text_g, _, last = grpc_client.complete(
        chat=[(m["role"], m["content"]) for m in messages], max_tokens=NEW, temperature=0.0, ignore_eos=True
    )
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=NEW, **GREEDY)
    assert r.choices[0].message.content == text_g and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == last.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=NEW,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_g
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW  # the usage chunk, last
    assert all(c.usage is None for c in chunks[:-1])
    # content as text parts, and "developer" as a system message, render the same prompt
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        messages[1],
    ]
    r2 = client.chat.completions.create(model=model, messages=parts, max_tokens=NEW, **GREEDY)
    assert r2.choices[0].message.content == text_g
    _idle(cluster)


def test_chat_without_max_tokens_runs_to_the_context(client, model, cluster):
    """OpenAI's chat default: no max_tokens means the rest of the context (not tandem.v1's 16)."""
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], temperature=0.0, extra_body={"ignore_eos": True}
    )
    ctx = cluster.on_router(lambda svc: svc.validator.facts.max_model_len)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == ctx and r.choices[0].finish_reason == "length"
    _idle(cluster)


def test_n_choices_seeds_and_prefix_sharing(client, model, grpc_client, cluster):
    prompt = list(range(3, 40))  # 9 full blocks of 4: choices 2..n find them cached
    before = _metric(cluster, "tandem_cached_tokens_total")
    r = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=8,
        n=3,
        temperature=0.9,
        seed=5,
        extra_body={"top_k": 40, "ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:  # choice j samples as a single request seeded seed + j
        text, _, _ = grpc_client.complete(
            token_ids=prompt, max_tokens=8, temperature=0.9, seed=5 + c.index, top_k=40, ignore_eos=True
        )
        assert c.text == text
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 24
    assert _metric(cluster, "tandem_cached_tokens_total") - before >= 2 * 36  # two choices hit the first's blocks
    # several prompts x n: index = prompt * n + j, streamed
    seen: dict[int, str] = {}
    for chunk in client.completions.create(
        model=model, prompt=["one", "two words"], max_tokens=4, n=2, stream=True, **GREEDY
    ):
        for c in chunk.choices:
            seen[c.index] = seen.get(c.index, "") + c.text
    assert sorted(seen) == [0, 1, 2, 3] and seen[0] == seen[1] and seen[2] == seen[3]
    _idle(cluster)


def test_stop_logprobs_and_penalties_equal_grpc(client, model, grpc_client, cluster):
    prompt = [5, 9, 33, 100, 7, 8]
    text_g, ids_g, _ = grpc_client.complete(token_ids=prompt, max_tokens=NEW, temperature=0.0, ignore_eos=True)
    stop = text_g[3:6]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, stop=[stop], **GREEDY)
    want, _, last = grpc_client.complete(
        token_ids=prompt, max_tokens=NEW, temperature=0.0, ignore_eos=True, stop=[stop]
    )
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop" and stop not in want
    # logprobs: the gRPC path's numbers, token by token
    _, _, _ = grpc_client.complete(token_ids=prompt, max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)
    lp_g = [
        lp
        for resp in grpc_client.generate(token_ids=prompt, max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)
        for lp in resp.logprobs
    ]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=3, **GREEDY)
    got = r.choices[0].logprobs
    assert got.token_logprobs == pytest.approx([e.logprob for e in lp_g], abs=1e-6)
    assert [len(t) for t in got.top_logprobs] == [3] * 4
    assert got.text_offset[0] == 0
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    # penalties: the same numbers as tandem.v1's, and they change the output
    pen = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.8}
    text_p, _, _ = grpc_client.complete(token_ids=prompt, max_tokens=NEW, temperature=0.0, ignore_eos=True, **pen)
    r = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=NEW,
        temperature=0.0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.8},
    )
    assert r.choices[0].text == text_p != text_g
    _idle(cluster)


# -- SSE framing, byte for byte ------------------------------------------------------------------------------


def test_sse_framing_done_and_usage_only_when_asked(cluster, model):
    body = {"model": model, "prompt": "hello", "max_tokens": 5, "stream": True, "temperature": 0.0, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{cluster.http_url}/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.content)
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        docs = [json.loads(e) for e in events[:-1]]
        assert all("usage" not in d for d in docs) and all(len(d["choices"]) == 1 for d in docs)
        assert docs[-1]["choices"][0]["finish_reason"] == "length"
        assert len({d["id"] for d in docs}) == 1
        r = http.post(f"{cluster.http_url}/completions", json={**body, "stream_options": {"include_usage": True}})
        docs = [json.loads(e) for e in _sse_events(r.content)[:-1]]
        assert [d["usage"] for d in docs[:-1]] == [None] * (len(docs) - 1)
        assert docs[-1]["choices"] == [] and docs[-1]["usage"]["completion_tokens"] == 5
        assert docs[-1]["usage"]["prompt_tokens_details"] == {
            "cached_tokens": docs[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        }
    _idle(cluster)


def test_disconnect_mid_stream_frees_every_pool(cluster, model):
    body = {
        "model": model,
        "prompt": list(range(3, 40)),
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    cancelled = _metric(cluster, 'tandem_requests_total{code="CANCELLED",door="http"')
    tokens = _metric(cluster, "tandem_completion_tokens_total")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{cluster.http_url}/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
        # the connection is closed here, mid-stream
    _idle(cluster)
    assert cluster.on_router(lambda svc: svc.in_flight) == 0
    # aborted, not run to its end: counted as cancelled, far fewer than 1500 tokens made
    assert _metric(cluster, 'tandem_requests_total{code="CANCELLED",door="http"') == cancelled + 1
    assert _metric(cluster, "tandem_completion_tokens_total") - tokens < 1500


def test_disconnect_while_waiting_for_a_whole_answer_frees_every_pool(cluster, model):
    """Not streamed: the client gives up (its read timeout) while the answer is being generated."""
    body = {
        "model": model,
        "prompt": list(range(3, 40)),
        "max_tokens": 1500,
        "n": 2,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    cancelled = _metric(cluster, 'tandem_requests_total{code="CANCELLED",door="http"')
    tokens = _metric(cluster, "tandem_completion_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.http_url}/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _idle(cluster)
    assert _metric(cluster, 'tandem_requests_total{code="CANCELLED",door="http"') == cancelled + 2  # both choices
    assert _metric(cluster, "tandem_completion_tokens_total") - tokens < 3000


def test_connections_send_without_nagle(cluster, model):
    """Every accepted connection has TCP_NODELAY: with Nagle on, a kept-alive connection's first chunk
    after the headers waited for the client's delayed ACK (TTFT +40 ms, seen in benchmarks/http_overhead.py)."""
    import socket

    def nodelay(svc) -> list[int]:
        return [
            conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for conn in svc.http_server.server.server_state.connections
        ]

    with httpx.Client(timeout=30) as http:
        for _ in range(2):  # the second request reuses the connection
            assert (
                http.post(
                    f"{cluster.http_url}/completions",
                    json={"model": model, "prompt": "x", "max_tokens": 1, "stream": True},
                ).status_code
                == 200
            )
        flags = cluster.on_router(nodelay)
    assert flags and all(flags)
    _idle(cluster)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        (
            {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "tools is not supported",
        ),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "logit_bias is not supported"),
        ({"prompt": "x", "echo": True}, "echo", "echo is not supported"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "max_tokens"),
        ({}, "prompt", "prompt is required"),
        ({"prompt": "x", "temperature": -1}, None, "temperature must be >= 0"),
        ({"prompt": "x", "max_tokens": 100000}, None, "exceeds the model's context"),
        ({"prompt": [3, 99999]}, None, "outside the vocabulary"),
        ({"prompt": "x", "presence_penalty": 3}, None, "presence_penalty must be in [-2, 2]"),
        ({"prompt": "x", "n": 0}, "n", "n must be >= 1"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ],
    ids=[
        "tools",
        "logit_bias",
        "echo",
        "unknown",
        "string-int",
        "missing",
        "temperature",
        "context",
        "vocab",
        "penalty",
        "n",
        "stream_options",
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(cluster, model, body, param, fragment):
    r = httpx.post(f"{cluster.http_url}/completions", json={"model": model, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400
    assert err["param"] == param
    _idle(cluster)


def test_bad_chat_and_unknown_model(client, model, cluster):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )
    assert "text only" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[], max_tokens=3)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
        )
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert client.models.retrieve(model).id == model
    r = httpx.post(f"{cluster.http_url}/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    _idle(cluster)


def test_health_metrics_and_not_serving(cluster, client, model):
    root = cluster.http_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    client.completions.create(model=model, prompt="x", max_tokens=2)
    text = httpx.get(f"{root}/metrics").text
    assert re.search(r'tandem_requests_total\{code="OK",door="http",finish_reason="length"\} [1-9]', text)
    cluster.on_router(lambda svc: svc.set_serving(False))  # what a drain of the router does
    try:
        r = httpx.get(f"{root}/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "not serving" in e.value.body["message"]
    finally:
        cluster.on_router(lambda svc: svc.set_serving(True))
    _idle(cluster)


def _metric(cluster, name: str) -> float:
    text = httpx.get(f"{cluster.http_url.removesuffix('/v1')}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# -- a second cluster: tokens, a queue of one, a short deadline ------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# operators\nsecret-one\n")
    with serve(
        str(tiny_dir),
        mode="aggregated",
        **{"router.auth_token_file": str(tokens), "router.max_inflight": 1, "router.request_timeout_s": 1.0},
    ) as s:
        yield s


def test_bearer_token_queue_full_and_deadline(guarded):
    url = guarded.http_url
    anon = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anon.models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 200  # health needs no token
    client = openai.OpenAI(base_url=url, api_key="secret-one", max_retries=0)
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].finish_reason == "length"
    headers = {"Authorization": "Bearer secret-one"}
    long = {"model": model, "prompt": [5, 6, 7], "max_tokens": 1900, "temperature": 0.0, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=headers) as http:
        with http.stream("POST", f"{url}/completions", json={**long, "stream": True}) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # in flight: the queue of one is full
            r = http.post(f"{url}/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert (
                r.json()["error"]["type"] == "rate_limit_error"
                and "retry after 1000 ms" in r.json()["error"]["message"]
            )
            # the stream runs into the 1 s deadline: an error event, then [DONE]
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][len("data: ") :])["error"]
        assert err["code"] == 504 and "deadline" in err["message"]
        r = http.post(f"{url}/completions", json=long)  # not streamed: the status itself
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert guarded.on_router(lambda svc: svc.wait_idle(30))
    guarded.cluster.check_pools()


def test_tandem_bench_against_the_http_door(cluster, tmp_path):
    """`tandem bench --openai-url` on Tandem's own HTTP port: every request OK, exact token counts
    (from the usage chunk the bench asks for), chat and completions."""
    from tandem_api.bench.cli import main as bench_main

    for endpoint in ("completions", "chat/completions"):
        out = tmp_path / endpoint.replace("/", "-")
        rc = bench_main(
            [
                "--openai-url",
                f"{cluster.http_url}/{endpoint}",
                "--dataset",
                "random",
                "--input-len",
                "24",
                "--output-len",
                "4",
                "--spread",
                "0",
                "--ignore-eos",
                "--num-requests",
                "8",
                "--request-rate",
                "inf",
                "--max-concurrency",
                "4",
                "--seed",
                "3",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        assert rc == 0
        records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
        assert len(records) == 8 and {r["status"] for r in records} == {"OK"}
        assert all(r["output_tokens"] == 4 for r in records)
        lengths = {r["input_tokens"] for r in records}  # exact: the served tokenizer, found through /v1/models
        assert lengths == {24} if endpoint == "completions" else len(lengths) == 1 and lengths.pop() > 24  # + template
        run = json.loads((out / "summary.json").read_text())[0]
        assert run["metadata"]["tokenizer"] == cluster.on_router(lambda svc: svc.info_source().model_path)
    _idle(cluster)
