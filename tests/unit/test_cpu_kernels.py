"""The native CPU linear kernel against torch, and its fallbacks.

The kernel is built with the host compiler; where none exists the kernel tests
skip and the fallback tests still run (the layers then use torch's matmul).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from engine.model import cpu_kernels
from engine.model.embedding import ParallelLMHead
from engine.model.linear import MergedColumnLinear, QKVLinear

KERNEL = cpu_kernels.linear_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the CPU kernel could not be built")


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """linear_kernel() as on a fresh process, building into an empty cache."""
    monkeypatch.setattr(cpu_kernels, "_kernel", False)
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path))
    yield tmp_path


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (3, 64, 65), (4, 7, 1), (5, 130, 64), (17, 576, 200), (0, 16, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_torch(threads, m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = KERNEL(x, KERNEL.pack(w), bias, n)
    finally:
        torch.set_num_threads(old)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * (k ** 0.5))


@needs_kernel
def test_packed_linear_is_batch_invariant():
    """A row's result does not depend on the other rows of the batch or on the thread count."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 576, generator=g), torch.randn(9, 576, generator=g)
    packed = KERNEL.pack(w)
    full = KERNEL(x, packed, None, 300)
    old = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for i in range(9):
            assert torch.equal(KERNEL(x[i : i + 1], packed, None, 300)[0], full[i])
    torch.set_num_threads(old)


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
    assert cpu_kernels.linear_kernel() is None
    layer = MergedColumnLinear(32, [16, 16], dtype=torch.float32, device="cpu")
    layer.weight.data.normal_()
    ref = F.linear(torch.ones(2, 32), layer.weight.data.clone())
    layer.finalize()
    assert layer._kernel is None and layer._weight_t is not None
    torch.testing.assert_close(layer(torch.ones(2, 32)), ref)


def test_broken_compiler_is_a_warning_not_an_error(fresh_kernel_state, monkeypatch, caplog, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'fakecc: no' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.WARNING, logger="engine.model.cpu_kernels"):
        assert cpu_kernels.linear_kernel() is None
    assert "using torch's matmul" in caplog.text and "fakecc: no" in caplog.text
    assert not list(fresh_kernel_state.glob("*.so*"))  # nothing half-written left in the cache


@needs_kernel
def test_cache_key_is_per_source_and_reused(fresh_kernel_state):
    k1 = cpu_kernels.linear_kernel()
    built = sorted(p.name for p in fresh_kernel_state.iterdir())
    assert len(built) == 1 and built[0].startswith("cpu_linear-") and built[0].endswith(".so")
    cpu_kernels._kernel = False
    k2 = cpu_kernels.linear_kernel()
    assert k2.path == k1.path  # the second process reuses the build
