"""What serving adds on top of the engine: batch-1 TTFT and inter-token latency, offline vs `tandem serve`.

Offline: the engine alone (`EngineCore`, torch threads = a served worker's, 1 by default) on
`--requests` fresh prompts of `--input-len` random tokens, one at a time: TTFT = wall time of the
prefill step(s) up to the first token, ITL = the gaps between the following step outputs
(`--output-len` tokens, EOS ignored). Served: each configuration (`tandem serve` + its flags) is
started as its own process, then `tandem bench` sends the same shape of load one request at a time
(`--max-concurrency 1`, `--spread 0`: exact lengths) over gRPC, and its summary gives TTFT and ITL
as the client sees them. Configurations run one after the other, never sharing the machine.

    .venv/bin/python benchmarks/served_overhead.py --tandem-flags "--dtype float32"
    .venv/bin/python benchmarks/served_overhead.py --configs disagg agg --tandem-flags "--dtype bfloat16"

Prints a table (p50s, served / offline ratios, TTFT difference) and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host_probes import cpu_delta, cpu_seconds  # noqa: E402
from benchmarks.serving_compare import BUILTIN, TANDEM, start, stop  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "served_overhead.json"


def offline(a: argparse.Namespace) -> dict:
    """Runs in a child process with the worker's thread count (so the parent's torch state cannot leak in)."""
    import random

    import torch

    torch.set_num_threads(a.threads)
    from common.sampling_params import SamplingParams
    from engine.llm import LLM

    toks = shlex.split(a.tandem_flags)

    def flag(name: str, default):
        return toks[toks.index(name) + 1] if name in toks else default

    dtype = flag("--dtype", "auto")
    llm = LLM(flag("--model", None), dtype=dtype, kv_cache_memory_bytes=512 << 20)
    core = llm.engine
    rng = random.Random(a.seed)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    ttft: list[float] = []
    itl: list[float] = []
    for i in range(a.requests // a.batch + 1):  # the first round is a warm-up
        t0 = time.perf_counter()
        for j in range(a.batch):
            prompt = [rng.randrange(17, 40000) for _ in range(a.input_len)]
            core.add_request(prompt, params, f"r{i}.{j}")
        stamps: dict[str, list[float]] = {}
        while core.has_unfinished_requests():
            outputs = core.step()
            now = time.perf_counter()
            for o in outputs:
                if o.new_token_ids:
                    stamps.setdefault(o.request_id, []).append(now)
        if i:
            for st in stamps.values():
                ttft.append((st[0] - t0) * 1e3)
                itl.extend((b - a_) * 1e3 for a_, b in zip(st, st[1:]))
    return {
        "ttft_ms_p50": statistics.median(ttft),
        "itl_ms_p50": statistics.median(itl),
        "itl_ms_p99": sorted(itl)[int(0.99 * (len(itl) - 1))],
        "dtype": dtype,
        "threads": a.threads,
    }


def served(name: str, a: argparse.Namespace, out_dir: Path) -> dict:
    flags = list(BUILTIN[name])
    proc, target = start(name, flags, a, out_dir / f"{name}.log")
    try:
        run_dir = out_dir / name
        cmd = [
            *TANDEM,
            "bench",
            *target,
            "--dataset",
            "random",
            "--input-len",
            str(a.input_len),
            "--output-len",
            str(a.output_len),
            "--spread",
            "0",
            "--ignore-eos",
            "--num-requests",
            str(a.requests),
            "--max-concurrency",
            str(a.batch),
            "--request-rate",
            "inf",
            "--warmup",
            "1",
            "--seed",
            str(a.seed),
            "--output",
            str(run_dir),
            "--no-plots",
            "--quiet",
        ]
        before = cpu_seconds()
        subprocess.run(cmd, cwd=REPO, check=True, timeout=3600)
        cpu = cpu_delta(before, cpu_seconds())
    finally:
        stop(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    s = summary[0] if isinstance(summary, list) else summary
    return {
        "ttft_ms_p50": s["ttft_ms"]["p50"],
        "itl_ms_p50": s["itl_ms"]["p50"],
        "itl_ms_p99": s["itl_ms"]["p99"],
        "duration_s": s.get("duration_s"),
        "cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["disagg", "agg"], choices=sorted(BUILTIN))
    p.add_argument("--tandem-flags", default="", help="flags for every tandem serve (and --dtype for offline)")
    p.add_argument("--threads", type=int, default=1, help="offline torch threads (a served worker's default: 1)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument(
        "--batch", type=int, default=1, help="requests at once (offline: added together; served: --max-concurrency)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # start() reads these from the serving_compare namespace
    a.vllm_python = a.hf_model = None
    if a.offline_child:
        print("RESULT " + json.dumps(offline(a)), flush=True)
        return
    child = subprocess.run(
        [sys.executable, __file__, "--offline-child", *(argv if argv is not None else sys.argv[1:])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=3600,
    )
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
    if child.returncode or not lines:
        raise SystemExit(f"offline run failed: {child.stderr[-2000:]}")
    results = {"offline": json.loads(lines[-1][7:])}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs:
            results[name] = served(name, a, Path(tmp))
    off = results["offline"]
    print(
        f"\nbatch {a.batch}, {a.input_len} prompt tokens, {a.output_len} output tokens, {a.requests} requests "
        f"(tandem flags: {a.tandem_flags or 'none'}; offline threads {a.threads})"
    )
    print("| | TTFT p50 | ITL p50 | ITL p99 | decode tok/s (1 / ITL p50) | served / offline decode | TTFT - offline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate = 1e3 / r["itl_ms_p50"]
        rel = "" if name == "offline" else f"{off['itl_ms_p50'] / r['itl_ms_p50']:.0%}"
        dt = "" if name == "offline" else f"{r['ttft_ms_p50'] - off['ttft_ms_p50']:+.0f} ms"
        print(
            f"| {name} | {r['ttft_ms_p50']:.0f} ms | {r['itl_ms_p50']:.1f} ms | {r['itl_ms_p99']:.1f} ms | "
            f"{rate:.1f} | {rel} | {dt} |"
        )
    for name, r in results.items():
        if r.get("cpu_s"):
            wall = r.get("duration_s") or 0.0
            shares = ", ".join(f"{k} {v:.1f}" + (f" ({v / wall:.0%})" if wall else "") for k, v in r["cpu_s"].items())
            print(f"{name}: CPU seconds during the bench ({wall:.0f} s of wall time): {shares}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {"args": vars(a), "results": results, "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")},
            indent=1,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
