"""CPU the HTTP door spends per streamed chunk, without a cluster: the real `HttpDoor` and `HttpServer`
(FastAPI, uvicorn) over a request path that only emits `--chunks` responses per request, driven by an
httpx client in another process (`--requests` streamed completions on one kept-alive connection).

    .venv/bin/python benchmarks/http_door_cpu.py --http httptools
    .venv/bin/python benchmarks/http_door_cpu.py --http h11      # uvicorn's pure-Python parser

Prints the server process's CPU per request and per chunk (the emitting path's own cost included: it
is a lower bound on nothing and an upper bound on the door). `--profile` adds cProfile's top entries.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.delivery import Ended  # noqa: E402
from router.errors import Outcome  # noqa: E402
from router.http_app import HttpDoor  # noqa: E402
from router.http_server import HttpServer  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.request_path import RequestPath  # noqa: E402
from router.responses import ServerFacts  # noqa: E402
from tandem_api.v1 import generation_pb2 as pb  # noqa: E402

FACTS = ServerFacts(
    model="m",
    model_fingerprint="",
    mode="disaggregated",
    topology="",
    version="",
    kv_transport="",
    max_model_len=2048,
    vocab_size=10,
)


class _Membership:
    serving = True
    pools = ()


class EmittingPath:
    """Stands in for RequestPath: routes at once, then emits `chunks` one-token responses."""

    def __init__(self, chunks: int) -> None:
        self.membership, self.metrics, self.validator, self.chunks = _Membership(), RouterMetrics(), None, chunks

    async def run(self, request, emit, *, on_routed=None, **_):
        on_routed()
        for i in range(self.chunks):
            await asyncio.sleep(0)
            r = pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text=" tok")
            if i == self.chunks - 1:
                r.finish_reason = pb.FINISH_REASON_LENGTH
                r.usage.CopyFrom(pb.Usage(prompt_tokens=10, completion_tokens=self.chunks))
            await emit(r)
        return Ended(Outcome.OK)


async def main(a: argparse.Namespace) -> None:
    # a stand-in, not a RequestPath: it has what HttpDoor uses (membership, metrics, validator, run)
    path = cast(RequestPath, EmittingPath(a.chunks))
    server = HttpServer(HttpDoor(path, lambda: FACTS), "127.0.0.1", 0)
    server.server.config.http = a.http
    await server.start()
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": a.chunks, "stream": True})
    client = f"""
import httpx
with httpx.Client() as h:
    for _ in range({a.requests}):
        with h.stream('POST', 'http://127.0.0.1:{server.port}/v1/completions', content={body!r}) as r:
            for _ in r.iter_lines():
                pass
"""
    profile = cProfile.Profile() if a.profile else None
    cpu0 = time.process_time()
    if profile:
        profile.enable()
    proc = subprocess.Popen([sys.executable, "-c", client])
    while proc.poll() is None:
        await asyncio.sleep(0.05)
    if profile:
        profile.disable()
    cpu = time.process_time() - cpu0
    await server.stop()
    print(
        f"http={a.http}: server CPU {cpu / a.requests * 1000:.2f} ms per request, "
        f"{cpu / a.requests / a.chunks * 1e6:.0f} us per chunk ({a.requests} requests x {a.chunks} chunks)"
    )
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", choices=["httptools", "h11"], default="httptools")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    asyncio.run(main(ap.parse_args()))
