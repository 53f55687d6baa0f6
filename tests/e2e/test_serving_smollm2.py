"""The shipped SmolLM2-135M-Instruct served disaggregated and aggregated, against transformers.

fp32 on both sides (PLATFORM.md: bf16 and fp32 greedy runs part after ~17-33 tokens,
so an exact token oracle runs in fp32). Chat prompts go through the router's
tokenizer and chat template; the reference gets the same token ids.
"""

from __future__ import annotations

import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy, smollm2_reference

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea."]
NEW = 24


@pytest.fixture(scope="module")
def reference():
    return smollm2_reference()


def test_smollm2_disaggregated_equals_aggregated_equals_transformers(reference):
    results = {}
    for mode in ("disaggregated", "aggregated"):
        with serve("", mode=mode, **{"both.kv_cache_memory": "128MiB"}) as s:
            client = TandemClient(s.address)
            results[mode] = [
                client.complete(chat=[("user", q)], max_tokens=NEW, temperature=0.0, ignore_eos=True) for q in QUESTIONS
            ]
            s.cluster.check_pools()
    tokenizer = None
    for (text_d, ids_d, last_d), (text_a, ids_a, _), q in zip(
        results["disaggregated"], results["aggregated"], QUESTIONS
    ):
        assert (text_d, ids_d) == (text_a, ids_a)
        if tokenizer is None:
            from engine.loader import load_model_source

            tokenizer = load_model_source("").tokenizer
        prompt = tokenizer.encode_chat([{"role": "user", "content": q}])
        assert last_d.usage.prompt_tokens == len(prompt)
        assert ids_d == hf_greedy(reference, prompt, NEW)
    assert "paris" in results["disaggregated"][0][0].lower()


def test_smollm2_prefill_tp3_to_decode_tp1(reference):
    """SmolLM2 has 3 KV heads: three prefill ranks hold one each; one decode rank merges them."""
    with serve("", **{"prefill.tp": 3, "both.kv_cache_memory": "64MiB", "both.num_cpus": 0.25}) as s:
        client = TandemClient(s.address)
        from engine.loader import load_model_source

        tokenizer = load_model_source("").tokenizer
        for q in QUESTIONS[:2]:
            _, ids, last = client.complete(chat=[("user", q)], max_tokens=NEW, temperature=0.0, ignore_eos=True)
            prompt = tokenizer.encode_chat([{"role": "user", "content": q}])
            assert ids == hf_greedy(reference, prompt, NEW)
            assert last.timings.kv_transfer_s > 0
        s.cluster.check_pools()
