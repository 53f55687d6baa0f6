"""What the OpenAI HTTP door costs against gRPC: the same cluster, the same load, both doors, alternating.

One `tandem serve` (its flags: `--tandem-flags`) serves both doors. Each round runs `tandem bench` once
per door with the same shape of load, in alternating order (gRPC first in even rounds, HTTP first in
odd ones), for each load shape:

    sequential   one request at a time (--max-concurrency 1): TTFT and ITL without queueing
    loaded       --request-rate inf --max-concurrency C: throughput with the workers busy

gRPC sends token ids; HTTP sends prompts of the same length as text (`--tokenizer` is the served
model's, read from /v1/models) and reads SSE. Every run draws its own prompts (seed = round, load and
door), so no run finds another's prompts in the prefix cache. Beside the latencies, each run's CPU
time is read for the router process (the `tandem serve` process: both doors and the request path;
the workers are other processes) and for the bench client, per request. The table gives the median
over rounds of TTFT p50, ITL p50, output throughput and CPU per door, and the ratio HTTP / gRPC.

    .venv/bin/python benchmarks/http_overhead.py --tandem-flags "--dtype float32" --rounds 3

Writes `--out`/http_overhead.json and each bench run's own directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.served_common import free_port  # noqa: E402
from benchmarks.serving_compare import TANDEM, stop, wait_http, wait_tandem  # noqa: E402


def _cpu(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--tandem-flags", default="", help="flags for `tandem serve`")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--sequential-requests", type=int, default=12)
    ap.add_argument("--loaded-requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--loads", nargs="+", default=["sequential", "loaded"], choices=["sequential", "loaded"])
    ap.add_argument("--out", default="benchmarks/results/http_overhead")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    serve = [*TANDEM, "serve", "--port", str(grpc_port), "--http-port", str(http_port), *shlex.split(a.tandem_flags)]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    proc = subprocess.Popen(
        serve, cwd=REPO, stdout=(out / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{http_port}/v1"
    targets = {"grpc": ["--server", f"127.0.0.1:{grpc_port}"], "http": ["--openai-url", f"{url}/completions"]}
    common = [
        "--dataset",
        "random",
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--spread",
        "0",
        "--ignore-eos",
        "--warmup",
        "2",
        "--quiet",
    ]
    loads = {
        "sequential": ["--num-requests", str(a.sequential_requests), "--max-concurrency", "1"],
        "loaded": [
            "--num-requests",
            str(a.loaded_requests),
            "--request-rate",
            "inf",
            "--max-concurrency",
            str(a.concurrency),
        ],
    }
    loads = {name: loads[name] for name in a.loads}
    runs: dict[str, dict[str, list[dict]]] = {load: {"grpc": [], "http": []} for load in loads}
    commands: dict[str, str] = {}
    router = psutil.Process(proc.pid)
    try:
        wait_tandem(grpc_port, proc)
        wait_http(url, proc)
        with urllib.request.urlopen(f"{url}/models", timeout=30) as reply:  # the model the server loaded
            targets["http"] += ["--tokenizer", json.load(reply)["data"][0]["root"]]
        for r in range(a.rounds):
            for li, (load, flags) in enumerate(loads.items()):
                for door in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                    dest = out / f"{load}-{door}-{r}"
                    seed = 1000 * r + 10 * li + (door == "http")
                    cmd = [
                        *TANDEM,
                        "bench",
                        *targets[door],
                        *common,
                        *flags,
                        "--seed",
                        str(seed),
                        "--output",
                        str(dest),
                    ]
                    commands[f"{load}/{door}"] = "tandem " + shlex.join(cmd[3:])
                    t0 = time.monotonic()
                    router_cpu0, client_cpu0 = _cpu(router), resource.getrusage(resource.RUSAGE_CHILDREN)
                    subprocess.run(cmd, cwd=REPO, check=True)
                    client_cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    run = json.loads((dest / "summary.json").read_text())[0]
                    n = run["completed"] + sum((run["failed"] or {}).values()) + 2  # + the warm-up requests
                    run["router_cpu_ms_per_request"] = (_cpu(router) - router_cpu0) * 1000 / n
                    run["client_cpu_ms_per_request"] = (
                        ((client_cpu1.ru_utime + client_cpu1.ru_stime) - (client_cpu0.ru_utime + client_cpu0.ru_stime))
                        * 1000
                        / n
                    )
                    runs[load][door].append(run)
                    print(
                        f"round {r} {load:>10} {door:>4}: TTFT p50 {run['ttft_ms']['p50']:.1f} ms, ITL p50 "
                        f"{run['itl_ms']['p50']:.1f} ms, {run['output_throughput']:.1f} tok/s, "
                        f"router CPU {run['router_cpu_ms_per_request']:.1f} ms/req, client CPU "
                        f"{run['client_cpu_ms_per_request']:.1f} ms/req, failed {run['failed'] or 0} "
                        f"({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
    finally:
        stop(proc)
    rows = []
    print(
        f"\n{'load':>10} {'door':>5} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'out tok/s':>10} "
        f"{'router CPU':>11} {'client CPU':>11}   (median of {a.rounds} rounds; CPU in ms per request)"
    )
    for load in loads:
        med = {
            door: {
                "ttft_p50_ms": statistics.median(x["ttft_ms"]["p50"] for x in rs),
                "itl_p50_ms": statistics.median(x["itl_ms"]["p50"] for x in rs),
                "output_throughput": statistics.median(x["output_throughput"] for x in rs),
                "router_cpu_ms_per_request": statistics.median(x["router_cpu_ms_per_request"] for x in rs),
                "client_cpu_ms_per_request": statistics.median(x["client_cpu_ms_per_request"] for x in rs),
                "failed": sum(sum((x["failed"] or {}).values()) for x in rs),
            }
            for door, rs in runs[load].items()
        }
        for door, m in med.items():
            print(
                f"{load:>10} {door:>5} {m['ttft_p50_ms']:12.1f} {m['itl_p50_ms']:11.2f} {m['output_throughput']:10.1f} "
                f"{m['router_cpu_ms_per_request']:11.1f} {m['client_cpu_ms_per_request']:11.1f}"
            )
        keys = (
            "ttft_p50_ms",
            "itl_p50_ms",
            "output_throughput",
            "router_cpu_ms_per_request",
            "client_cpu_ms_per_request",
        )
        ratio = {k: med["http"][k] / med["grpc"][k] if med["grpc"][k] else None for k in keys}
        print(
            f"{load:>10} {'h/g':>5} {ratio['ttft_p50_ms']:12.3f} {ratio['itl_p50_ms']:11.3f} "
            f"{ratio['output_throughput']:10.3f} {ratio['router_cpu_ms_per_request']:11.3f} "
            f"{ratio['client_cpu_ms_per_request']:11.3f}"
        )
        rows.append({"load": load, **med, "http/grpc": ratio})
    doc = {
        "command": "benchmarks/http_overhead.py " + shlex.join(sys.argv[1:]),
        "serve": shlex.join(serve[3:]),
        "bench_commands": commands,
        "rows": rows,
        "runs": {
            load: {
                door: [
                    {
                        k: x[k]
                        for k in (
                            "ttft_ms",
                            "itl_ms",
                            "output_throughput",
                            "failed",
                            "router_cpu_ms_per_request",
                            "client_cpu_ms_per_request",
                        )
                    }
                    for x in rs
                ]
                for door, rs in d.items()
            }
            for load, d in runs.items()
        },
    }
    (out / "http_overhead.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {out / 'http_overhead.json'}; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
