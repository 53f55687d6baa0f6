"""The engine with its paged attention done by the Triton kernels (engine/model/triton_attention.py), tokens equal
to transformers: a batch decoded together, a prompt prefilled in chunks, a prefix-cache hit, GQA. Without a GPU
the kernels run in Triton's interpreter on CPU tensors (TANDEM_PAGED_ATTENTION=triton; TRITON_INTERPRET=1 from
tests/conftest.py); the `gpu` test runs the same on CUDA, compiled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (requirements/test.txt pins it)")

from common.sampling_params import SamplingParams  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model import attention  # noqa: E402
from tests.helpers.reference import hf_greedy  # noqa: E402
from tests.helpers.tiny_models import make_tiny_hf_model  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path_factory.mktemp("gqa"), "llama", vocab_size=512, num_key_value_heads=2)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def triton_attention(monkeypatch):
    monkeypatch.setenv(attention.ATTENTION_ENV, "triton")
    monkeypatch.setattr(attention, "TRITON_ON_CPU", True)  # what the variable does when set before the import
    monkeypatch.setattr(attention, "_TRITON", {})  # choose again, with the variable set


def _check(path, ref, device: str) -> None:
    llm = LLM(str(path), dtype="float32", device=device, block_size=4, num_blocks=128, max_num_batched_tokens=16)
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 13, 22)]  # 22: three chunks of 16
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, NEW) for p in prompts]
    again = prompts[2][:12] + [7, 8, 9]  # the first 3 blocks are cached: prefill after a prefix
    (out,) = llm.generate([again], greedy)
    assert out.token_ids == hf_greedy(ref, again, NEW)
    assert any(m is not None for m in attention._TRITON.values())  # the kernels really ran
    llm.engine.leak_check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need Triton's interpreter (tests/conftest.py)")
def test_engine_with_triton_kernels_equals_transformers(model, triton_attention):
    _check(*model, "cpu")


@pytest.mark.gpu
def test_engine_with_triton_kernels_on_gpu_equals_transformers(model, triton_attention):
    _check(*model, "cuda")
