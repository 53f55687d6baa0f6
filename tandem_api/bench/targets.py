"""Where `tandem bench` sends its load: a Tandem router (tandem.v1 gRPC) or any OpenAI-compatible server.

Both stream every request and record, per chunk, the client's arrival time and its token
count, plus what the server reports (usage, cached tokens, and on gRPC the route, the workers
and the TTFT timings). A failure is recorded, never raised: the status name (a gRPC code,
`HTTP_<code>`, `CONNECTION_ERROR`, `STREAM_ERROR`) and the server's message.

OpenAI streams carry text, not tokens. Each chunk with text counts as one token; when the
server reports usage (`stream_options.include_usage`), its completion token count is spread
evenly over the chunks instead (the first chunks take the remainder), so the totals are exact
and no gap is dropped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from tandem_api.bench.metrics import OK, RequestRecord

Clock = Callable[[], float]
CONNECT_TIMEOUT_S = 10.0


class TargetError(RuntimeError):
    """The target cannot be used at all (unreachable, not the expected API); the message says which flag."""


@dataclass
class WireRequest:
    request_id: str
    ids: Sequence[int] | None  # exact token ids of the prompt, when known
    text: str  # the prompt as text
    messages: list[dict[str, str]] | None  # the same prompt as chat messages (shared-prefix, multi-turn)
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0


@dataclass
class Reply:
    ids: list[int] | None
    text: str


class Target(Protocol):
    kind: str
    description: str

    async def open(self) -> dict[str, Any]: ...  # what the server says about itself (metadata)
    async def send(self, request: WireRequest, record: RequestRecord, clock: Clock) -> Reply: ...
    async def close(self) -> None: ...


# -- tandem.v1 gRPC ----------------------------------------------------------------------------------


class GrpcTarget:
    """A Tandem router. `chat=True` sends chat messages (rendered by the server's template) where the
    dataset has them; otherwise token ids when known (exact lengths), else text."""

    kind = "grpc"

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        tls: bool = False,
        chat: bool = False,
        request_timeout_s: float | None = None,
    ) -> None:
        self.address = address
        self.description = f"grpc://{address}"
        self.chat = chat
        self.request_timeout_s = request_timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._tls = (tls_ca, tls_cert, tls_key) if (tls or tls_ca or tls_cert) else None
        self._channel = None
        self._stub: Any = None  # pb_grpc.GenerationStub once started

    async def open(self) -> dict[str, Any]:
        import grpc

        from tandem_api.v1 import generation_pb2 as pb
        from tandem_api.v1 import generation_pb2_grpc as pb_grpc

        options = [("grpc.max_receive_message_length", 64 << 20)]
        if self._tls is not None:
            ca, cert, key = self._tls
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        try:
            info = await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=CONNECT_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            await self.close()
            raise TargetError(f"--server {self.address}: {e.code().name}: {e.details()}") from None
        workers = [
            {
                "id": w.worker_id,
                "role": w.role,
                "health": w.health,
                "device": w.device,
                "dtype": w.dtype,
                "block_size": w.block_size,
                "kv_blocks_total": w.kv_blocks_total,
                "node_id": w.node_id,
            }
            for w in info.workers
        ]
        return {
            "model": info.model,
            "model_path": info.model_path,
            "model_fingerprint": info.model_fingerprint,
            "mode": info.mode,
            "topology": info.topology,
            "server_version": info.version,
            "kv_transport": info.kv_transport,
            "max_model_len": info.max_model_len,
            "vocab_size": info.vocab_size,
            "dtype": ",".join(sorted({w["dtype"] for w in workers})) or None,
            "device": ",".join(sorted({w["device"] for w in workers})) or None,
            "versions": dict(info.versions),
            "workers": workers,
        }

    async def send(self, request: WireRequest, record: RequestRecord, clock: Clock) -> Reply:
        import grpc

        from tandem_api.client import build_request

        if self.chat and request.messages is not None:
            source: dict[str, Any] = {"chat": request.messages}
        elif request.ids is not None:
            source = {"token_ids": list(request.ids)}
        else:
            source = {"prompt": request.text}
        message = build_request(
            **source,
            request_id=request.request_id,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            ignore_eos=request.ignore_eos,
        )
        ids: list[int] = []
        texts: list[str] = []
        record.send_s = clock()
        call = self._stub.Generate(message, timeout=self.request_timeout_s, metadata=self._metadata)
        try:
            first = True
            async for response in call:
                now = clock()
                if first:
                    record.route, record.prefill_worker = response.route, response.prefill_worker
                    record.decode_worker = response.decode_worker
                    first = False
                if response.token_ids:
                    record.chunks.append((now, len(response.token_ids)))
                    ids.extend(response.token_ids)
                    texts.append(response.text)
                if response.HasField("usage"):
                    record.input_tokens = response.usage.prompt_tokens
                    record.output_tokens = response.usage.completion_tokens
                    record.cached_tokens = response.usage.cached_tokens
                    t = response.timings
                    record.server_timings = {
                        "time_to_first_token_s": t.time_to_first_token_s,
                        "total_s": t.total_s,
                        "queue_s": t.queue_s,
                        "prefill_s": t.prefill_s,
                        "kv_transfer_s": t.kv_transfer_s,
                    }
                    record.retries = response.retries
            record.status = OK
        except grpc.aio.AioRpcError as e:
            record.status, record.error = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            call.cancel()
            raise
        return Reply(ids, "".join(texts))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# -- OpenAI-compatible HTTP ----------------------------------------------------------------------------


def split_openai_url(url: str, endpoint: str | None) -> tuple[str, str]:
    """(base URL up to /v1, "completions" | "chat") from --openai-url and --openai-endpoint."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TargetError(f"--openai-url {url!r}: expected http(s)://HOST:PORT[/v1[/completions|/chat/completions]]")
    path = parts.path.rstrip("/")
    found = None
    for suffix, kind in (("/chat/completions", "chat"), ("/completions", "completions")):
        if path.endswith(suffix):
            path, found = path[: -len(suffix)], kind
            break
    if not path.endswith("/v1"):
        path += "/v1"
    if endpoint is not None and found is not None and endpoint != found:
        raise TargetError(f"--openai-endpoint {endpoint} contradicts --openai-url {url} (a {found} endpoint)")
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")), endpoint or found or "completions"


class OpenAITarget:
    """Any server of the OpenAI API with SSE streaming (vLLM, SGLang, Tandem's HTTP port, ...)."""

    kind = "openai"

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        endpoint: str | None = None,
        api_key: str | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.base, self.endpoint = split_openai_url(url, endpoint)
        self.description = f"{self.base}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"
        self.model = model
        self.request_timeout_s = request_timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: Any = None  # aiohttp.ClientSession once started

    async def open(self) -> dict[str, Any]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers=self._headers, connector=aiohttp.TCPConnector(limit=0)
        )
        try:
            async with self._session.get(
                f"{self.base}/models", timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
            ) as response:
                body = await response.text()
                if response.status != 200:
                    raise TargetError(f"--openai-url {self.base}/models answered HTTP {response.status}: {body[:200]}")
                cards = [m for m in json.loads(body).get("data", []) if isinstance(m, dict)]
                models = [m.get("id") for m in cards]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            await self.close()
            raise TargetError(f"--openai-url {self.base}: cannot connect ({type(e).__name__}: {e})") from None
        except (json.JSONDecodeError, AttributeError):
            await self.close()
            raise TargetError(f"--openai-url {self.base}/models did not answer an OpenAI model list") from None
        except TargetError:
            await self.close()
            raise
        if self.model is None:
            if not models:
                await self.close()
                raise TargetError(f"--openai-url {self.base} lists no model; name one with --openai-model")
            self.model = models[0]
        info = {"model": self.model, "models": models, "endpoint": self.endpoint}
        root = next((m.get("root") for m in cards if m.get("id") == self.model), None)
        if isinstance(root, str) and root:  # vLLM and Tandem name the model's path: --tokenizer auto uses it
            info["model_path"] = root
        return info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _payload(self, request: WireRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": request.ignore_eos,
        }
        if self.endpoint == "chat":
            payload["messages"] = request.messages or [{"role": "user", "content": request.text}]
        else:
            payload["prompt"] = request.text
        return payload

    async def send(self, request: WireRequest, record: RequestRecord, clock: Clock) -> Reply:
        import aiohttp

        path = "chat/completions" if self.endpoint == "chat" else "completions"
        texts: list[str] = []
        record.send_s = clock()
        try:
            async with self._session.post(f"{self.base}/{path}", json=self._payload(request)) as response:
                if response.status != 200:
                    record.status = f"HTTP_{response.status}"
                    record.error = (await response.text())[:500]
                    return Reply(None, "")
                record.status = await self._read_stream(response, record, texts, clock)
        except (aiohttp.ClientError, OSError) as e:
            record.status, record.error = "CONNECTION_ERROR", f"{type(e).__name__}: {e}"
        except asyncio.TimeoutError:
            record.status, record.error = "DEADLINE_EXCEEDED", f"no answer within {self.request_timeout_s} s"
        _spread_tokens(record)
        return Reply(None, "".join(texts))

    async def _read_stream(self, response: Any, record: RequestRecord, texts: list[str], clock: Clock) -> str:
        done = False
        async for raw in response.content:  # one SSE line at a time
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = clock()
            try:
                doc = json.loads(data)
            except json.JSONDecodeError:
                record.error = f"not JSON: {data[:200]}"
                return "STREAM_ERROR"
            if "error" in doc:
                record.error = json.dumps(doc["error"])[:500]
                return "STREAM_ERROR"
            for choice in doc.get("choices") or []:
                text = (
                    choice.get("text") if self.endpoint == "completions" else (choice.get("delta") or {}).get("content")
                )
                if text:
                    record.chunks.append((now, 1))
                    texts.append(text)
            usage = doc.get("usage")
            if usage:
                record.input_tokens = usage.get("prompt_tokens") or record.input_tokens
                record.output_tokens = usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    record.cached_tokens = details["cached_tokens"]
        if not done:
            record.error = "the stream ended without data: [DONE]"
            return "STREAM_ERROR"
        return OK


def _spread_tokens(record: RequestRecord) -> None:
    """Spread the server's completion token count over the text chunks (see the module docstring)."""
    total, m = record.output_tokens, len(record.chunks)
    if not m or total is None or total == m or total < m:
        if m and total is not None and total < m:
            record.output_tokens = m  # a server that under-reports: the chunks are the evidence
        return
    base, extra = divmod(total, m)
    record.chunks = [(t, base + (1 if i < extra else 0)) for i, (t, _) in enumerate(record.chunks)]
