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
from dataclasses import dataclass, field

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.errors import Outcome, RequestValidationError, one_line
from router.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelCard
from router.request_path import Door, Ended, RequestPath
from router.responses import FINISH_REASONS, ServerFacts
from tandem_api.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

FINISH = {code: name for name, code in FINISH_REASONS.items()}  # tandem.v1 finish reason -> OpenAI's
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


@dataclass
class _Choice:
    """What one choice has produced so far (for the non-streaming answer, usage and logprobs offsets)."""

    index: int
    group: int  # the prompt it belongs to (usage counts a prompt once, whatever n)
    text: list[str] = field(default_factory=list)
    text_len: int = 0
    first_sent: bool = False
    finish_reason: str | None = None
    stop_reason: str | None = None
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    usage: pb.Usage | None = None
    ended: Ended | None = None


class _Job:
    """The choices of one HTTP request, running on the request path; events arrive on one queue."""

    def __init__(
        self,
        path: RequestPath,
        subs: Sequence[tuple[int, pb.GenerateRequest]],
        n: int,
        door: Door,
        carrier,
        chat: bool,
        tasks: set[asyncio.Task],
    ) -> None:
        self.path, self.door, self.carrier, self.chat = path, door, carrier, chat
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = {index: _Choice(index, index // n) for index, _ in subs}
        self.subs, self.n = subs, n
        self.tasks: list[asyncio.Task] = []
        self._all_tasks = tasks  # the door's: keeps each task referenced until it is done
        self.pending = len(subs)

    async def start(self) -> Ended | None:
        """Start every choice that does not wait for another; None once each of them is routed, else the
        first failure (the others are cancelled)."""
        gates: dict[int, asyncio.Future] = {}
        firsts: dict[int, asyncio.Event] = {}
        loop = asyncio.get_running_loop()
        for index, request in self.subs:
            group, j = divmod(index, self.n)
            if j == 0:
                firsts[group] = asyncio.Event()
                gates[index] = loop.create_future()
            after = firsts[group] if j > 0 else None
            self._spawn(index, request, gates.get(index), firsts[group] if j == 0 else None, after)
        for index, gate in gates.items():
            ended = await gate
            if ended is not None and not ended.ok:
                await self.cancel()
                return ended
        return None

    def _spawn(
        self,
        index: int,
        request: pb.GenerateRequest,
        gate: asyncio.Future | None,
        first: asyncio.Event | None,
        after: asyncio.Event | None,
    ) -> None:
        def routed() -> None:
            if gate is not None and not gate.done():
                gate.set_result(None)

        async def emit(response: pb.GenerateResponse) -> None:
            if first is not None:
                first.set()
            self.queue.put_nowait((index, response))

        async def one() -> None:
            ended = Ended(Outcome.CANCELLED, "cancelled")
            try:
                if after is not None:
                    await after.wait()
                ended = await self.path.run(
                    request, emit, carrier=self.carrier, door=self.door, fill_max_tokens=self.chat, on_routed=routed
                )
            finally:
                if gate is not None and not gate.done():
                    gate.set_result(ended)
                if first is not None:
                    first.set()  # an ended first choice lets the others go (they will fail or run alone)
                self.queue.put_nowait((index, ended))

        task = asyncio.create_task(one(), name=f"http-{request.request_id}")
        self.tasks.append(task)
        self._all_tasks.add(task)
        task.add_done_callback(self._all_tasks.discard)

    async def events(self) -> AsyncIterator[tuple[_Choice, pb.GenerateResponse | Ended]]:
        """Every response and every end, in arrival order, until each choice has ended."""
        while self.pending:
            index, event = await self.queue.get()
            choice = self.choices[index]
            if isinstance(event, Ended):
                self.pending -= 1
                choice.ended = event
            else:
                self._record(choice, event)
            yield choice, event

    def _record(self, choice: _Choice, r: pb.GenerateResponse) -> None:
        if r.text:
            choice.text.append(r.text)
        choice.logprobs.extend(r.logprobs)
        if r.finish_reason:
            choice.finish_reason = FINISH[r.finish_reason]
            choice.stop_reason = r.stop_reason or None
        if r.HasField("usage"):
            choice.usage = r.usage

    async def cancel(self) -> None:
        """Cancel every choice still running and wait for each to end (the path cleans up on cancel)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def usage(self) -> dict:
        prompt = cached = completion = steps = proposed = accepted = 0
        for c in self.choices.values():
            if c.usage is None:
                continue
            completion += c.usage.completion_tokens
            steps += c.usage.spec_verify_steps
            proposed += c.usage.spec_proposed_tokens
            accepted += c.usage.spec_accepted_tokens
            if c.index % self.n == 0:  # a prompt counts once, whatever n; its cache hit is the first choice's
                prompt += c.usage.prompt_tokens
                cached += c.usage.cached_tokens
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if steps:  # speculative decoding: OpenAI's prediction counters, and tokens per verification step
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": proposed - accepted,
            }
            usage["acceptance_length"] = round(1.0 + accepted / steps, 4)
        return usage


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
        job = _Job(self.path, subs, body.n, door, dict(request.headers), chat, self.tasks)
        failed = await job.start()
        if failed is not None:
            return error_response(failed.outcome, failed.message, retry_after_ms=failed.retry_after_ms)
        head = {"id": request_id, "created": int(self.clock()), "model": body.model}
        if body.stream:
            return StreamingResponse(
                self._stream(job, head, body, chat), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await self._complete(job, head, body, chat, request)

    async def _complete(self, job: _Job, head: dict, body, chat: bool, request: Request) -> Response:
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

    async def _stream(self, job: _Job, head: dict, body, chat: bool) -> AsyncIterator[bytes]:
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

    def _chunk_choice(self, choice: _Choice, r: pb.GenerateResponse, body, chat: bool) -> dict | None:
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
