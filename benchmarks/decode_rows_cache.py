"""A decode step whose rows share one cached prefix against one whose rows own their context (issue 20).

`tandem profile` used to set up B decode rows of C tokens as one cached prefix of C tokens plus one token
each: cheap to prepare, but every row then reads the same KV blocks, which stay in the CPU's caches, while
a served decode worker's rows each read their own. This measures both on the offline engine (one process,
`--threads` torch threads, float32 by default), alternating, `--repeats` times per point:

    .venv/bin/python benchmarks/decode_rows_cache.py                     # 8 x 288 and 16 x 512
    .venv/bin/python benchmarks/decode_rows_cache.py --points 4x256 8x1024 --repeats 5

Each measurement is the median of the pure decode steps of B rows (the first 3 left out) over 40 output
tokens. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "decode_rows_cache.json"
OUTPUT_TOKENS = 40


def decode_step_s(core, rng: random.Random, rows: int, context: int, shared: bool, tag: str) -> float:
    from common.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(17, 40000) for _ in range(n)]

    prefix = fresh(context)
    if shared:  # the prefix computed and cached once; each row adds one token of its own
        core.add_request(prefix, SamplingParams(max_tokens=1), f"{tag}-prefix")
        while core.has_unfinished_requests():
            core.step()
    for j in range(rows):
        core.add_request(prefix + fresh(1) if shared else fresh(context), params, f"{tag}-{j}")
    times = []
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        core.step()
        t1 = time.perf_counter()
        prompt_tokens, _, decode_rows, _ = core.last_step_features
        if prompt_tokens == 0 and decode_rows == rows:
            times.append(t1 - t0)
    core.kv_manager.reset_prefix_cache()
    return statistics.median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=["8x288", "16x512"], help="ROWSxCONTEXT")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a served worker's default: 1)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache", type=int, default=512, help="MiB")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from engine.llm import LLM

    core = LLM(None, dtype=a.dtype, kv_cache_memory_bytes=a.kv_cache << 20).engine
    rng = random.Random(0)
    rows_out = []
    print(f"| rows x context | shared prefix (ms) | own context (ms) | own / shared |  ({a.dtype}, {a.threads} thr)")
    print("|---|---:|---:|---:|")
    for point in a.points:
        rows, context = (int(x) for x in point.split("x"))
        shared, own = [], []
        for k in range(a.repeats):
            own.append(decode_step_s(core, rng, rows, context, False, f"own{point}.{k}"))
            shared.append(decode_step_s(core, rng, rows, context, True, f"shared{point}.{k}"))
        s_ms, o_ms = statistics.median(shared) * 1e3, statistics.median(own) * 1e3
        rows_out.append({"rows": rows, "context": context, "shared_ms": shared, "own_ms": own})
        print(f"| {rows} x {context} | {s_ms:.1f} | {o_ms:.1f} | {o_ms / s_ms:.2f} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps({"args": vars(a), "points": rows_out, "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1)
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
