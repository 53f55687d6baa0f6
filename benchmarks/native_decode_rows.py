"""Decode steps of one to many rows: the native call against the per-layer path (float32).

A decode-only step runs its layers in one native call on the packed kernel, up to NATIVE_DECODE_F32_MAX_ROWS rows
(engine/model/llama.py). Layer by layer (`TANDEM_NATIVE_DECODE=0`), the linears run the packed kernel up to the
per-layer limit (F32_AVX2_KERNEL_MAX_ROWS on AVX2) and oneDNN above it. This loads two engines in one process, one
of each, gives both the same prompts, checks that every row is running, and times their decode steps interleaved
(A, B, A, B, ...) so that this machine's drift hits both alike.

    python benchmarks/native_decode_rows.py --rows 16 32 48 64 96

Prints the median step time per row count and engine, and their ratio; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.sampling_params import SamplingParams  # noqa: E402
from engine.llm import LLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 48, 64, 96])
    ap.add_argument("--prompt", type=int, default=160, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per engine (2 left out as warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/native_decode_rows.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    for name in ("per-layer", "native"):
        engines[name] = LLM(dtype="float32", max_num_seqs=max(args.rows), kv_cache_memory_bytes=2 << 30).engine
    engines["per-layer"].runner.executor.shard.model._native = None  # what TANDEM_NATIVE_DECODE=0 makes of it
    g = torch.Generator().manual_seed(0)
    table = []
    limit = engines["per-layer"].runner.executor.shard.model.layers[0].qkv_proj._kernel_max_rows
    print(f"float32, {args.threads} threads, {args.prompt}-token prompts; per-layer packed-kernel limit {limit} rows")
    for rows in args.rows:
        prompts = [torch.randint(17, 40000, (args.prompt,), generator=g).tolist() for _ in range(rows)]
        params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
        for core in engines.values():
            for i, p in enumerate(prompts):
                core.add_request(p, params, f"r{rows}-{i}")
            started: set[str] = set()
            while len(started) < rows:
                started.update(o.request_id for o in core.step())
            if len(core.scheduler.running) != rows:
                raise SystemExit(f"{len(core.scheduler.running)} of {rows} rows running: the batch is cut")
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.steps):
            for name, core in engines.items():
                t = time.perf_counter()
                core.step()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v[2:]) * 1e3 for name, v in times.items()}
        table.append({"rows": rows, "step_ms": med, "ratio": med["native"] / med["per-layer"]})
        print(
            f"rows {rows:4d}: per-layer {med['per-layer']:7.1f} ms  native {med['native']:7.1f} ms  "
            f"ratio {med['native'] / med['per-layer']:.2f}",
            flush=True,
        )
        for core in engines.values():
            for rid in list(core.scheduler.requests):
                core.abort_request(rid)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "per_layer_limit": limit, "rows": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
