"""KV layout conversion throughput: `execute_locally` of each conversion kind vs a plain copy.

SmolLM2-135M's KV geometry (30 layers, 3 KV heads, head_dim 64, bf16; a 4-head variant
where a TP split or merge needs heads divisible by 2), one request of --tokens tokens
(2048 by default). For each conversion kind, a prefill worker's rank caches and a
decode worker's rank caches are allocated; every decode rank binds its
`plan_conversion` plan and the rounds run through `execute_locally` (byte copies into
the cache or staging, then the row scatter). Reported per kind:

    delivered   bytes of requested rows that land in the decode caches (tokens x layers x
                K,V x heads x head_dim x 2 bytes, over every decode rank): the GB/s basis
    read        bytes the READs move (staged NHD reads carry unneeded heads; direct reads
                whole chunks)
    regions     READ regions over all ranks and rounds; rounds: the most rounds of one rank
    bind ms     plan.bind for every decode rank (plans computed once, outside the timing)
    convert     delivered bytes / execute_locally time (all decode ranks)
    copy        delivered bytes / one flat copy_ of as many bytes between preallocated buffers
    scatter     scattered bytes / the time of the rounds' apply_scatter calls alone (index
                upload included), and the backend that ran (torch on CPU; triton on CUDA
                when it imports)

execute_locally copies region by region from Python (one copy_ per region: a kernel
launch each on CUDA), like InProcessTransport; NIXL posts all regions of a READ at once.
So on CUDA the convert column is bound by launches, and the scatter column is the
conversion's own cost.

Timings are best of --reps, the methods interleaved in each repetition. Staging holds
one round (the whole request) unless --staging-mib caps it. Blocks are one contiguous
run per rank (a fresh pool), or --pattern scattered (random ids).

    .venv/bin/python benchmarks/kv_conversion.py                  # CPU, 2048 tokens
    .venv/bin/python benchmarks/kv_conversion.py --device cuda                   # --scatter torch: no Triton
    .venv/bin/python benchmarks/kv_conversion.py --tokens 512 --reps 3 --staging-mib 4 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from kv_transfer import apply_scatter, describe_pair, execute_locally, plan_conversion
from kv_transfer.testing import make_cache, worker_layouts

RESULTS = Path(__file__).parent / "results" / "kv_conversion.json"
GEOMETRY = dict(model_fingerprint="smollm2-135m", total_layers=30, head_dim=64)

# name -> (total_kv_heads, prefill worker, decode worker); a worker: tp, pp, block_size, order
# fmt: off
CASES = {
    "identical": (3, dict(tp=1, pp=1, block_size=16, order="NHD"), dict(tp=1, pp=1, block_size=16, order="NHD")),
    "tp-split 1->2": (4, dict(tp=1, pp=1, block_size=16, order="NHD"), dict(tp=2, pp=1, block_size=16, order="NHD")),
    "tp-split 1->2 HND": (4, dict(tp=1, pp=1, block_size=16, order="HND"),
                          dict(tp=2, pp=1, block_size=16, order="HND")),
    "tp-merge 2->1": (4, dict(tp=2, pp=1, block_size=16, order="NHD"), dict(tp=1, pp=1, block_size=16, order="NHD")),
    "pp-restage 2->3": (3, dict(tp=1, pp=2, block_size=16, order="NHD"), dict(tp=1, pp=3, block_size=16, order="NHD")),
    "reblock 16->32": (3, dict(tp=1, pp=1, block_size=16, order="NHD"), dict(tp=1, pp=1, block_size=32, order="NHD")),
    "reblock 32->8": (3, dict(tp=1, pp=1, block_size=32, order="NHD"), dict(tp=1, pp=1, block_size=8, order="NHD")),
    "NHD->HND": (3, dict(tp=1, pp=1, block_size=16, order="NHD"), dict(tp=1, pp=1, block_size=16, order="HND")),
    "combined": (4, dict(tp=1, pp=1, block_size=16, order="NHD"), dict(tp=2, pp=2, block_size=32, order="HND")),
}
# fmt: on


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def block_table(count: int, num_blocks: int, pattern: str, rng: random.Random) -> list[int]:
    if pattern == "contiguous":
        return list(range(num_blocks - count, num_blocks))
    return rng.sample(range(num_blocks), count)


def check_tokens(src_layouts, src_caches, d, dst_cache, src_blocks, dst_blocks, tokens) -> None:
    """Spot check: a few tokens of every layer and head, by indexing the caches' own shapes."""
    for t in tokens:
        for layer in range(d.layer_start, d.layer_start + d.num_layers):
            for head in range(d.head_start, d.head_start + d.num_kv_heads):
                s_i = next(i for i, s in enumerate(src_layouts)
                           if s.layer_start <= layer < s.layer_start + s.num_layers
                           and s.head_start <= head < s.head_start + s.num_kv_heads)  # fmt: skip
                s = src_layouts[s_i]

                def row(lay, cache, blocks, tok, lay_head):
                    blk, slot = blocks[tok // lay.block_size], tok % lay.block_size
                    li = layer - lay.layer_start
                    idx = (slot, lay_head) if lay.order == "NHD" else (lay_head, slot)
                    return cache[li, :, blk][(slice(None), *idx)]

                want = row(s, src_caches[s_i], src_blocks, t, head - s.head_start)
                got = row(d, dst_cache, dst_blocks, t, head - d.head_start)
                if not torch.equal(want.view(torch.int16), got.view(torch.int16)):
                    raise RuntimeError(f"token {t} layer {layer} head {head} was not converted correctly")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--pattern", choices=["contiguous", "scattered"], default="contiguous")
    ap.add_argument("--staging-mib", type=float, default=0.0, help="cap each rank's staging (0: one round)")
    ap.add_argument(
        "--scatter",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="row-scatter backend (auto: triton on CUDA when it imports)",
    )
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = "cpu" if args.device == "cpu" else "cuda:0"
    n = args.tokens
    print(f"device {device}, {n} tokens, bf16, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    rng = random.Random(0)
    rows = []
    header = (f"{'case':<18} {'kinds':<43} {'ranks':>5} {'deliv MiB':>9} {'read MiB':>8} {'regions':>7} "
              f"{'rounds':>6} {'bind ms':>7} {'convert GB/s':>12} {'copy GB/s':>9} {'ratio':>6} {'scatter GB/s':>12} "
              f"{'backend':>7}")  # fmt: skip
    print(header)
    # each case's buffers, set to None at its end
    src_caches: list[torch.Tensor] | None
    dst_caches: list[torch.Tensor] | None
    stagings: list[torch.Tensor] | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    for name in args.cases.split(","):
        heads, p_shape, d_shape = CASES[name]
        extra = 4

        def worker(shape):
            nb = -(-n // shape["block_size"]) + extra
            return worker_layouts(**GEOMETRY, total_kv_heads=heads, num_blocks=nb, dtype="bfloat16", device=device,
                                  **shape)  # fmt: skip

        src, dst = worker(p_shape), worker(d_shape)
        kinds = describe_pair(src, dst)
        src_blocks = block_table(-(-n // src[0].block_size), src[0].num_blocks, args.pattern, rng)
        dst_blocks = block_table(-(-n // dst[0].block_size), dst[0].num_blocks, args.pattern, rng)
        src_caches = [make_cache(s, seed=i) for i, s in enumerate(src)]
        plans = [plan_conversion(src, d) for d in dst]
        staging_bytes = [p.staging_bytes(n) for p in plans]
        if args.staging_mib:
            staging_bytes = [min(b, int(args.staging_mib * 2**20)) for b in staging_bytes]
        stagings = [torch.zeros(max(b, 1), dtype=torch.uint8, device=device) for b in staging_bytes]
        dst_caches = [make_cache(d) for d in dst]
        rounds = [p.bind(src_blocks, dst_blocks, n, 0, b) for p, b in zip(plans, staging_bytes)]
        delivered = sum(n * 2 * d.num_layers * d.num_kv_heads * d.head_dim * d.itemsize for d in dst)
        read = sum(r.nbytes for rs in rounds for r in rs)
        regions = sum(len(p) for rs in rounds for r in rs for _, p in r.reads)
        a = torch.zeros(delivered, dtype=torch.uint8, device=device)
        b = torch.full((delivered,), 0x5A, dtype=torch.uint8, device=device)

        backend = ["none"]

        def bind():
            for p, sb in zip(plans, staging_bytes):
                p.bind(src_blocks, dst_blocks, n, 0, sb)

        def convert():
            for rs, cache, staging in zip(rounds, dst_caches, stagings):
                used = execute_locally(rs, src_caches, cache, staging, args.scatter)
                backend[0] = used if used != "none" else backend[0]

        def copy():
            a.copy_(b)

        def scatter_only():
            for rs, cache, staging in zip(rounds, dst_caches, stagings):
                for r in rs:
                    if r.scatter is not None:
                        apply_scatter(r.scatter, staging, cache, args.scatter)

        scattered = sum(len(r.scatter.dst_rows) * p.row_bytes for p, rs in zip(plans, rounds) for r in rs
                        if r.scatter is not None)  # fmt: skip

        convert()  # warm-up (and the triton compile), then a correctness spot check
        for d, cache in zip(dst, dst_caches):
            check_tokens(src, src_caches, d, cache, src_blocks, dst_blocks, sorted({0, 1, n // 2, n - 1}))
        best = dict(bind=float("inf"), convert=float("inf"), copy=float("inf"), scatter=float("inf"))
        methods = [("bind", bind), ("convert", convert), ("copy", copy)]
        methods += [("scatter", scatter_only)] if scattered else []
        for _ in range(args.reps):
            for m, fn in methods:
                best[m] = min(best[m], timed(fn, device if m != "bind" else "cpu"))
        gbps = {m: delivered / best[m] / 1e9 for m in ("convert", "copy")}
        gbps["scatter"] = scattered / best["scatter"] / 1e9 if scattered else None
        row = dict(case=name, kinds=kinds, src_ranks=len(src), dst_ranks=len(dst), delivered_bytes=delivered,
                   read_bytes=read, scattered_bytes=scattered, regions=regions, rounds=max(len(r) for r in rounds),
                   staging_bytes=staging_bytes, bind_ms=best["bind"] * 1e3,
                   best_s={m: t for m, t in best.items() if t != float("inf")}, gbps=gbps,
                   ratio=gbps["convert"] / gbps["copy"], scatter=backend[0])  # fmt: skip
        rows.append(row)
        print(f"{name:<18} {','.join(kinds):<43} {f'{len(src)}->{len(dst)}':>5} {delivered / 2**20:>9.1f} "
              f"{read / 2**20:>8.1f} {regions:>7} {row['rounds']:>6} {row['bind_ms']:>7.2f} {gbps['convert']:>12.2f} "
              f"{gbps['copy']:>9.2f} {row['ratio']:>6.2f} {gbps['scatter'] or 0:>12.2f} {backend[0]:>7}")  # fmt: skip
        src_caches = dst_caches = stagings = a = b = (
            None  # free before the next case (a del would hide them from the closures above)
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, tokens=n, reps=args.reps, pattern=args.pattern, scatter=args.scatter,
                                   staging_mib=args.staging_mib, geometry=GEOMETRY,
                                   torch_threads=torch.get_num_threads(), loadavg=os.getloadavg()[0], rows=rows),
                              indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
