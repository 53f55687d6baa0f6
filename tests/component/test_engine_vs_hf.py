"""Our engine against Hugging Face transformers on the same random weights (float32).

For Llama, Mistral and Qwen2 tiny models built on the fly: logits close for one
prefill, for step-by-step decode, for a chunked prefill and after a prefix-cache
hit; greedy tokens identical for a batch of 16 prompts of different lengths
decoded together. Every scenario ends with the engine's leak check.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.sampling_params import SamplingParams
from engine.llm import LLM
from engine.model_runner import StepBatch
from tests.helpers.tiny_models import make_tiny_hf_model

VOCAB = 1024
ATOL = 2e-4  # float32; observed differences are ~1e-6


def _randomize_biases(model_dir) -> None:
    """transformers initialises q/k/v biases to zero; make them matter."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.endswith("_proj.bias"):
            tensors[name] = torch.randn(t.shape, generator=g) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def pair(request, tmp_path_factory):
    arch = request.param
    overrides = {"vocab_size": VOCAB}
    if arch == "llama":  # exercise llama3 rope scaling too
        overrides["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    if arch == "qwen2":
        overrides["tie_word_embeddings"] = True
        overrides["num_key_value_heads"] = 2
    path = make_tiny_hf_model(tmp_path_factory.mktemp(arch), arch, **overrides)
    if arch == "qwen2":
        _randomize_biases(path)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=256)
    return arch, llm, ref


class LogitsSpy:
    """Records the logits rows the engine samples from, per request id."""

    def __init__(self, llm: LLM) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}
        runner = llm.engine.runner
        inner = runner.execute

        def execute(batch: StepBatch) -> torch.Tensor:
            logits = inner(batch)
            for s, row in zip(batch.sample, logits):
                self.rows.setdefault(s.request.request_id, []).append(row.clone())
            return logits

        setattr(runner, "execute", execute)
        self._undo = lambda: setattr(runner, "execute", inner)

    def close(self) -> None:
        self._undo()


def ref_logits(ref, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return ref(torch.tensor([token_ids])).logits[0].float()


def generate_and_compare(llm: LLM, ref, prompt: list[int], n: int):
    """Greedy-generate n tokens; every sampled-from logits row must match transformers on prompt + output."""
    spy = LogitsSpy(llm)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
    finally:
        spy.close()
    rows = torch.stack(spy.rows[out.request_id])
    full = prompt + out.token_ids
    assert rows.shape[0] == n
    torch.testing.assert_close(rows, ref_logits(ref, full)[len(prompt) - 1 : len(full) - 1], atol=ATOL, rtol=0)
    return out


def ref_greedy(ref, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):  # a plain greedy loop: no min_new_tokens masking, no EOS stop
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def test_one_prefill_logits_close(pair):
    _, llm, ref = pair
    prompt = prompts(0, 1, 37, 37)[0]
    spy = LogitsSpy(llm)
    try:
        out = llm.generate([prompt], GREEDY)[0]
    finally:
        spy.close()
    (row,) = spy.rows[out.request_id]
    torch.testing.assert_close(row, ref_logits(ref, prompt)[-1], atol=ATOL, rtol=0)
    llm.engine.leak_check()


def test_step_by_step_decode_logits_close(pair):
    _, llm, ref = pair
    prompt = prompts(1, 1, 11, 11)[0]
    generate_and_compare(llm, ref, prompt, 12)
    llm.engine.leak_check()


def test_chunked_prefill_logits_close(pair):
    _, llm, ref = pair
    prompt = prompts(2, 1, 150, 150)[0]
    small = LLM(
        llm.config.model,
        dtype="float32",
        block_size=4,
        num_blocks=512,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )
    steps = []
    inner = small.engine.scheduler.schedule

    def schedule():
        out = inner()
        steps.append([s.num_new_tokens for s in out.scheduled])
        return out

    small.engine.scheduler.schedule = schedule
    generate_and_compare(small, ref, prompt, 3)
    assert steps[:3] == [[16], [16], [16]], steps  # the prompt really went in chunks
    small.engine.leak_check()


def test_logits_close_after_prefix_cache_hit(pair):
    _, llm, ref = pair
    shared = prompts(3, 1, 40, 40)[0]
    first = shared + [5, 6, 7]
    second = shared + [9, 10, 11, 12, 13]
    llm.generate([first], GREEDY)
    out = generate_and_compare(llm, ref, second, 4)
    assert out.num_cached_tokens == 40  # 10 full blocks of 4 reused
    llm.engine.leak_check()


def test_batch_of_16_greedy_tokens_identical(pair):
    _, llm, ref = pair
    batch = prompts(4, 16, 1, 60)
    outs = llm.generate(batch, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(batch, outs):
        assert out.token_ids == ref_greedy(ref, prompt, 10)
        assert out.finish_reason == "length"
    llm.engine.leak_check()


def test_repetition_penalty_greedy_matches_transformers(pair):
    """repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor applies it (prompt + output,
    a positive logit divided, a negative one multiplied), greedy, in a batch with unpenalized requests."""
    from transformers import RepetitionPenaltyLogitsProcessor

    _, llm, ref = pair
    penalty = RepetitionPenaltyLogitsProcessor(1.8)
    batch = prompts(9, 4, 2, 30)
    want = []
    for prompt in batch:
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(10):
                logits = ref(torch.tensor([ids])).logits[:, -1]
                ids.append(int(penalty(torch.tensor([ids]), logits)[0].argmax()))
        want.append(ids[len(prompt) :])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    plain = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = llm.generate(batch + batch[:1], [params] * len(batch) + [plain])
    assert [o.token_ids for o in outs[:-1]] == want
    assert outs[-1].token_ids == ref_greedy(ref, batch[0], 10)
    assert want[0] != outs[-1].token_ids  # the penalty changed something (else this test proves nothing)
    llm.engine.leak_check()
