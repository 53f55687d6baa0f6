"""Where should linears switch from the packed CPU kernel to oneDNN? Measured on whole decode steps.

`engine/model/linear.py` sends a bf16 linear of at most BF16_KERNEL_MAX_ROWS rows to the packed kernel and
larger ones to oneDNN (`F.linear`); float32 on AVX2 likewise at F32_AVX2_KERNEL_MAX_ROWS (`--dtype float32`).
`cpu_kernels_micro.py` times one weight in cache, where oneDNN wins from
about 8 rows; a served decode step streams all the weights from memory, where oneDNN reads them at a third
of the kernel's rate. This script loads the model once per candidate threshold in one process and times
decode steps of the same batch interleaved across the engines (A, B, A, B, ...), so the machine's drift
hits every candidate alike.

    python benchmarks/bf16_crossover.py --candidates 4,8,12,16 --rows 4,5,6,8,12,16,24 --context 288
    python benchmarks/bf16_crossover.py --dtype float32 --candidates 8,16,32,64 --rows 8,16,24,32,48,64 --threads 2

Prints a table (median step ms per rows and candidate, and the ratio to the first candidate) and writes
--out (JSON).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--candidates", default="4,8,12,16", help="threshold values to compare")
    ap.add_argument("--rows", default="4,5,6,8,12,16,24", help="decode batch sizes")
    ap.add_argument("--context", type=int, default=288, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch (2 left out as warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker's default is 1)")
    ap.add_argument("--out", default="benchmarks/results/bf16_crossover.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import engine.model.linear as linear
    from common.sampling_params import SamplingParams
    from engine.llm import LLM
    from engine.model.cpu_kernels import cpu_kernels

    kernel = cpu_kernels()
    if kernel is None or (args.dtype == "float32" and kernel.lanes >= 16):
        print("note: no CPU kernels here, or float32 on AVX-512 (packed kernel at every size): nothing to compare")
    candidates = [int(c) for c in args.candidates.split(",")]
    engines = {}
    for c in candidates:  # the threshold is read when a layer is finalized (model load)
        if args.dtype == "bfloat16":
            linear.BF16_KERNEL_MAX_ROWS = c
        else:
            linear.F32_AVX2_KERNEL_MAX_ROWS = c
        engines[c] = LLM(dtype=args.dtype, kv_cache_memory_bytes=256 << 20).engine
    rng = random.Random(0)
    vocab = engines[candidates[0]].model_config.vocab_size
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        prompts = [[rng.randrange(vocab) for _ in range(args.context)] for _ in range(rows)]
        ids: dict[int, list[str]] = {}
        for c, core in engines.items():
            ids[c] = []
            for p in prompts:
                rid = f"x{rng.random()}"
                ids[c].append(rid)
                core.add_request(p, SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True), rid)
            while core.pending_prefill_tokens() > 0:
                core.step()
        times: dict[int, list[float]] = {c: [] for c in candidates}
        for _ in range(args.steps):
            for c, core in engines.items():
                t0 = time.perf_counter()
                core.step()
                times[c].append(time.perf_counter() - t0)
        for c, core in engines.items():
            for rid in ids[c]:
                core.abort_request(rid)
            core.kv_manager.reset_prefix_cache()
        ms = {c: statistics.median(v[2:]) * 1e3 for c, v in times.items()}
        table.append({"rows": rows, "step_ms": ms})
        cells = "  ".join(f"{ms[c]:7.1f} ({ms[c] / ms[candidates[0]]:.2f})" for c in candidates)
        print(f"rows {rows:3d}  {cells}", flush=True)
    name = "BF16_KERNEL_MAX_ROWS" if args.dtype == "bfloat16" else "F32_AVX2_KERNEL_MAX_ROWS"
    print(f"columns: {name} = " + ", ".join(map(str, candidates)) + "; median step ms (ratio to first)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(sys.argv), "context": args.context, "threads": args.threads, "table": table}
    doc["capability"] = torch.backends.cpu.get_cpu_capability()
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
