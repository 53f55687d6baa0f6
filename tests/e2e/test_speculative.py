"""Speculative decoding served end to end: disaggregated and aggregated, n-gram and draft model.

Real Ray actors, NIXL and gRPC. Greedy tokens must equal one plain engine's, with heterogeneous
pools (prefill block 16 -> decode block 8 at TP2); the draft's KV is recomputed on the decode worker
(only the target's KV is transferred). The acceptance length a request reports in its usage must be
the same whether it ran disaggregated or aggregated (the check vLLM runs for PD + speculation),
and every pool ends intact.
"""

from __future__ import annotations

import random

import httpx
import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import TINY_VOCAB, serve
from tests.helpers.reference import engine_greedy

pytestmark = pytest.mark.usefixtures("ray_session")

NEW = 20
NGRAM = {
    "speculative.method": "ngram",
    "speculative.num_speculative_tokens": 3,
    "speculative.prompt_lookup_min": 1,
    "speculative.prompt_lookup_max": 3,
}


def _prompts() -> list[list[int]]:
    rng = random.Random(8)
    out = []
    for n in (23, 41, 66):
        base = [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randrange(4, 9))]
        out.append((base * 12)[:n])  # repetitive: lookup finds proposals, some accepted, some not
    return out


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(
        tmp_path_factory.mktemp("draft"),
        "llama",
        vocab_size=TINY_VOCAB,
        seed=3,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy tokens of one plain aggregated TP1 engine, per prompt."""
    return engine_greedy(tiny_dir, _prompts(), NEW, num_blocks=128)


def _run(serving, repeat: int = 1) -> dict[tuple, list]:
    """Each prompt `repeat` times greedy, then once seeded at temperature 0.8: (tokens, usage) per run."""
    client = TandemClient(serving.address)
    got: dict[tuple, list] = {}
    for _ in range(repeat):
        for ids in _prompts():
            _, toks, last = client.complete(token_ids=ids, max_tokens=NEW, temperature=0.0, ignore_eos=True)
            got.setdefault(tuple(ids), []).append((toks, last.usage))
    for ids in _prompts():
        _, toks, last = client.complete(token_ids=ids, max_tokens=NEW, temperature=0.8, seed=11, ignore_eos=True)
        got.setdefault(("seeded", *ids), []).append((toks, last.usage))
    serving.cluster.check_pools()
    return got


@pytest.fixture(scope="module")
def disaggregated_ngram(tiny_dir):
    overrides = {**NGRAM, "prefill.block_size": 16, "decode.block_size": 8, "decode.tp": 2, "decode.kv_order": "HND"}
    with serve(str(tiny_dir), **overrides) as s:  # stopped before the other tests start theirs
        return _run(s, repeat=2)  # the second run pulls after D's own prefix-cache hit


def test_disaggregated_ngram_equals_plain_greedy(disaggregated_ngram, reference):
    for ids, runs in disaggregated_ngram.items():
        if ids[0] == "seeded":
            continue
        for toks, usage in runs:
            assert toks == reference[ids]
            assert usage.completion_tokens == NEW
    usages = [u for ids, runs in disaggregated_ngram.items() for _, u in runs if ids[0] != "seeded"]
    assert all(u.spec_verify_steps > 0 for u in usages), "every prompt repeats: lookup proposes"
    assert any(u.spec_accepted_tokens > 0 for u in usages)
    for u in usages:
        assert u.acceptance_length == pytest.approx(1 + u.spec_accepted_tokens / u.spec_verify_steps)
        assert u.spec_accepted_tokens <= u.spec_proposed_tokens


def test_acceptance_length_aggregated_equals_disaggregated(tiny_dir, disaggregated_ngram, reference):
    with serve(str(tiny_dir), mode="aggregated", **NGRAM) as s:
        aggregated = _run(s)
    for ids, runs in aggregated.items():
        toks, usage = runs[0]
        if ids[0] == "seeded":  # a seeded request speculates alike in both modes: token 1 on P advances D's draw
            assert toks == disaggregated_ngram[ids][0][0]
        else:
            assert toks == reference[ids]
        d_usage = disaggregated_ngram[ids][0][1]
        assert (usage.spec_verify_steps, usage.spec_proposed_tokens, usage.spec_accepted_tokens) == (
            d_usage.spec_verify_steps,
            d_usage.spec_proposed_tokens,
            d_usage.spec_accepted_tokens,
        )
        assert usage.acceptance_length == d_usage.acceptance_length


def test_disaggregated_draft_model_and_http_usage(tiny_dir, draft_dir, reference):
    overrides = {
        "speculative.method": "draft",
        "speculative.draft_model": str(draft_dir),
        "speculative.num_speculative_tokens": 2,
        "prefill.block_size": 16,
        "decode.block_size": 8,
        "decode.tp": 2,
    }  # the draft runs beside the leader rank of a TP2 worker
    with serve(str(tiny_dir), **overrides) as s:
        got = _run(s)
        for ids, runs in got.items():
            toks, usage = runs[0]
            if ids[0] == "seeded":
                continue
            assert toks == reference[ids]
            assert usage.spec_verify_steps > 0 and usage.spec_proposed_tokens > 0
        # the OpenAI door reports OpenAI's prediction counters and the acceptance length
        ids = _prompts()[0]
        model = httpx.get(f"{s.http_url}/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(
            f"{s.http_url}/completions",
            timeout=60,
            json={"model": model, "prompt": ids, "max_tokens": NEW, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        details = usage["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] == got[tuple(ids)][0][1].spec_accepted_tokens
        assert details["rejected_prediction_tokens"] == (
            got[tuple(ids)][0][1].spec_proposed_tokens - details["accepted_prediction_tokens"]
        )
        assert usage["acceptance_length"] == pytest.approx(got[tuple(ids)][0][1].acceptance_length, abs=1e-4)
        s.cluster.check_pools()
