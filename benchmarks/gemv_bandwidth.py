"""How fast can torch stream weights in a batch-1 decode? GEMV vs plain reduction.

For every weight shape of a model (default: SmolLM2-135M's), times the matrix-vector
product of one token with enough copies of the weight to defeat the caches, in
each form torch offers, and compares the bytes streamed per second with a
`sum()` over a 1 GiB float32 tensor (the read-bandwidth figure the decode bound uses).
Prints a table; --out writes JSON.

    .venv/bin/python benchmarks/gemv_bandwidth.py [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def best_time(fn, reps: int = 30, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def read_bandwidth() -> float:
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    return x.numel() * 4 / best_time(lambda: x.sum(), reps=3, rounds=5)


def gemv_rates(dtype: torch.dtype) -> dict[str, float]:
    forms = ("F.linear(x, W[out,in])", "x @ W[in,out]")
    total_bytes = 0
    times = {k: 0.0 for k in forms}
    for out_f, in_f in SHAPES.values():
        copies = max(2, int(256e6 // (out_f * in_f * 2)))  # > 256 MB of weights per shape
        ws = [torch.randn(out_f, in_f).to(dtype) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(1, in_f).to(dtype)
        it = iter(range(1 << 62))
        total_bytes += out_f * in_f * ws[0].element_size()
        times["F.linear(x, W[out,in])"] += best_time(lambda: F.linear(x, ws[next(it) % copies]))
        times["x @ W[in,out]"] += best_time(lambda: x @ wts[next(it) % copies])
    return {k: total_bytes / t for k, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for form, rate in gemv_rates(dtype).items():
            rows.append(
                {"dtype": str(dtype).replace("torch.", ""), "form": form, "gb_s": rate / 1e9, "of_sum": rate / bw}
            )
    print(f"threads={torch.get_num_threads()}  sum() over 1 GiB fp32: {bw / 1e9:.1f} GB/s")
    print(f"{'dtype':10s} {'form':26s} {'GB/s':>7s} {'of sum()':>9s}")
    for r in rows:
        print(f"{r['dtype']:10s} {r['form']:26s} {r['gb_s']:7.1f} {r['of_sum']:8.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "sum_gb_s": bw / 1e9, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
