"""The native CPU linear kernel against torch, and its fallbacks.

The kernel is built with the host compiler; where none exists the kernel tests
skip and the fallback tests still run (the layers then use torch's matmul).
"""

from __future__ import annotations

import logging
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from engine.model import cpu_kernels
from engine.model.embedding import ParallelLMHead
from engine.model.linear import MergedColumnLinear, QKVLinear

KERNEL = cpu_kernels.cpu_kernels()
needs_kernel = pytest.mark.skipif(
    cpu_kernels._compiler() is None or cpu_kernels.vector_isa() is None,
    reason="no C compiler, or neither AVX-512 nor AVX2 + FMA: the CPU kernels are not used here",
)


@needs_kernel
def test_kernels_build_where_a_compiler_exists():
    """A failed build degrades the engine to torch's ops with a warning; here it is a failure, not a skip."""
    assert KERNEL is not None, "the CPU kernels did not build or load (see the warning logged by cpu_kernels())"


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """cpu_kernels() as on a fresh process, building into an empty cache."""
    monkeypatch.setattr(cpu_kernels, "_kernel", False)
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path))
    yield tmp_path


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "m,k,n", [(1, 576, 1536), (3, 64, 65), (4, 7, 1), (5, 130, 64), (17, 576, 200), (200, 300, 70), (0, 16, 8)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_torch(threads, m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = KERNEL.linear(x, KERNEL.pack(w), bias, n)
    finally:
        torch.set_num_threads(old)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * (k**0.5))


def _assert_batch_invariant(kernel: cpu_kernels.CpuKernels) -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 576, generator=g), torch.randn(200, 576, generator=g)
    packed = kernel.pack(w)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            full = kernel.linear(x, packed, None, 300)  # 200 rows: x interleaved, K in chunks, two row super-groups
            nine = kernel.linear(x[:9], packed, None, 300)
            for i in (0, 1, 2, 5, 8, 97, 150, 199):
                one = kernel.linear(x[i : i + 1], packed, None, 300)[0]  # one row: x read in place, K in one pass
                assert torch.equal(one, full[i])
                if i < 9:
                    assert torch.equal(one, nine[i])
    finally:
        torch.set_num_threads(old)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 3), (31, 5), (32, 7), (65, 9), (200, 37)])
def test_pack_layout(n, k, dtype):
    """packed[b][k][j] = W[b * B + j][k], zero past N; the same from W [N, K] and from a contiguous W^T [K, N]."""
    w = torch.randn(n, k).to(dtype)
    blk = KERNEL.block
    nb = -(-n // blk)
    ref = torch.zeros(nb * blk, k, dtype=dtype)
    ref[:n] = w
    ref = torch.stack([ref[b * blk : (b + 1) * blk].t() for b in range(nb)])
    assert torch.equal(KERNEL.pack(w), ref)
    assert torch.equal(KERNEL.pack_t(w.t().contiguous()), ref)


@needs_kernel
def test_packed_linear_is_batch_invariant():
    """A row's result does not depend on the other rows of the batch or on the thread count: every path (one
    row, a group of 6, x interleaved and K in chunks) sums each output in k order with fused multiply-adds."""
    _assert_batch_invariant(KERNEL)


def _isa_marches() -> list:
    have = cpu_kernels.vector_isa()
    return [
        pytest.param(
            march,
            block,
            marks=pytest.mark.skipif(
                cpu_kernels._compiler() is None or have is None or (isa == "avx512" and have != "avx512"),
                reason=f"this CPU cannot run the {isa} build (or no C compiler)",
            ),
        )
        for march, isa, block in (("x86-64-v3", "avx2", 32), ("x86-64-v4", "avx512", 64))
    ]


@pytest.mark.parametrize("march,block", _isa_marches())
def test_each_isa_build_matches_torch(march, block, tmp_path, monkeypatch):
    """The AVX2 build (8 lanes) and the AVX-512 one (16 lanes), each where this CPU runs it: on an AVX-512 host
    both, so the variant that AVX2-only machines use is checked there too."""
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path))
    cc = cpu_kernels._compiler()
    assert cc is not None
    kernel = cpu_kernels.CpuKernels(cpu_kernels._build(cc, march))
    assert kernel.block == block
    g = torch.Generator().manual_seed(1)
    for m, k, n, dtype in (
        (1, 576, 200, torch.float32),
        (4, 130, 65, torch.float32),
        (50, 300, 70, torch.float32),
        (3, 130, 65, torch.bfloat16),
        (30, 200, 33, torch.bfloat16),
    ):
        w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        y = kernel.linear(x.to(dtype), kernel.pack(w.to(dtype)), b.to(dtype), n)
        ref = F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
        tol = dict(rtol=1e-5, atol=1e-4 * k**0.5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6 * k**0.5)
        torch.testing.assert_close(y.double(), ref, **tol)
    x = torch.randn(5, 100, generator=g)
    wn = torch.randn(100, generator=g)
    ref = F.rms_norm(x, (100,), wn, eps=1e-5)
    torch.testing.assert_close(kernel.rms_norm(x, wn, 1e-5), ref, rtol=1e-5, atol=1e-5)
    _assert_batch_invariant(kernel)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v4"])
def test_the_source_compiles_for_each_isa(march, tmp_path):
    """Both vector widths compile on any x86 host with gcc, whichever one this CPU runs."""
    cc = cpu_kernels._compiler()
    if (
        platform.machine() != "x86_64"
        or cc is None
        or "gcc" not in subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.lower()
    ):
        pytest.skip("needs gcc (x86-64-v3/v4 -march names)")
    out = tmp_path / "k.o"
    proc = subprocess.run(
        [
            cc,
            "-O1",
            f"-march={march}",
            "-fopenmp",
            "-fPIC",
            "-Wall",
            "-Werror",
            "-c",
            str(cpu_kernels.SOURCE),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@needs_kernel
def test_layers_use_the_kernel_and_keep_their_outputs():
    """QKV (with bias), a merged gate|up and the LM head: same outputs as the unpacked weight through F.linear."""
    g = torch.Generator().manual_seed(1)
    qkv = QKVLinear(64, 16, 4, 2, bias=True, dtype=torch.float32, device="cpu")
    merged = MergedColumnLinear(64, [96, 96], dtype=torch.float32, device="cpu")
    head = ParallelLMHead(1000, 64, dtype=torch.float32, device="cpu")
    x = torch.randn(3, 64, generator=g)
    for layer in (qkv, merged, head):
        layer.weight.data.normal_(generator=g)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.data.normal_(generator=g)
        ref = F.linear(x, layer.weight.data.clone(), None if bias is None else bias.data.clone())
        layer.finalize()
        assert layer._kernel is not None
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4)


def test_disabled_by_env_falls_back_to_torch(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "0")
    assert cpu_kernels.cpu_kernels() is None
    layer = MergedColumnLinear(32, [16, 16], dtype=torch.float32, device="cpu")
    layer.weight.data.normal_()
    ref = F.linear(torch.ones(2, 32), layer.weight.data.clone())
    layer.finalize()
    assert layer._kernel is None and layer._weight_t is not None
    torch.testing.assert_close(layer(torch.ones(2, 32)), ref)


def test_broken_compiler_is_a_warning_not_an_error(fresh_kernel_state, monkeypatch, caplog, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'fakecc: no' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "avx512f avx512bw")  # a build is tried on any CPU
    with caplog.at_level(logging.WARNING, logger="engine.model.cpu_kernels"):
        assert cpu_kernels.cpu_kernels() is None
    assert "using torch's ops" in caplog.text and "fakecc: no" in caplog.text
    assert not list(fresh_kernel_state.glob("*.so*"))  # nothing half-written left in the cache


@needs_kernel
def test_cache_key_is_per_source_and_reused(fresh_kernel_state):
    k1 = cpu_kernels.cpu_kernels()
    built = sorted(p.name for p in fresh_kernel_state.iterdir())
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so")
    cpu_kernels._kernel = False
    k2 = cpu_kernels.cpu_kernels()
    assert k2.path == k1.path  # the second process reuses the build


@needs_kernel
def test_linear_residual_is_added_after_the_product():
    g = torch.Generator().manual_seed(2)
    w, x, b, r = (
        torch.randn(70, 40, generator=g),
        torch.randn(3, 40, generator=g),
        torch.randn(70, generator=g),
        torch.randn(3, 70, generator=g),
    )
    plain = KERNEL.linear(x, KERNEL.pack(w), b, 70)
    assert torch.equal(KERNEL.linear(x, KERNEL.pack(w), b, 70, residual=r), r + plain)


@needs_kernel
@pytest.mark.parametrize("t", [1, 5, 33])
def test_rms_norm_silu_mul_and_rope_match_torch(t):
    g = torch.Generator().manual_seed(t)
    x, w = torch.randn(t, 576, generator=g), torch.randn(576, generator=g)
    torch.testing.assert_close(KERNEL.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    gu = torch.randn(t, 2 * 96, generator=g)
    torch.testing.assert_close(KERNEL.silu_mul(gu), F.silu(gu[:, :96]) * gu[:, 96:], rtol=1e-5, atol=1e-6)
    from engine.model.rope import apply_rope

    heads, d, row = 5, 64, 7 * 64  # rope on the first 5 heads of a 7-head row (q and k of a fused qkv)
    qkv = torch.randn(t, row, generator=g)
    ang = torch.rand(t, d // 2, generator=g) * 6
    ref = apply_rope(qkv[:, : heads * d].view(t, heads, d), ang.cos().unsqueeze(1), ang.sin().unsqueeze(1))
    out = qkv.clone()
    KERNEL.rope_(out, heads, ang.cos().contiguous(), ang.sin().contiguous())
    torch.testing.assert_close(out[:, : heads * d].view(t, heads, d), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, heads * d :], qkv[:, heads * d :])  # the v part is untouched


@needs_kernel
@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("lens", [[1], [5, 16, 17, 300], [600, 2]])
@pytest.mark.parametrize(
    "heads,kv_heads,d",
    # query heads per KV head 3 (SmolLM2), 1, 4 and 8 (tiles of 3 on AVX2, 6 on AVX-512, and their remainders);
    # head dims in whole 4-vector blocks, with one-vector remainders (80), and with a scalar tail (36)
    [(6, 2, 32), (9, 3, 64), (2, 2, 128), (8, 2, 80), (16, 2, 36)],
)
def test_paged_decode_attention_matches_sdpa_over_gathered_blocks(order, lens, heads, kv_heads, d):
    """Random block tables over a shared cache, contexts shorter and longer than one scratch chunk (256)."""
    g = torch.Generator().manual_seed(sum(lens) + d)
    bs, nb = 16, 96
    shape = (nb, bs, kv_heads, d) if order == "NHD" else (nb, kv_heads, bs, d)
    ck, cv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    b = len(lens)
    max_blocks = -(-max(lens) // bs)
    table = torch.stack([torch.randperm(nb, generator=g)[:max_blocks] for _ in range(b)])
    row = (heads + 2 * kv_heads) * d
    q_rows = torch.randn(b, row, generator=g)
    strides = (
        (ck.stride(0), ck.stride(1), ck.stride(2)) if order == "NHD" else (ck.stride(0), ck.stride(2), ck.stride(1))
    )
    out = KERNEL.paged_decode_attention(
        q_rows, ck, cv, strides, table, torch.tensor(lens), bs, heads, kv_heads, d, d**-0.5
    )
    for i, n in enumerate(lens):
        blocks = table[i, : -(-n // bs)]
        if order == "NHD":
            k = ck[blocks].reshape(-1, kv_heads, d)[:n].transpose(0, 1)
            v = cv[blocks].reshape(-1, kv_heads, d)[:n].transpose(0, 1)
        else:
            k = ck[blocks].transpose(0, 1).reshape(kv_heads, -1, d)[:, :n]
            v = cv[blocks].transpose(0, 1).reshape(kv_heads, -1, d)[:, :n]
        q = q_rows[i, : heads * d].view(heads, 1, d)
        ref = F.scaled_dot_product_attention(
            q, k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0), scale=d**-0.5
        )
        torch.testing.assert_close(out[i].view(heads, d), ref.view(heads, d), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (5, 64, 65), (7, 130, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_rounds_once_like_onednn(m, k, n, with_bias):
    """bf16 in, bf16 out: the float32 sum of bf16 products, plus the bias, rounded once to bf16."""
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    r = torch.randn(m, n, generator=g).bfloat16()
    y = KERNEL.linear(x, KERNEL.pack(w), bias, n)
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert y.dtype == torch.bfloat16
    # one rounding of a float32 sum: within a bf16 half-ulp of the exact value, plus float32 summation error
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-4 * k**0.5)
    # the residual is added to the rounded product and rounded again, as `r + linear(x)` in bf16
    assert torch.equal(KERNEL.linear(x, KERNEL.pack(w), bias, n, residual=r), r + y)


@needs_kernel
def test_bf16_layers_use_the_kernel_only_for_decode_sized_batches():
    from engine.model.linear import BF16_KERNEL_MAX_ROWS

    g = torch.Generator().manual_seed(3)
    layer = MergedColumnLinear(64, [96, 96], dtype=torch.bfloat16, device="cpu")
    layer.weight.data.copy_(torch.randn(192, 64, generator=g))
    layer.finalize()
    assert layer._kernel is not None and layer.weight.shape == (192, 64)  # oneDNN's layout kept for big batches
    small = torch.randn(BF16_KERNEL_MAX_ROWS, 64, generator=g).bfloat16()
    big = torch.randn(BF16_KERNEL_MAX_ROWS + 1, 64, generator=g).bfloat16()
    assert torch.equal(layer(small), KERNEL.linear(small, layer._packed, None, 192))
    assert torch.equal(layer(big), F.linear(big, layer.weight))


@needs_kernel
@pytest.mark.parametrize("lanes", [8, 16])
def test_f32_layers_by_vector_width(lanes, monkeypatch):
    """AVX2 (8 lanes): the packed kernel up to F32_AVX2_KERNEL_MAX_ROWS rows, oneDNN over an [in, out] copy above
    (faster there); AVX-512 (16 lanes): the packed copy alone, at every size. The LM head follows the same rule."""
    from engine.model.linear import F32_AVX2_KERNEL_MAX_ROWS

    monkeypatch.setattr(KERNEL, "lanes", lanes)
    g = torch.Generator().manual_seed(4)
    full = torch.randn(192, 64, generator=g)
    layer = MergedColumnLinear(64, [96, 96], dtype=torch.float32, device="cpu")
    layer.weight.data.copy_(full)
    head = ParallelLMHead(192, 64, dtype=torch.float32, device="cpu")
    head.weight.data.copy_(full)
    layer.finalize()
    head.finalize()
    small = torch.randn(F32_AVX2_KERNEL_MAX_ROWS, 64, generator=g)
    big = torch.randn(F32_AVX2_KERNEL_MAX_ROWS + 1, 64, generator=g)
    packed = KERNEL.linear(big, layer._packed, None, 192)
    assert torch.equal(layer(small), KERNEL.linear(small, layer._packed, None, 192))
    assert torch.equal(head(small), layer(small))
    if lanes == 8:
        assert layer._weight_t is not None and torch.equal(layer.weight, full)
        assert torch.equal(layer(big), big @ layer._weight_t)
        assert torch.equal(head(big), F.linear(big, full))
    else:
        assert layer._weight_t is None and layer.weight.numel() == 0  # one copy of the weights: the packed one
        assert torch.equal(layer(big), packed) and torch.equal(head(big), packed)


@needs_kernel
@pytest.mark.parametrize("t", [1, 33])
def test_bf16_layer_ops_match_torchs_bf16_path(t):
    """RMSNorm and SiLU * up round where torch's bf16 path rounds (equal); rope and attention round once (close)."""
    from engine.model.llama import RMSNorm
    from engine.model.rope import apply_rope

    g = torch.Generator().manual_seed(t)
    norm = RMSNorm(576, 1e-5, dtype=torch.bfloat16, device="cpu")
    norm.weight.data.copy_(torch.randn(576, generator=g))
    x = torch.randn(t, 576, generator=g).bfloat16()
    torch.testing.assert_close(KERNEL.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=2**-7, atol=1e-6)
    gu = torch.randn(t, 2 * 96, generator=g).bfloat16()
    torch.testing.assert_close(KERNEL.silu_mul(gu), F.silu(gu[:, :96]) * gu[:, 96:], rtol=2**-7, atol=1e-6)
    heads, d, row = 5, 64, 7 * 64
    qkv = torch.randn(t, row, generator=g).bfloat16()
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    ref = apply_rope(qkv[:, : heads * d].view(t, heads, d), cos.unsqueeze(1), sin.unsqueeze(1))
    out = qkv.clone()
    KERNEL.rope_(out, heads, cos, sin)
    torch.testing.assert_close(out[:, : heads * d].view(t, heads, d), ref, rtol=2**-6, atol=2e-2)


@needs_kernel
def test_bf16_paged_decode_attention_is_close_to_sdpa():
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, d, bs, nb, n = 6, 2, 64, 16, 40, 300
    ck, cv = (
        torch.randn(nb, bs, kv_heads, d, generator=g).bfloat16(),
        torch.randn(nb, bs, kv_heads, d, generator=g).bfloat16(),
    )
    table = torch.randperm(nb, generator=g)[: -(-n // bs)].unsqueeze(0)
    q_rows = torch.randn(1, (heads + 2 * kv_heads) * d, generator=g).bfloat16()
    out = KERNEL.paged_decode_attention(
        q_rows,
        ck,
        cv,
        (ck.stride(0), ck.stride(1), ck.stride(2)),
        table,
        torch.tensor([n]),
        bs,
        heads,
        kv_heads,
        d,
        d**-0.5,
    )
    k = ck[table[0]].reshape(-1, kv_heads, d)[:n].transpose(0, 1).float().repeat_interleave(3, 0)
    v = cv[table[0]].reshape(-1, kv_heads, d)[:n].transpose(0, 1).float().repeat_interleave(3, 0)
    ref = F.scaled_dot_product_attention(q_rows[0, : heads * d].float().view(heads, 1, d), k, v, scale=d**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().view(heads, d), ref.view(heads, d), rtol=2**-7, atol=2**-8)


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
    """q [T, heads, d] at positions context - T ..; k, v [context, kv_heads, d] -> [T, heads * d] (float32 SDPA)."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    visible = torch.arange(context)[None, :] <= torch.arange(context - t, context)[:, None]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
        v.float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
        attn_mask=visible,
        scale=d**-0.5,
    )
    return out.transpose(0, 1).reshape(t, heads * d)


@needs_kernel
@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize(
    "q_len,context",
    # a fresh prompt (context = q_len) from one token to more than two key chunks (64); a chunk after a prefix
    # (a cache hit or an earlier chunk), starting inside a block or on its edge; one token after a long prefix
    [(1, 1), (7, 7), (130, 130), (37, 100), (64, 200), (16, 48), (1, 300), (200, 201)],
)
@pytest.mark.parametrize(
    "heads,kv_heads,d",
    # query heads per KV head 3 (SmolLM2: tiles of 16 or 32 rows hold no whole number of positions), 1, 4, 8;
    # head dims in whole passes of the value product (6 or 12), and with remainders
    [(9, 3, 64), (2, 2, 128), (8, 2, 80), (16, 2, 36), (4, 1, 20)],
)
def test_paged_prefill_attention_matches_causal_sdpa(order, q_len, context, heads, kv_heads, d):
    """The chunk's context read from random blocks of a shared cache, in place, against SDPA with the causal mask
    shifted by the context before the chunk."""
    g = torch.Generator().manual_seed(q_len * 1000 + context + d)
    bs, nb = 16, 40
    shape = (nb, bs, kv_heads, d) if order == "NHD" else (nb, kv_heads, bs, d)
    ck, cv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    blocks = torch.randperm(nb, generator=g)[: -(-context // bs)]
    if order == "NHD":
        k, v = (c[blocks].reshape(-1, kv_heads, d)[:context] for c in (ck, cv))
        strides = (ck.stride(0), ck.stride(1), ck.stride(2))
    else:
        k, v = (c[blocks].transpose(1, 2).reshape(-1, kv_heads, d)[:context] for c in (ck, cv))
        strides = (ck.stride(0), ck.stride(2), ck.stride(1))
    q = torch.randn(q_len, heads, d, generator=g)
    out = KERNEL.paged_prefill_attention(q, ck, cv, strides, blocks, bs, context, kv_heads, d**-0.5)
    torch.testing.assert_close(out, _causal_reference(q, k, v, context), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_attention_reads_a_fresh_prompts_rows_of_the_fused_qkv(dtype):
    """A fresh prompt: q, k and v are column slices of one [T, (heads + 2 kv_heads) d] row each (the layer's qkv),
    passed as one block; the result does not depend on the thread count."""
    g = torch.Generator().manual_seed(3)
    t, heads, kv_heads, d = 150, 9, 3, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    one = torch.zeros(1, dtype=torch.int64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(
                KERNEL.paged_prefill_attention(q, k, v, (0, k.stride(0), k.stride(1)), one, t, t, kv_heads, 0.125)
            )
    finally:
        torch.set_num_threads(threads)
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-8}
    torch.testing.assert_close(outs[0].float(), _causal_reference(q, k, v, t), **tol)


@needs_kernel
def test_paged_prefill_attention_rejects_what_it_cannot_read():
    q = torch.randn(4, 6, 32)
    ck = torch.randn(8, 16, 2, 32)
    strides = (ck.stride(0), ck.stride(1), ck.stride(2))
    with pytest.raises(ValueError, match="must cover it"):  # 4 queries after 36 tokens: 40 > 2 blocks of 16
        KERNEL.paged_prefill_attention(q, ck, ck, strides, torch.tensor([0, 1]), 16, 40, 2, 0.1)
    with pytest.raises(ValueError, match="at least as many"):
        KERNEL.paged_prefill_attention(q, ck, ck, strides, torch.tensor([0]), 16, 3, 2, 0.1)
    with pytest.raises(ValueError, match="same dtype"):
        KERNEL.paged_prefill_attention(q.bfloat16(), ck, ck, strides, torch.tensor([0]), 16, 4, 2, 0.1)


def test_cpus_without_avx2_fma_keep_torchs_ops(fresh_kernel_state, monkeypatch):
    """The kernels need 8-lane FMA (AVX2) or 16-lane (AVX-512) vectors; an AVX-only CPU keeps torch's ops."""
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "fpu sse2 avx f16c")
    assert cpu_kernels.cpu_kernels() is None
    assert not list(fresh_kernel_state.iterdir())  # nothing was built


def test_vector_isa_follows_the_cpu_flags():
    assert cpu_kernels.vector_isa("fpu sse2 avx avx2 fma avx512f avx512bw") == "avx512"
    assert cpu_kernels.vector_isa("fpu sse2 avx avx2 fma") == "avx2"
    assert cpu_kernels.vector_isa("fpu sse2 avx avx2") is None  # AVX2 without FMA (no such CPU ships, but)
    assert cpu_kernels.vector_isa("fp asimd evtstrm aes") is None  # aarch64: torch's ops
