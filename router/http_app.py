"""The HTTP front door: the OpenAI API (FastAPI; router/http_server.py serves it with uvicorn on the
router's event loop), a thin adapter over the same request path as gRPC (router/request_path.py).

    POST /v1/completions, /v1/chat/completions   one GenerateRequest per choice (router/openai_protocol.py)
                                                 -> RequestPath.run -> JSON, or server-sent events
    GET  /v1/models, /v1/models/{id}             the served model
    GET  /health                                 200 while serving with a worker in every pool, else 503
    GET  /metrics                                the router's Prometheus registry (as on --metrics-port)

Statuses come from router/errors.py's OUTCOMES table (400, 401, 404, 429 with Retry-After, 503, 504,
500), with the OpenAI error object {"error": {"message", "type", "param", "code"}}; `code` is the HTTP
status, as vLLM sends it.

A request's status is decided before its first byte: the door answers once every choice started at
once is admitted, validated and routed (or one of them failed: the others are cancelled and the
failure is the answer). Later failures of a stream (a worker that fails past its retries, the
deadline) arrive as one `data: {"error": ...}` event, then `data: [DONE]`. Choices 2..n of a prompt
start once choice 1 has its first token, so their prompt is a prefix-cache hit; an admission
refusal for one of them arrives the same way, as an error event.

A client that goes away cancels every choice it asked for: the request path aborts them on their
workers and frees their KV, as for a cancelled gRPC call.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.delivery import Door, Ended
from router.errors import Outcome, RequestValidationError, one_line
from router.http_jobs import FINISH, Choice, Job
from router.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelCard
from router.request_path import RequestPath
from router.responses import ServerFacts
from tandem_api.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpError(Exception):
    """An error answered before the request path runs (auth, unknown model, a body that does not parse)."""

    def __init__(self, outcome: Outcome, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.outcome, self.message, self.param = outcome, message, param


def error_body(outcome: Outcome, message: str, param: str | None = None) -> dict:
    status = outcome.door
    return {"error": {"message": message, "type": status.openai_type, "param": param, "code": status.http_status}}


def error_response(
    outcome: Outcome, message: str, param: str | None = None, retry_after_ms: int | None = None
) -> JSONResponse:
    headers = {}
    if retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    if outcome is Outcome.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(outcome, message, param), status_code=outcome.door.http_status, headers=headers)


def _pydantic_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    """The first problem of a body that does not fit the OpenAI schema, naming the field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    # union members add their type names to the location ("prompt.str"); keep the field path only
    path = ".".join(
        x
        for x in loc
        if not x.startswith(("str", "list[", "int", "float", "bool", "ContentPart"))
        and x not in ("function-after", "tagged-union")
    )
    if err.get("type") == "extra_forbidden":
        return f"unknown field {path!r}; remove it (Tandem rejects fields it does not implement)", path or None
    if err.get("type") == "missing":
        return f"{path} is required", path or None
    return f"{path or 'body'}: {err.get('msg', 'invalid value')}", path or None


class HttpDoor:
    """The FastAPI app over a request path; `serve()` runs it with uvicorn on the running event loop."""

    def __init__(
        self,
        path: RequestPath,
        facts: Callable[[], ServerFacts],
        *,
        auth_tokens: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.membership, self.facts = path, path.membership, facts
        self.auth_tokens = frozenset(auth_tokens)
        self.clock = clock
        self.started = int(clock())
        self.tasks: set[asyncio.Task] = set()
        self._served: tuple[str, frozenset[str]] | None = None  # (model name, names a request may use)
        self.app = self._build()

    # -- the app ----------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="Tandem OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HttpError)
        async def _http_error(_request: Request, exc: HttpError) -> JSONResponse:
            self.path.metrics.requests.labels("none", exc.outcome.value, "http").inc()
            return error_response(exc.outcome, exc.message, exc.param)

        @app.exception_handler(404)
        async def _not_found(request: Request, _exc) -> JSONResponse:
            return error_response(Outcome.NOT_FOUND, f"no such endpoint: {request.method} {request.url.path}")

        @app.exception_handler(405)
        async def _bad_method(request: Request, _exc) -> JSONResponse:
            return JSONResponse(
                error_body(Outcome.INVALID_ARGUMENT, f"{request.method} is not allowed on {request.url.path}"),
                status_code=405,
            )

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            return await self._generate(request, chat=True)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            self._authorize(request)
            return JSONResponse({"object": "list", "data": [self._card().model_dump()]})

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request) -> Response:
            self._authorize(request)
            self._check_model(model_id, "model")
            return JSONResponse(self._card().model_dump())

        @app.get("/health")
        async def health() -> Response:
            why = self._unhealthy()
            if why:
                return error_response(Outcome.UNAVAILABLE, why)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.path.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app

    def _unhealthy(self) -> str:
        if not self.membership.serving:
            return "the server is not serving (workers starting, or draining)"
        for pool in self.membership.pools:
            if not pool.eligible():
                return f"no {pool.role} worker can take requests"
        return ""

    def _card(self) -> ModelCard:
        facts = self.facts()
        return ModelCard(
            id=facts.model, created=self.started, root=facts.model_path or None, max_model_len=facts.max_model_len
        )

    def _check_model(self, name: str, param: str) -> None:
        if self._served is None:  # once: ServerFacts reads package versions, milliseconds a request
            facts = self.facts()
            self._served = (facts.model, frozenset({facts.model, facts.model_path} - {""}))
        model, names = self._served
        if name not in names:
            raise HttpError(
                Outcome.NOT_FOUND,
                f"model {name!r} is not served here; this server serves {model!r} (GET /v1/models)",
                param,
            )

    def _authorize(self, request: Request) -> None:
        if not self.auth_tokens:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, t.encode()) for t in self.auth_tokens):
            raise HttpError(
                Outcome.UNAUTHENTICATED, "a valid bearer token is required (header 'Authorization: Bearer <token>')"
            )

    async def _parse(self, request: Request, chat: bool) -> CompletionRequest | ChatCompletionRequest:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(Outcome.INVALID_ARGUMENT, f"the body is not JSON: {one_line(str(exc), 200)}") from None
        if not isinstance(body, dict):
            raise HttpError(Outcome.INVALID_ARGUMENT, "the body must be a JSON object")
        try:
            return (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except pydantic.ValidationError as exc:
            message, param = _pydantic_message(exc)
            raise HttpError(Outcome.INVALID_ARGUMENT, message, param) from None

    # -- generation -------------------------------------------------------------------------------

    async def _generate(self, request: Request, chat: bool) -> Response:
        self._authorize(request)
        body = await self._parse(request, chat)
        self._check_model(body.model, "model")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            subs = body.requests(request_id)
        except RequestValidationError as exc:
            raise HttpError(Outcome.INVALID_ARGUMENT, str(exc), exc.param) from None
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        door = Door("http", f"POST {endpoint}", {"http.request.method": "POST", "url.path": endpoint})
        job = Job(self.path, subs, body.n, door, dict(request.headers), chat, self.tasks)
        failed = await job.start()
        if failed is not None:
            return error_response(failed.outcome, failed.message, retry_after_ms=failed.retry_after_ms)
        head = {"id": request_id, "created": int(self.clock()), "model": body.model}
        if body.stream:
            return StreamingResponse(
                self._stream(job, head, body, chat), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await self._complete(job, head, body, chat, request)

    async def _complete(self, job: Job, head: dict, body, chat: bool, request: Request) -> Response:
        async def collect() -> Ended | None:
            async for choice, event in job.events():
                if isinstance(event, Ended) and not event.ok:
                    return event
            return None

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        collecting, watching = asyncio.create_task(collect()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not collecting.done():  # the client went away: nobody will read the answer
                collecting.cancel()
                await job.cancel()
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)
        failed = collecting.result()
        if failed is not None:
            await job.cancel()
            return error_response(failed.outcome, failed.message, retry_after_ms=failed.retry_after_ms)
        choices = []
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            text = "".join(c.text)
            item: dict = {"index": c.index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if chat:
                item["message"] = {"role": "assistant", "content": text}
                item["logprobs"] = self._chat_logprobs(c.logprobs) if body.logprobs else None
            else:
                item["text"] = text
                item["logprobs"] = self._completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None
            choices.append(item)
        return JSONResponse(
            {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": choices,
                "usage": job.usage(),
            }
        )

    async def _stream(self, job: Job, head: dict, body, chat: bool) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = body.include_usage
        try:
            async for choice, event in job.events():
                if isinstance(event, Ended):
                    if not event.ok:
                        await job.cancel()
                        yield _sse(error_body(event.outcome, event.message))
                        break
                    continue
                item = self._chunk_choice(choice, event, body, chat)
                if item is None:
                    continue
                chunk = {**head, "object": kind, "choices": [item]}
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            else:
                if include_usage:
                    yield _sse({**head, "object": kind, "choices": [], "usage": job.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            if job.pending:  # the client went away (or a choice failed): end every choice still running
                await job.cancel()

    def _chunk_choice(self, choice: Choice, r: pb.GenerateResponse, body, chat: bool) -> dict | None:
        finish = FINISH[r.finish_reason] if r.finish_reason else None
        if not r.text and finish is None and not r.logprobs and (choice.first_sent or not chat):
            return None
        item: dict = {"index": choice.index}
        if chat:
            delta: dict = {"content": r.text}
            if not choice.first_sent:
                delta = {"role": "assistant", "content": r.text}
            item["delta"] = delta
            item["logprobs"] = self._chat_logprobs(r.logprobs) if body.logprobs else None
        else:
            item["text"] = r.text
            item["logprobs"] = (
                self._completion_logprobs(r.logprobs, choice.text_len) if body.logprobs is not None else None
            )
        choice.first_sent = True
        choice.text_len += len(r.text)
        item["finish_reason"] = finish
        if finish is not None:
            item["stop_reason"] = r.stop_reason or None
        return item

    # -- logprobs ---------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        validator = self.path.validator
        if validator is None:  # a request got this far only once the model facts were known
            raise RuntimeError("no tokenizer before the model facts are known")
        return validator.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, entries: Sequence[pb.TokenLogprob]) -> dict:
        content = []
        for e in entries:
            token = self._token(e.token_id)
            content.append(
                {
                    "token": token,
                    "logprob": e.logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": (t := self._token(x.token_id)), "logprob": x.logprob, "bytes": list(t.encode())}
                        for x in e.top
                    ],
                }
            )
        return {"content": content}

    def _completion_logprobs(self, entries: Sequence[pb.TokenLogprob], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            token = self._token(e.token_id)
            tokens.append(token)
            lps.append(e.logprob)
            tops.append({self._token(x.token_id): x.logprob for x in e.top})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # -- serving ----------------------------------------------------------------------------------

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no HTTP choice task is left (their requests ended and were cleaned up)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
            return True
        except TimeoutError:
            return False


def _sse(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
