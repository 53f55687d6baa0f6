"""The decoder layer on the native CPU kernels against the same layer on torch's ops, inside a real engine.

With a compiler present the kernels are the default path, so the torch path would otherwise go untested
here; and the kernel path must agree with it on every kind of step: decode rows next to prefill chunks,
chunked prefill after a prefix hit, both KV orders, grouped KV heads, Qwen2's qkv bias, bf16.
"""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine_core import EngineCore
from engine.model import cpu_kernels
from engine.model_runner import StepBatch
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.skipif(
    cpu_kernels._compiler() is None or cpu_kernels.vector_isa() is None,
    reason="no C compiler, or neither AVX-512 nor AVX2 + FMA: no CPU kernels to compare",
)


def _engine(model_dir, dtype: str, order: str) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(model_dir),
            dtype=dtype,
            cache=CacheConfig(block_size=4, num_blocks=96, kv_order=order),
            scheduler=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=8),
        )
    )


def _layers(core: EngineCore):
    return core.runner.executor.shard.model.layers


def _run(core: EngineCore, kernels: bool, wide: bool = False) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Three requests: two share a prefix (a hit once the first is cached), one long (chunked over steps);
    they are added at different steps so that decode rows and prefill chunks share steps. `wide`: then four
    short ones, so that decode steps have rows of short and long contexts (two decode groups)."""
    saved = [layer._k for layer in _layers(core)]
    if not kernels:
        for layer in _layers(core):
            layer._k = None
    logits: list[torch.Tensor] = []
    execute = core.runner.execute

    def recording(batch: StepBatch) -> torch.Tensor:
        logits.append(execute(batch))
        return logits[-1]

    setattr(core.runner, "execute", recording)  # a spy on this runner's forward pass, undone below
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        shared = list(range(40, 60))
        core.add_request(shared + [7, 8, 9], params, "a")
        core.step()
        core.add_request(list(range(100, 160)), params, "long")
        core.step()
        core.add_request(shared + [11, 12], params, "b")
        if wide:
            for i in range(4):
                core.add_request([200 + i, 300 + i, 400 + i], params, f"short{i}")
        tokens: dict[str, list[int]] = {}
        for _ in range(200):
            if not core.has_unfinished_requests():
                break
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens, logits
    finally:
        setattr(core.runner, "execute", execute)
        for layer, k in zip(_layers(core), saved):
            layer._k = k


@pytest.mark.parametrize(
    "arch, dtype, order",
    [
        ("llama", "float32", "NHD"),
        ("llama", "float32", "HND"),
        ("qwen2", "float32", "NHD"),
        ("llama", "bfloat16", "HND"),
    ],
)
def test_kernel_layers_match_torch_layers(tmp_path, arch, dtype, order, monkeypatch):
    model_dir = make_tiny_hf_model(tmp_path, arch, vocab_size=512, num_attention_heads=8, num_key_value_heads=2)
    with_kernels, without = _engine(model_dir, dtype, order), _engine(model_dir, dtype, order)
    assert all(layer._k is not None for layer in _layers(with_kernels))
    prefills: list[int] = []  # context blocks per prefill-kernel call: 0 for a fresh prompt's own rows
    attend = cpu_kernels.CpuKernels.paged_prefill_attention

    def counting(self, q, cache_k, cache_v, strides, blocks, *rest):
        prefills.append(0 if strides[0] == 0 else blocks.numel())
        return attend(self, q, cache_k, cache_v, strides, blocks, *rest)

    monkeypatch.setattr(cpu_kernels.CpuKernels, "paged_prefill_attention", counting)
    got_tokens, got_logits = _run(with_kernels, kernels=True)
    # prefill chunks went to the native kernel: fresh prompts, and chunks after a prefix hit or an earlier chunk
    assert 0 in prefills and any(prefills), prefills
    want_tokens, want_logits = _run(without, kernels=False)
    assert len(got_logits) == len(want_logits)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.05)
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, **tol)
    if dtype == "float32":
        assert got_tokens == want_tokens
    with_kernels.leak_check()
    without.leak_check()


@pytest.mark.parametrize(
    "arch, dtype, order",
    [("llama", "float32", "NHD"), ("qwen2", "float32", "HND"), ("llama", "bfloat16", "NHD")],
)
def test_native_decode_steps_equal_the_layer_by_layer_kernels(tmp_path, arch, dtype, order, monkeypatch):
    """A decode-only step runs its layers in one native call (CpuKernels.decode_layers): the same kernels in the same
    order as the per-layer path, so the same bits, on every step of the scenario above (decode steps with one and
    with several decode groups, next to steps with prefill chunks, which stay layer by layer)."""
    model_dir = make_tiny_hf_model(tmp_path, arch, vocab_size=512, num_attention_heads=8, num_key_value_heads=2)
    native, per_layer = _engine(model_dir, dtype, order), _engine(model_dir, dtype, order)
    per_layer.runner.executor.shard.model._native = None  # what TANDEM_NATIVE_DECODE=0 makes of it
    model = native.runner.executor.shard.model
    calls = []
    decode = model._native_decode

    groups = set()

    def counting(h, cos, sin, kv_cache, md, order):
        ran = decode(h, cos, sin, kv_cache, md, order)
        calls.append(ran)
        if ran:
            groups.add(len(md.decode_groups))
        return ran

    monkeypatch.setattr(model, "_native_decode", counting)
    got_tokens, got_logits = _run(native, kernels=True, wide=True)
    want_tokens, want_logits = _run(per_layer, kernels=True, wide=True)
    assert sum(calls) >= 5 and not all(calls), calls  # decode steps went native, steps with a prefill did not
    assert groups == {1, 2}, groups  # one decode group, and two merged into one table
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits):
        assert torch.equal(got, want)
    native.leak_check()
    per_layer.leak_check()


def test_native_decode_is_off_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_NATIVE_DECODE", "0")
    model_dir = make_tiny_hf_model(tmp_path, "llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=2)
    core = _engine(model_dir, "float32", "NHD")
    assert core.runner.executor.shard.model._native_weights() is None
    monkeypatch.delenv("TANDEM_NATIVE_DECODE")
    core.runner.executor.shard.model._native = False  # checked again
    assert core.runner.executor.shard.model._native_weights() is not None


def test_native_decode_takes_float32_steps_over_the_per_layer_kernel_limit(tmp_path, monkeypatch):
    """A 40-row float32 decode step where the per-layer path would send the linears to oneDNN (limit 32, as on AVX2):
    the native call takes it on the packed kernel; the tokens equal the per-layer path's, logits within rounding."""
    from engine.model import linear, llama

    monkeypatch.setattr(linear, "F32_AVX2_KERNEL_MAX_ROWS", 32)
    monkeypatch.setattr(linear, "kernel_max_rows", lambda kernel, dtype: 32)
    model_dir = make_tiny_hf_model(tmp_path, "llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=2)

    def engine() -> EngineCore:
        return EngineCore(
            EngineConfig(
                model=str(model_dir),
                dtype="float32",
                cache=CacheConfig(block_size=4, num_blocks=400),
                scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64),
            )
        )

    results = []
    for native in (True, False):
        core = engine()
        model = core.runner.executor.shard.model
        assert model._decoder_layers()[0].qkv_proj._kernel_max_rows == 32
        if not native:
            model._native = None
        rows: list[int] = []
        decode = model._native_decode

        def counting(h, *rest, _decode=decode, _rows=rows):
            ran = _decode(h, *rest)
            if ran:
                _rows.append(h.shape[0])
            return ran

        monkeypatch.setattr(model, "_native_decode", counting)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for i in range(40):
            core.add_request([3 + i, 50 + i, 100 + i, 7], params, f"r{i}")
        tokens: dict[str, list[int]] = {}
        while core.has_unfinished_requests():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        core.leak_check()
        results.append((tokens, rows))
    (native_tokens, native_rows), (plain_tokens, plain_rows) = results
    assert 40 in native_rows and llama.NATIVE_DECODE_F32_MAX_ROWS >= 40 and plain_rows == []
    assert native_tokens == plain_tokens
