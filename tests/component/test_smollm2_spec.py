"""SmolLM2-135M (float32) with n-gram speculation: the same greedy tokens as without, and proposals that pay.

The prompts ask the model to rework a given text, so its answer copies spans of the prompt and
lookup proposes tokens it accepts (acceptance length well above 1); an open question checks the
other side (few proposals, the same tokens).
"""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from engine.config import SpeculativeConfig
from engine.llm import LLM

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. The architect presented three "
    "designs: a single large reading room, a building of four floors with smaller rooms, and a renovation of "
    "the old post office."
)
PROMPTS = [
    [{"role": "user", "content": f"{TEXT}\n\nRewrite the text above word for word, correcting any mistakes."}],
    [
        {
            "role": "user",
            "content": f"{TEXT}\n\nCopy the text above, replacing every number written in words with digits.",
        }
    ],
    [{"role": "user", "content": "Explain why the sky is blue to a ten-year-old."}],
]


@pytest.fixture(scope="module")
def outputs():
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain = LLM(dtype="float32").generate(PROMPTS, params)
    spec_llm = LLM(dtype="float32", speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    spec = spec_llm.generate(PROMPTS, params)
    spec_llm.engine.leak_check()
    return plain, spec


def test_ngram_greedy_equals_plain(outputs):
    plain, spec = outputs
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
        assert b.text == a.text


def test_ngram_proposals_pay_on_editing(outputs):
    _, spec = outputs
    assert spec[0].acceptance_length is not None and spec[0].acceptance_length > 2.0
    assert spec[1].acceptance_length is not None and spec[1].acceptance_length > 2.0
