"""One OpenAI request as request-path runs: its choices (n per prompt), started together, collected
together (router/http_app.py answers with them).

`Job.start()` starts the first choice of every prompt at once and returns when all are admitted and
routed (or one failed: then the others are cancelled); choices 2..n of a prompt start once choice 1
has its first token, so their prompt is a prefix-cache hit. `Job.events()` yields every choice's
responses as they come; `Job.usage()` sums them the OpenAI way (a prompt counts once, whatever n).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from common.contract import acceptance_length
from router.delivery import Door, Ended
from router.errors import Outcome
from router.request_path import RequestPath
from router.responses import FINISH_REASONS
from tandem_api.v1 import generation_pb2 as pb

FINISH = {code: name for name, code in FINISH_REASONS.items()}  # tandem.v1 finish reason -> OpenAI's


@dataclass
class Choice:
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


class Job:
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
        self.choices = {index: Choice(index, index // n) for index, _ in subs}
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

    async def events(self) -> AsyncIterator[tuple[Choice, pb.GenerateResponse | Ended]]:
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

    def _record(self, choice: Choice, r: pb.GenerateResponse) -> None:
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
            usage["acceptance_length"] = round(acceptance_length(steps, accepted) or 0.0, 4)
        return usage
