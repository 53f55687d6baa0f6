"""engine/model/triton_attention.py against a dense reference: random block tables, both cache orders, GQA,
block sizes below and above a tile, prefix hits and chunked prefill. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py: the same kernel code, executed with numpy); with one,
compiled, in float32 here and bfloat16 in the `gpu` test."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (requirements/test.txt pins it)")

from engine.model import triton_attention as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
# CPU tensors through the kernels need the interpreter, which a CUDA host does not run (tests/conftest.py)
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need Triton's interpreter")


def _cache(num_blocks: int, bs: int, kv_heads: int, dim: int, nhd: bool, dtype, device: str):
    shape = (num_blocks, bs, kv_heads, dim) if nhd else (num_blocks, kv_heads, bs, dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def _dense(cache: torch.Tensor, blocks: torch.Tensor, n: int, nhd: bool) -> torch.Tensor:
    """[n, kv_heads, dim] of the first n positions through `blocks`."""
    g = cache[blocks.long()]
    g = g if nhd else g.transpose(1, 2)  # -> [blocks, bs, heads, dim]
    return g.reshape(-1, *g.shape[2:])[:n]


def _reference(q, k, v, q_pos) -> torch.Tensor:
    """q: [m, heads, dim]; k, v: [n, kv_heads, dim]; query i sees keys 0..q_pos[i]; in float64."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), k) / math.sqrt(q.shape[-1])
    keys = torch.arange(k.shape[0], device=q.device)
    s = s.masked_fill(keys[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


CASES = [  # (block size, heads, kv heads, dim, order)
    (4, 6, 2, 64, True),
    (16, 4, 4, 40, False),  # dim padded to 64, HND
    (32, 8, 1, 32, True),  # one KV head for all (MQA)
    (16, 9, 3, 16, False),
]


def _decode_case(module, bs, heads, kv_heads, dim, nhd, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, 5, bs, bs + 1, 3 * bs + 2, 70])
    max_blocks = -(-int(lens.max()) // bs)
    num_blocks = len(lens) * max_blocks + 3
    ck, cv = _cache(num_blocks, bs, kv_heads, dim, nhd, dtype, device)
    table = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    table, lens = table.int().to(device), lens.to(device)
    q = torch.randn(len(lens), heads, dim, dtype=dtype, device=device)
    got = module.paged_decode(q, ck, cv, table, lens, 1 / math.sqrt(dim), nhd=nhd, block_n=16)
    for r in range(len(lens)):
        n = int(lens[r])
        k, v = _dense(ck, table[r], n, nhd), _dense(cv, table[r], n, nhd)
        want = _reference(q[r : r + 1], k, v, torch.tensor([n - 1], device=device))
        yield got[r : r + 1], want


def _prefill_case(module, bs, heads, kv_heads, dim, nhd, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    for before, q_len in ((0, 37), (2 * bs, 9), (bs + 3, 1), (5, 40)):  # fresh, prefix hit, one token, mid-block
        context = before + q_len
        n_blocks = -(-context // bs)
        ck, cv = _cache(n_blocks + 4, bs, kv_heads, dim, nhd, dtype, device)
        blocks = torch.randperm(n_blocks + 4, generator=gen)[:n_blocks].int().to(device)
        q = torch.randn(q_len, heads, dim, dtype=dtype, device=device)
        got = module.paged_prefill(q, ck, cv, blocks, context, 1 / math.sqrt(dim), nhd=nhd, block_m=16, block_n=16)
        k, v = _dense(ck, blocks, context, nhd), _dense(cv, blocks, context, nhd)
        yield got, _reference(q, k, v, torch.arange(before, context, device=device))


@pytest.mark.parametrize(("bs", "heads", "kv_heads", "dim", "nhd"), CASES)
def test_decode_reads_the_blocks_in_place(bs, heads, kv_heads, dim, nhd):
    for got, want in _decode_case(kernels, bs, heads, kv_heads, dim, nhd, device=DEVICE):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("bs", "heads", "kv_heads", "dim", "nhd"), CASES)
def test_prefill_after_a_prefix_and_in_chunks(bs, heads, kv_heads, dim, nhd):
    for got, want in _prefill_case(kernels, bs, heads, kv_heads, dim, nhd, device=DEVICE):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("nhd", [True, False])
def test_a_bfloat16_cache(nhd):
    """bf16 loads, fp32 accumulation, bf16 stores (the interpreter's dots run in float32: see the module)."""
    for case in (_decode_case, _prefill_case):
        for got, want in case(kernels, 16, 6, 2, 64, nhd, dtype=torch.bfloat16, device=DEVICE):
            torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_bad_shapes_are_refused():
    ck, cv = _cache(4, 4, 2, 16, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="5 query heads do not group under 2 KV heads"):
        kernels.paged_decode(torch.randn(1, 5, 16), ck, cv, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1), 1.0)
    with pytest.raises(ValueError, match="2 blocks of 4 do not cover a context of 9 tokens"):
        kernels.paged_prefill(torch.randn(9, 2, 16), ck, cv, torch.arange(2, dtype=torch.int32), 9, 1.0)
    with pytest.raises(ValueError, match="a chunk of 9 queries cannot end a context of 4 tokens"):
        kernels.paged_prefill(torch.randn(9, 2, 16), ck, cv, torch.arange(2, dtype=torch.int32), 4, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize(("bs", "heads", "kv_heads", "dim", "nhd"), CASES)
def test_compiled_kernels_in_bfloat16_on_gpu(bs, heads, kv_heads, dim, nhd):
    for case in (_decode_case, _prefill_case):
        for got, want in case(kernels, bs, heads, kv_heads, dim, nhd, dtype=torch.bfloat16, device="cuda"):
            torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@interpreter
def test_the_engine_chooses_the_kernels_by_device_and_setting(monkeypatch):
    from engine.model import attention

    monkeypatch.setattr(attention, "_TRITON", {})
    assert attention.triton_kernels(torch.device("cpu")) is None  # auto: never on CPU
    monkeypatch.setattr(attention, "_TRITON", {})
    monkeypatch.setenv(attention.ATTENTION_ENV, "triton")
    assert attention.triton_kernels(torch.device("cpu")) is kernels  # forced: self-checked, then used
    monkeypatch.setattr(attention, "_TRITON", {})
    monkeypatch.setenv(attention.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="TANDEM_PAGED_ATTENTION='flash': use auto, triton or gather"):
        attention.triton_kernels(torch.device("cpu"))


@interpreter
@pytest.mark.parametrize(("dtype", "dim", "bs"), [(torch.float32, 64, 16), (torch.bfloat16, 40, 4)])
def test_the_self_check_runs_in_the_served_geometry_and_refuses_kernels_that_disagree(dtype, dim, bs):
    from engine.model import attention

    attention._self_check(kernels, torch.device("cpu"), dtype, dim, bs)

    class Wrong:
        paged_prefill = staticmethod(kernels.paged_prefill)

        @staticmethod
        def paged_decode(q, *args, **kwargs):
            return kernels.paged_decode(q, *args, **kwargs) * 1.1

    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        attention._self_check(Wrong, torch.device("cpu"), dtype, dim, bs)
