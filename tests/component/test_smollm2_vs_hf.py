"""The shipped SmolLM2-135M-Instruct GGUF: our engine against transformers loading the same file.

8 chat prompts x 32 new tokens, run as one batch in float32 on both sides (bf16
and fp32 greedy runs diverge after ~20-30 tokens, so an exact oracle needs fp32).
The reference is a plain greedy loop with a KV cache, not `generate`, so nothing
masks EOS behind our back; both sides ignore EOS and produce 32 tokens.
"""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from engine.llm import LLM
from tests.helpers.reference import hf_greedy, smollm2_reference

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Give me a short tip for writing clean Python code.",
    "Who wrote 'Pride and Prejudice'? Answer briefly.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference():
    return smollm2_reference()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def test_smollm2_greedy_tokens_identical_to_transformers(llm, reference):
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    outs = llm.generate(chats, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert len(outs) == len(CHATS)
    for chat, out in zip(chats, outs):
        assert len(out.token_ids) == NEW_TOKENS
        expected = hf_greedy(reference, out.prompt_token_ids, NEW_TOKENS)
        assert out.token_ids == expected, (
            f"first difference at {next(i for i, (a, b) in enumerate(zip(out.token_ids, expected)) if a != b)}"
        )
    llm.engine.leak_check()


def test_smollm2_answers_sensibly(llm):
    out = llm.generate([[{"role": "user", "content": CHATS[0]}]], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.stop_reason == 2  # <|im_end|> ends the turn
    llm.engine.leak_check()
