"""A plan at scale: `tandem plan` for a trace-shaped load at 1,000 req/s on a measured profile.

Writes a seeded trace (OUT/trace.jsonl, the `tandem bench --dataset trace` format): bursty arrivals (gamma
gaps, shape 0.5: clumps and lulls around the mean), chat-like lengths (lognormal prompts around 512
tokens, replies around 128), and a quarter of the requests opening with one of 32 long system prompts.
`tandem plan --dataset trace` rescales its timestamps to the requested mean rate and searches for the
cheapest pools that meet the SLO; the answer, every simulation it ran and how long the search took go to
OUT/plan.json.

    python benchmarks/plan_at_scale.py --profile profile.json --out benchmarks/results/plan_at_scale \\
        --rate 1000 --slo ttft_ms=3000,tpot_ms=150
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_trace(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    t = 0.0
    with path.open("w") as f:
        for _ in range(n):
            t += rng.gammavariate(0.5, 2.0)  # mean gap 1 (rescaled by --request-rate), bursty
            prompt = max(16, min(4096, round(512 * math.exp(0.6 * rng.gauss(0, 1)))))
            reply = max(8, min(1024, round(128 * math.exp(0.5 * rng.gauss(0, 1)))))
            doc: dict = {"timestamp_s": round(t, 4), "input_tokens": prompt, "output_tokens": reply}
            if rng.random() < 0.25:
                group = rng.randrange(32)
                doc.update(prefix_group=group, prefix_tokens=min(prompt, 256 + 16 * group))
            f.write(json.dumps(doc) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--out", default="benchmarks/results/plan_at_scale")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--slo", default="ttft_ms=3000,tpot_ms=150")
    ap.add_argument("--requests", type=int, default=20000, help="trace length")
    ap.add_argument("--max-workers", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan-flags", default="", help="more `tandem plan` flags (e.g. --modes disaggregated)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.jsonl"
    write_trace(trace, args.requests, args.seed)
    cmd = [
        sys.executable, "-m", "deploy.cli", "plan", "--profile", args.profile, "--dataset", "trace",
        "--trace-file", str(trace), "--request-rate", str(args.rate), "--slo", args.slo,
        "--max-workers", str(args.max_workers), "--num-requests", str(args.requests), "--output", str(out),
        *shlex.split(args.plan_flags),
    ]  # fmt: skip
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=False)
    print(f"(wall {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
