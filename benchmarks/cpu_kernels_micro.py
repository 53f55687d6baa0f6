"""The native CPU kernels alone against torch's ops, on SmolLM2's shapes (issue 17's kernel figures).

linear     x [M, K] times every weight of a 540 MB (float32) / 270 MB (bf16) set of SmolLM2-shaped weights,
           so that the weights come from memory, not cache: the kernel over packed weights, `x @ W[in, out]`
           and `F.linear(x, W[out, in])`; microseconds per call for the 576x3072 (gate|up) and 1536x576
           (down) shapes, and read GB/s over the whole set at M = 1
attention  decode attention, 9 query / 3 KV heads of 64, over random blocks of a paged cache: the kernel
           (in place) against the torch path (block gather + SDPA, engine/model/attention.py)

.venv/bin/python benchmarks/cpu_kernels_micro.py --threads 1
.venv/bin/python benchmarks/cpu_kernels_micro.py --threads 2 --dtype bfloat16
# another build of the same source, e.g. the AVX2 variant on an AVX-512 CPU:
gcc -O3 -march=x86-64-v3 -fopenmp -fPIC -shared engine/model/csrc/cpu_kernels.c -o /tmp/v3.so
.venv/bin/python benchmarks/cpu_kernels_micro.py --lib /tmp/v3.so --only linear
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.kv_cache import KVOrder  # noqa: E402
from engine.model import cpu_kernels  # noqa: E402
from engine.model.attention import DecodeGroup, _decode_attention  # noqa: E402

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (K, N) of qkv, o, gate|up, down


def per_call_us(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def bench_linear(k, dtype: torch.dtype) -> None:
    elem = torch.empty((), dtype=dtype).element_size()
    layer_bytes = sum(kk * n for kk, n in SHAPES) * elem
    sets = max(1, (540_000_000 // 4 * elem) // layer_bytes)  # as many layers as SmolLM2's weights take
    weights = [[torch.randn(n, kk).to(dtype) for kk, n in SHAPES] for _ in range(sets)]
    packed = [[k.pack(w) for w in layer] for layer in weights]
    trans = [[w.t().contiguous() for w in layer] for layer in weights]
    total = sets * layer_bytes

    def sweep(call, m: int) -> float:
        xs = {kk: torch.randn(m, kk).to(dtype) for kk, _ in SHAPES}
        for i in range(sets):  # warm
            for j, (kk, n) in enumerate(SHAPES):
                call(xs[kk], i, j, n)
        t = time.perf_counter()
        for i in range(sets):
            for j, (kk, n) in enumerate(SHAPES):
                call(xs[kk], i, j, n)
        return time.perf_counter() - t

    forms = {
        "kernel": lambda x, i, j, n: k.linear(x, packed[i][j], None, n),
        "x @ W[in,out]": lambda x, i, j, n: x @ trans[i][j],
        "F.linear": lambda x, i, j, n: F.linear(x, weights[i][j]),
    }
    print(f"\nlinear, {dtype}, {torch.get_num_threads()} thread(s), {total / 1e6:.0f} MB of weights")
    print(
        "M=1 read GB/s over the whole set: "
        + ", ".join(f"{name} {total / sweep(f, 1) / 1e9:.1f}" for name, f in forms.items())
    )
    for kk, n in ((576, 3072), (1536, 576)):
        w = weights[0][SHAPES.index((kk, n))]
        wp, wt = k.pack(w), w.t().contiguous()
        cells = []
        for m in (1, 4, 8, 16, 32, 64, 512):
            x = torch.randn(m, kk).to(dtype)
            reps = 5 if m == 512 else 20
            cells.append(
                f"M={m}: kernel {per_call_us(lambda: k.linear(x, wp, None, n), reps):.0f} / "
                f"x@W {per_call_us(lambda: x @ wt, reps):.0f} / "
                f"F.linear {per_call_us(lambda: F.linear(x, w), reps):.0f}"
            )
        print(f"  {kk}x{n} (us per call, one weight, in cache): " + "; ".join(cells))


def bench_attention(k, dtype: torch.dtype) -> None:
    heads, kv_heads, d, bs, nb = 9, 3, 64, 16, 2000
    ck, cv = torch.randn(nb, bs, kv_heads, d).to(dtype), torch.randn(nb, bs, kv_heads, d).to(dtype)
    strides = (ck.stride(0), ck.stride(1), ck.stride(2))
    print(f"\ndecode attention, {dtype}, {torch.get_num_threads()} thread(s), 9/3 heads of 64, NHD blocks of 16")
    for b, n in ((1, 286), (1, 1024), (16, 300), (64, 600)):
        nbk = -(-n // bs)
        table = torch.stack([torch.randperm(nb)[:nbk] for _ in range(b)])
        lens = torch.full((b,), n)
        q = torch.randn(b, (heads + 2 * kv_heads) * d).to(dtype)
        mask = (torch.arange(nbk * bs)[None, :] < lens[:, None]).view(b, 1, 1, -1)
        group = DecodeGroup(0, b, table, mask, lens)
        qv = q[:, : heads * d].view(b, heads, d)
        kern = per_call_us(
            lambda: k.paged_decode_attention(q, ck, cv, strides, table, lens, bs, heads, kv_heads, d, d**-0.5), 50
        )
        ref = per_call_us(lambda: _decode_attention(qv, ck, cv, group, KVOrder.NHD, d**-0.5, kv_heads), 50)
        print(f"  batch {b} x {n} tokens: kernel {kern:.1f} us, gather + SDPA {ref:.1f} us ({ref / kern:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lib", default=None, help="a built cpu_kernels library (default: the engine's own build)")
    p.add_argument("--only", choices=["linear", "attention"], default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    k = cpu_kernels.CpuKernels(Path(a.lib)) if a.lib else cpu_kernels.cpu_kernels()
    if k is None:
        raise SystemExit("the CPU kernels are not available here (see the warning above)")
    dtype = getattr(torch, a.dtype)
    if a.only in (None, "linear"):
        bench_linear(k, dtype)
    if a.only in (None, "attention"):
        bench_attention(k, dtype)


if __name__ == "__main__":
    main()
