"""Effect of keeping freed memory in the glibc heap (engine/cpu_memory.py) on CPU inference.

Runs the same workload in two fresh processes, with TANDEM_KEEP_HEAP=0 and =1,
alternating, and prints a table (and JSON with --out):
  - prefill: time to first token of a fresh 512-token prompt (best of 5);
  - decode: batch-1 tokens/s over 64 new tokens after a 3-token prompt (best of 3).

    .venv/bin/python benchmarks/cpu_heap.py [--dtype bfloat16] [--rounds 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
from engine.llm import LLM
from common.sampling_params import SamplingParams
llm = LLM(dtype=sys.argv[1])
one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
base = list(range(1000, 1512))
for i in range(2):
    llm.generate([[t + 100 + i for t in base]], one)
best = 9e9
for i in range(5):
    t = time.perf_counter(); llm.generate([[t_ + 1 + i for t_ in base]], one); best = min(best, time.perf_counter() - t)
dec = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
rate = 0.0
for i in range(3):
    t = time.perf_counter(); llm.generate([[5, 6, 7 + i]], dec); rate = max(rate, 64 / (time.perf_counter() - t))
print(json.dumps({"prefill_tok_s": 512 / best, "decode_tok_s": rate}))
"""


def run(keep: str, dtype: str) -> dict:
    env = {**os.environ, "TANDEM_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", WORKER, dtype], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for keep in ("0", "1"):
            results[keep].append(run(keep, args.dtype))
    rows = []
    for metric in ("prefill_tok_s", "decode_tok_s"):
        off = statistics.median(r[metric] for r in results["0"])
        on = statistics.median(r[metric] for r in results["1"])
        rows.append({"metric": metric, "heap_default": off, "heap_kept": on, "ratio": on / off})
    print(f"dtype={args.dtype}, {args.rounds} rounds alternating, medians; load average {os.getloadavg()[0]:.1f}")
    print(f"{'metric':16s} {'glibc default':>14s} {'kept (ours)':>12s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['metric']:16s} {r['heap_default']:14.1f} {r['heap_kept']:12.1f} {r['ratio']:6.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dtype": args.dtype, "rows": rows, "raw": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
