"""Small pieces the served-cluster benchmarks share (router_ttft.py, observability_overhead.py, soak.py)."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_api.bench.metrics import percentile


@dataclass
class TimedReply:
    """One Generate call as the client saw it (perf_counter times)."""

    tokens: list[int]
    first: Any  # the first GenerateResponse (prefill_worker, decode_worker, route)
    last: Any  # the last (usage, timings)
    sent_at: float
    ttft_s: float
    total_s: float


def timed_greedy(client, prompt: list[int], request_id: str, max_tokens: int, timeout: float) -> TimedReply:
    """A greedy Generate call (ignore_eos), timed from the client; RuntimeError if the stream is empty."""
    t0 = time.perf_counter()
    first = last = None
    first_at = t0
    tokens: list[int] = []
    for last in client.generate(
        token_ids=prompt,
        request_id=request_id,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        timeout=timeout,
    ):
        if first is None:
            first, first_at = last, time.perf_counter()
        tokens.extend(last.token_ids)
    if first is None:
        raise RuntimeError("no response")
    return TimedReply(tokens, first, last, t0, first_at - t0, time.perf_counter() - t0)


class ScriptRun:
    """A benchmark script's frame: the load average at its start and end (this machine is shared), its
    wall time, and its JSON: the run's header (when, config, load, seconds) before the results."""

    def __init__(self, note: str = "") -> None:
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()
        print(f"load average at start: {fmt_load(self.load_start)}{note}", flush=True)

    def finish(self, out: str | Path, results: dict, config: dict | None = None) -> None:
        load_end = os.getloadavg()
        script_s = time.perf_counter() - self.t0
        print(f"load average at end: {fmt_load(load_end)}; whole script {script_s:.0f} s")
        doc = {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            **({"config": config} if config is not None else {}),
            "load_avg_start": self.load_start,
            "load_avg_end": load_end,
            "script_s": script_s,
            **results,
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")


def pct(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); nan for no samples (tandem bench's percentile)."""
    value = percentile(xs, q)
    return float("nan") if value is None else value


def dist(xs: list[float]) -> dict:
    return {
        "p50": pct(xs, 50),
        "p90": pct(xs, 90),
        "p99": pct(xs, 99),
        "mean": statistics.fmean(xs) if xs else float("nan"),
        "n": len(xs),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)
