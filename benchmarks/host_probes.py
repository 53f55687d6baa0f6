"""What a served benchmark watches on the host while it runs: the machine's CPU busy share (from
/proc/stat), each process's CPU seconds (/proc/PID/stat), waiting for it to settle after clusters start,
and a Prometheus-like /metrics scraper.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path

from served_common import pct


class Scraper:
    """GETs /metrics every `interval` s on a thread, like a Prometheus; counts scrapes, bytes, failures."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.bytes = 0
        self.failures: list[str] = []
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def _loop(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    body = resp.read()
                self.scrapes += 1
                self.bytes += len(body)
                self.seconds.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.failures.append(repr(exc))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict:
        return {
            "scrapes": self.scrapes,
            "bytes_per_scrape": self.bytes / self.scrapes if self.scrapes else 0,
            "scrape_ms_p50": 1e3 * pct(self.seconds, 50),
            "failures": len(self.failures),
            "first_failures": self.failures[:3],
        }


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_since(start: tuple[int, int]) -> float:
    busy, total = cpu_times()
    return (busy - start[0]) / max(1, total - start[1])


def cpu_busy_over(seconds: float) -> float:
    start = cpu_times()
    time.sleep(seconds)
    return cpu_busy_since(start)


def settle(below: float = 0.2, window_s: float = 2.0, max_s: float = 60.0) -> tuple[float, float]:
    """Wait until the machine's CPU is mostly idle (clusters just started keep it busy for a few seconds):
    returns (seconds waited, busy share of the last window)."""
    t0 = time.perf_counter()
    while True:
        busy = cpu_busy_over(window_s)
        if busy < below or time.perf_counter() - t0 > max_s:
            return time.perf_counter() - t0, busy


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on this machine, by pid, with a label from its command."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(d.name)] = (process_label(cmd), (int(fields[11]) + int(fields[12])) / tick)
    return out


def process_label(cmd: str) -> str:
    if not cmd:
        return "kernel / other"
    if "ray::" in cmd:
        return cmd.split("ray::", 1)[1].split()[0].split(".")[0]  # the actor class: PrefillWorker, DecodeWorker...
    for key, label in (("tandem bench", "bench client"), ("tandem serve", "tandem serve (router)")):
        if key in cmd:
            return label
    return Path(cmd.split()[0]).name


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process used between two snapshots (processes started between them: all of it)."""
    used: dict[str, float] = {}
    for pid, (label, secs) in after.items():
        spent = secs - before[pid][1] if pid in before else secs
        if spent > 0:
            used[label] = used.get(label, 0.0) + spent
    return dict(sorted(((k, round(v, 2)) for k, v in used.items() if v >= 0.05), key=lambda kv: -kv[1]))
