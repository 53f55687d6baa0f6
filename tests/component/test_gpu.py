"""The engine on CUDA (skipped without a device): same greedy tokens as on CPU in float32."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from engine.llm import LLM
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("gpu"), "llama", vocab_size=1024)


def test_cuda_float32_matches_cpu(model_dir):
    prompts = [[5, 6, 7, 8, 9], list(range(10, 60)), [100]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cpu = LLM(str(model_dir), dtype="float32", device="cpu").generate(prompts, params)
    gpu_llm = LLM(str(model_dir), dtype="float32", device="cuda")
    gpu = gpu_llm.generate(prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    gpu_llm.engine.leak_check()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_runs(model_dir, dtype):
    llm = LLM(str(model_dir), dtype=dtype, device="cuda")
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    llm.engine.leak_check()
