"""Paged attention on CUDA: the Triton kernels (reading blocks in place) against the gather path (copy the
blocks, then SDPA), side by side in one process, for decode batches and prefill chunks after a prefix.

    python benchmarks/paged_attention.py [--dtype bfloat16] [--out benchmarks/results/paged_attention]

Prints a table (median microseconds per call, CUDA events, after warm-up) and writes `summary.json`.
Geometry: SmolLM2-135M's attention (9 query heads, 3 KV heads, head dim 64) by default; --heads,
--kv-heads and --head-dim change it. Needs a CUDA device (on CPU the kernels only run in Triton's
interpreter, which says nothing about speed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kv_cache import KVOrder  # noqa: E402
from engine.model.attention import DecodeGroup, _decode_attention, _gather  # noqa: E402


def _time(fn, reps: int) -> float:
    """Median microseconds of one call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--order", default="NHD", choices=["NHD", "HND"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/paged_attention")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_attention.py: needs a CUDA device (see the docstring)", file=sys.stderr)
        return 2
    from engine.model import triton_attention as kernels

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    order = KVOrder[args.order]
    nhd = order is KVOrder.NHD
    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    scale = 1 / math.sqrt(d)
    rows_out = []

    def cache(num_blocks: int):
        shape = (num_blocks, bs, kvh, d) if nhd else (num_blocks, kvh, bs, d)
        return torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype)

    print(f"{'case':<28}{'gather us':>12}{'triton us':>12}{'gather/triton':>15}")
    for batch in (1, 8, 32, 128):
        for ctx in (256, 2048):
            nblk = -(-ctx // bs)
            ck, cv = cache(batch * nblk + 1)
            table = torch.randperm(batch * nblk, device=dev).view(batch, nblk)
            lens = torch.full((batch,), ctx, device=dev)
            mask = (torch.arange(nblk * bs, device=dev)[None, :] < lens[:, None]).view(batch, 1, 1, -1)
            group = DecodeGroup(0, batch, table, mask, lens)
            q = torch.randn(batch, h, d, device=dev, dtype=dtype)
            t_gather = _time(lambda: _decode_attention(q, ck, cv, group, order, scale, kvh), args.reps)
            t_triton = _time(lambda: kernels.paged_decode(q, ck, cv, table, lens, scale, nhd), args.reps)
            case = f"decode b={batch} ctx={ctx}"
            rows_out.append({"case": case, "gather_us": t_gather, "triton_us": t_triton})
            print(f"{case:<28}{t_gather:>12.1f}{t_triton:>12.1f}{t_gather / t_triton:>14.2f}x")
    for before, q_len in ((512, 512), (1536, 512), (4096, 256)):
        ctx = before + q_len
        nblk = -(-ctx // bs)
        ck, cv = cache(nblk + 1)
        blocks = torch.randperm(nblk, device=dev)
        q = torch.randn(q_len, h, d, device=dev, dtype=dtype)
        causal = torch.ones(q_len, ctx, dtype=torch.bool, device=dev).tril(before)

        def gathered():
            kd = _gather(ck, blocks, order)[:, :ctx][None]
            vd = _gather(cv, blocks, order)[:, :ctx][None]
            return F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kd, vd, attn_mask=causal, scale=scale, enable_gqa=h != kvh
            )

        t_gather = _time(gathered, args.reps)
        t_triton = _time(lambda: kernels.paged_prefill(q, ck, cv, blocks, ctx, scale, nhd), args.reps)
        case = f"prefill {q_len} after {before}"
        rows_out.append({"case": case, "gather_us": t_gather, "triton_us": t_triton})
        print(f"{case:<28}{t_gather:>12.1f}{t_triton:>12.1f}{t_gather / t_triton:>14.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows_out}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
