"""engine/cuda_graphs.py: decode steps padded to a captured size and run from static buffers give the tokens
transformers gives. On CPU the capture is `eager_capture` (the same padding, static buffers and row selection,
no graph), over the gather / native attention and over the Triton kernels in the interpreter; the `gpu` test
records real CUDA graphs and compares with eager."""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from engine.cuda_graphs import GraphedExecutor, eager_capture, padded_size
from engine.llm import LLM
from engine.model import attention
from tests.helpers.reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_hf_model

NEW = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path_factory.mktemp("graphs"), "llama", vocab_size=512, num_key_value_heads=2)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _graphed(llm: LLM, **kw) -> GraphedExecutor:
    """Swap the engine's executor for a GraphedExecutor over the same shard."""
    core = llm.engine
    ex = GraphedExecutor(core.executor.shard, max_blocks_per_seq=16, **kw)
    core.executor = core.runner.executor = ex
    return ex


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 9, 14, 30, 6)]  # 5 rows: padded to 8


def _check(llm: LLM, ref, ex: GraphedExecutor) -> None:
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, NEW) for p in prompts]
    assert ex.replays >= NEW - 1 and ex.enabled  # the decode steps really ran from the static buffers
    assert set(ex._graphs) <= {1, 2, 4, 8}
    llm.engine.leak_check()


def test_padded_sizes():
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 256)] == [1, 2, 4, 8, 8, 16, 256]
    assert padded_size(257) is None


def test_padded_decode_from_static_buffers_equals_transformers(model):
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)
    _check(llm, ref, _graphed(llm, capture=eager_capture, sizes=(1, 2, 4, 8)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need Triton's interpreter (tests/conftest.py)")
def test_padded_decode_over_the_triton_kernels(model, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (requirements/test.txt pins it)")
    monkeypatch.setenv(attention.ATTENTION_ENV, "triton")
    monkeypatch.setattr(attention, "TRITON_ON_CPU", True)  # what the variable does when set before the import
    monkeypatch.setattr(attention, "_TRITON", {})
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)
    _check(llm, ref, _graphed(llm, capture=eager_capture, sizes=(1, 2, 4, 8)))


def test_warm_up_captures_every_size_before_any_request(model):
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)
    ex = _graphed(llm, capture=eager_capture, sizes=(1, 2, 4, 8))
    ex.warm_up()
    assert sorted(ex._graphs) == [1, 2, 4, 8] and ex.enabled
    llm.engine.leak_check()  # the dummy rows hold no block
    _check(llm, ref, ex)


def test_a_capture_that_fails_turns_graphs_off(model):
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)

    def broken(forward, static, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    ex = _graphed(llm, capture=broken, sizes=(1, 2, 4, 8))
    ex.warm_up()
    assert not ex.enabled and not ex._graphs
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, NEW) for p in prompts]  # eager steps


def test_a_capture_that_disagrees_turns_graphs_off(model):
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)

    def wrong(forward, static, pool):
        return lambda: forward(static) + 1.0

    ex = _graphed(llm, capture=wrong, sizes=(8,))
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, NEW) for p in prompts]  # eager from then on
    assert not ex.enabled and ex.replays == 0


def test_steps_that_cannot_be_graphed_run_eagerly(model):
    path, ref = model
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=128)
    ex = _graphed(llm, capture=eager_capture, sizes=(1, 2))  # 5 rows: above the largest size
    prompts = _prompts()
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, NEW) for p in prompts]
    assert ex.replays == 0
    ex.max_blocks = 2  # one row, but its context is wider than the graphs' table (8 positions)
    (out,) = llm.generate([prompts[3]], params)
    assert out.token_ids == hf_greedy(ref, prompts[3], NEW) and ex.replays == 0 and ex.enabled


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(model):
    path, _ = model
    prompts = _prompts()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eager = LLM(str(path), dtype="float32", device="cuda", block_size=4, num_blocks=128)
    eager.engine.executor.enabled = False  # type: ignore[attr-defined]
    want = [o.token_ids for o in eager.generate(prompts, params)]
    graphed = LLM(str(path), dtype="float32", device="cuda", block_size=4, num_blocks=128)
    ex = graphed.engine.executor
    assert isinstance(ex, GraphedExecutor)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == want
    assert ex.enabled and ex.replays > 0
    graphed.engine.leak_check()
