"""tests/helpers/fake_workers.py: the shared fake WorkerClient does what its docstring says."""

from __future__ import annotations

import asyncio

import pytest

from common.contract import KVHandle, PrefillResult, StreamChunk
from common.kv_events import decode_event_batch
from common.sampling_params import SamplingParams
from router.errors import WorkerFailedError, WorkerUnavailableError
from router.workers import WorkerClient
from tests.helpers.fake_workers import PASS, Call, FakeWorker, worker_status

PARAMS = SamplingParams(max_tokens=2)


def chunk(rid: str, *ids: int, finished: bool = False) -> StreamChunk:
    return StreamChunk(rid, list(ids), "", finished=finished)


def prefilled(rid: str) -> PrefillResult:
    """What a prefill worker hands to decode (the fake only records it)."""
    return PrefillResult(chunk(rid, 1), KVHandle("p0", [0], 1, 30.0), 0.01, "p0")


async def drain(stream) -> list[int]:
    return [t async for c in stream for t in c.token_ids]


def test_defaults_scripts_and_the_call_log() -> None:
    async def scenario() -> None:
        w = FakeWorker("p0", "prefill")
        assert isinstance(w, WorkerClient)
        assert await w.status() == worker_status("p0", "prefill") and (await w.status()).health == "SERVING"
        assert await w.abort("r0") and await w.release("r0") and await w.wait_idle(1.0)
        reply = await w.kv_events(0, 0.1)
        assert decode_event_batch(reply.events).events == [] and reply.status is w.status_reply
        assert (await w.kv_snapshot()).block_hashes == []
        with pytest.raises(AssertionError, match="prefill was called with nothing scripted"):
            await w.prefill("r1", [1, 2], PARAMS)
        w.script("abort", PASS, False, WorkerFailedError("boom", "p0"))
        assert await w.abort("a1") is True and await w.abort("a2") is False
        with pytest.raises(WorkerFailedError, match="boom"):
            await w.abort("a3")
        assert await w.abort("a4") is True  # the script is used up
        assert w.request_ids("abort") == ["r0", "a1", "a2", "a3", "a4"]
        assert w.calls[:2] == [Call("status", ()), Call("status", ())]
        assert w.calls[-5] == Call("prefill", ("r1", [1, 2], PARAMS, None, ()))
        w.status_reply = worker_status("p0", "prefill", health="NOT_SERVING", running=3)
        assert (await w.status()).running == 3

    asyncio.run(scenario())


def test_streams_failures_and_down() -> None:
    async def scenario() -> None:
        w = FakeWorker("d0")
        w.script(
            "decode",
            [chunk("r", 1), chunk("r", 2, finished=True)],
            [chunk("r", 1), WorkerFailedError("mid-stream", "d0")],
        )
        assert await drain(w.decode("r", [5], PARAMS, prefilled("r"))) == [1, 2]
        got: list[int] = []
        with pytest.raises(WorkerFailedError, match="mid-stream"):
            async for c in w.decode("r", [5], PARAMS, prefilled("r")):
                got += c.token_ids
        assert got == [1]
        stream = w.generate("g", [5], PARAMS)
        assert w.request_ids("generate") == ["g"]  # recorded when called, before it is iterated
        with pytest.raises(AssertionError, match="generate was called with nothing scripted"):
            await drain(stream)
        w.down = True
        with pytest.raises(WorkerUnavailableError, match="d0 is unavailable"):
            await w.status()
        assert w.calls[-1] == Call("status", ())  # recorded even when it fails

    asyncio.run(scenario())


def test_a_hold_blocks_calls_until_opened() -> None:
    async def scenario() -> None:
        w = FakeWorker("p0")
        gate = w.hold("wait_idle")
        call = asyncio.create_task(w.wait_idle(5.0))
        await gate.reached.wait()
        assert not call.done() and await w.status()  # other methods are not held
        gate.open()
        assert await call is True

    asyncio.run(scenario())


def test_inner_answers_unscripted_calls() -> None:
    async def scenario() -> None:
        inner = FakeWorker("p0", "prefill")
        inner.script("generate", [chunk("g", 7, finished=True)])
        spy = FakeWorker("p0", "prefill", inner=inner).script("release", False)
        assert await drain(spy.generate("g", [1], PARAMS)) == [7]
        assert await spy.release("x") is False and inner.request_ids("release") == []  # scripted: not forwarded
        assert await spy.abort("y") and inner.request_ids("abort") == ["y"]
        assert spy.request_ids("abort") == ["y"] and spy.request_ids("generate") == ["g"]

    asyncio.run(scenario())
