"""The native CPU kernels alone against torch's ops, on SmolLM2's shapes (issue 17's kernel figures).

linear     x [M, K] times every weight of a 540 MB (float32) / 270 MB (bf16) set of SmolLM2-shaped weights,
           so that the weights come from memory, not cache: the kernel over packed weights, `x @ W[in, out]`
           and `F.linear(x, W[out, in])`; microseconds per call for the 576x3072 (gate|up) and 1536x576
           (down) shapes, and read GB/s over the whole set at M = 1
attention  decode attention, 9 query / 3 KV heads of 64, over random blocks of a paged cache: the kernel
           (in place) against the torch path (block gather + SDPA, engine/model/attention.py); then prefill
           attention of a fresh prompt read from the fused qkv rows (the layer's layout), the causal kernel
           against SDPA with is_causal, and of a chunk after a cached prefix, the kernel over the context
           blocks in place against the gather + shifted mask + SDPA of the torch path

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
from engine.model.attention import (  # noqa: E402
    AttentionMetadata,  # noqa: E402
    DecodeGroup,
    PrefillChunk,
    _decode_attention,
    paged_attention,
)

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


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def bench_prefill_attention(k, dtype: torch.dtype) -> None:
    heads, kv_heads, d, bs = 9, 3, 64, 16
    row = (heads + 2 * kv_heads) * d
    print(f"\nprefill attention, {dtype}, {torch.get_num_threads()} thread(s), 9/3 heads of 64, medians of 15 calls")
    for t in (128, 512, 1024):  # a fresh prompt: its own K/V rows in the fused qkv, passed as one block
        qkv = torch.randn(t, row).to(dtype)
        q = qkv[:, : heads * d].view(t, heads, d)
        kr = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
        vr = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
        one = torch.zeros(1, dtype=torch.int64)

        def sdpa(q=q, kr=kr, vr=vr):
            qc, kc, vc = (x.transpose(0, 1).unsqueeze(0) for x in (q, kr, vr))  # as engine/model/attention.py calls it
            return F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=d**-0.5, enable_gqa=True)

        kern = median_ms(
            lambda q=q, kr=kr, vr=vr, t=t, one=one: k.paged_prefill_attention(
                q, kr, vr, (0, kr.stride(0), kr.stride(1)), one, t, t, kv_heads, d**-0.5
            ),
            15,
        )
        ref = median_ms(sdpa, 15)
        print(f"  fresh {t} tokens: kernel {kern:.2f} ms, SDPA is_causal {ref:.2f} ms ({ref / kern:.2f}x)")
    nb = 400
    ck, cv = torch.randn(nb, bs, kv_heads, d).to(dtype), torch.randn(nb, bs, kv_heads, d).to(dtype)
    for prefix, t in ((512, 64), (1024, 256)):  # a chunk after a cached prefix: the context blocks in place
        ctx = prefix + t
        blocks = torch.randperm(nb)[: -(-ctx // bs)]
        qkv = torch.randn(t, row).to(dtype)
        q = qkv[:, : heads * d].view(t, heads, d)
        kr = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
        vr = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
        mask = torch.arange(ctx)[None, :] <= torch.arange(prefix, ctx)[:, None]
        md = AttentionMetadata(
            torch.zeros(t, dtype=torch.long),
            torch.zeros(t, dtype=torch.long),
            torch.zeros(t, dtype=torch.long),
            0,
            prefills=[PrefillChunk(0, t, ctx, blocks, mask)],
        )

        def run(kernels, q=q, kr=kr, vr=vr, md=md):
            return paged_attention(q, kr, vr, ck, cv, md, KVOrder.NHD, d**-0.5, kernels=kernels, q_rows=qkv)

        kern = median_ms(lambda: run(k), 15)
        ref = median_ms(lambda: run(None), 15)
        print(
            f"  {t} tokens after {prefix}: kernel {kern:.2f} ms, gather + mask + SDPA {ref:.2f} ms ({ref / kern:.2f}x)"
        )


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
        bench_prefill_attention(k, dtype)


if __name__ == "__main__":
    main()
