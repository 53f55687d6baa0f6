"""Speculative decoding in one engine: exact greedy outputs, pools intact, for both proposers.

Every scenario runs the same requests through a plain engine and a speculative one (n-gram lookup,
a draft model equal to the target: every proposal accepted, a different tiny draft: most rejected)
and compares tokens (and text, finish reasons, logprobs); the block pool is checked after every step
and must end empty.
"""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.engine_core import EngineCore
from tests.helpers.tiny_models import make_tiny_hf_model

VOCAB = 512
BLOCK = 4


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("spec_target"), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("spec_draft"),
        "llama",
        vocab_size=VOCAB,
        seed=1,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )


SPEC_KINDS = ["ngram", "draft-self", "draft-other"]


def _spec(kind: str, target_dir, draft_dir, k: int = 4) -> SpeculativeConfig:
    if kind == "ngram":
        return SpeculativeConfig(
            method="ngram", num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=3, disable_batch_size=0
        )
    draft = target_dir if kind == "draft-self" else draft_dir
    return SpeculativeConfig(method="draft", draft_model=str(draft), num_speculative_tokens=k, disable_batch_size=0)


def _engine(
    target_dir, spec: SpeculativeConfig | None = None, num_blocks: int = 256, budget: int = 2048, prefix: bool = True
) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(target_dir),
            dtype="float32",
            cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks, enable_prefix_caching=prefix),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
            speculative=spec or SpeculativeConfig(),
        )
    )


def _run(engine: EngineCore, requests, abort_after: dict[str, int] | None = None) -> dict[str, dict]:
    """Add (id, prompt, params) requests, step to the end checking the pool; per id: tokens, text, outputs."""
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, rid)
    res: dict[str, dict] = {rid: {"tokens": [], "text": "", "outs": []} for rid, _, _ in requests}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 2000
        for o in engine.step():
            r = res[o.request_id]
            r["tokens"] += o.new_token_ids
            r["text"] += o.new_text
            r["outs"].append(o)
        engine.check_integrity()
        for rid, n in (abort_after or {}).items():
            if len(res[rid]["tokens"]) >= n and engine.get_request(rid) is not None:
                engine.abort_request(rid)
                engine.check_integrity()
    engine.leak_check()
    return res


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        base = [rnd.randrange(3, VOCAB) for _ in range(rnd.randrange(3, 9))]
        out.append((base * 6)[: rnd.randrange(8, 45)])  # repetitive: lookup has something to find
    return out


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(target_dir):
    return _engine(target_dir)


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_greedy_batch_equals_plain(target_dir, draft_dir, plain, kind):
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (1, 2, 5, 6, 23, 24)]
    reqs = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    ref = _run(plain, reqs)
    spec = _engine(target_dir, _spec(kind, target_dir, draft_dir))
    got = _run(spec, reqs)
    for rid, _, _ in reqs:
        assert got[rid]["tokens"] == ref[rid]["tokens"], rid
        assert got[rid]["text"] == ref[rid]["text"]
        assert got[rid]["outs"][-1].finish_reason == ref[rid]["outs"][-1].finish_reason
    assert spec.spec_steps > 0 and spec.spec_proposed > 0
    if kind == "draft-self":  # the target as its own draft: every proposal accepted
        assert spec.spec_accepted == spec.spec_proposed
    last = got["r5"]["outs"][-1]
    assert last.spec_steps > 0 and last.acceptance_length == 1 + last.spec_accepted / last.spec_steps


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_chunked_prefill_prefix_hits_and_preemption(target_dir, draft_dir, plain, kind):
    """A token budget of 16 chunks the prompts; the second wave hits the first wave's cached blocks;
    24 blocks of 4 tokens cannot hold every request at once, so requests are preempted and recomputed."""
    prompts = _prompts(5, seed=3)
    reqs = [(f"a{i}", p, GREEDY) for i, p in enumerate(prompts)]
    again = [(f"b{i}", p, GREEDY) for i, p in enumerate(prompts)]
    ref = _run(plain, reqs)
    spec = _engine(target_dir, _spec(kind, target_dir, draft_dir), budget=16)
    got = _run(spec, reqs)
    got2 = _run(spec, again)
    assert spec.scheduler.prefix_hit_tokens > 0, "the second wave must hit the prefix cache"
    small = _engine(target_dir, _spec(kind, target_dir, draft_dir), num_blocks=24, budget=16)
    preempted = []
    orig = small.scheduler._preempt
    small.scheduler._preempt = lambda req, out: (preempted.append(req.request_id), orig(req, out))[1]
    got3 = _run(small, reqs)
    assert preempted, "the scenario must preempt"
    for i in range(len(prompts)):
        assert got[f"a{i}"]["tokens"] == ref[f"a{i}"]["tokens"]
        assert got2[f"b{i}"]["tokens"] == ref[f"a{i}"]["tokens"]
        assert got3[f"a{i}"]["tokens"] == ref[f"a{i}"]["tokens"]


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_stops_mid_proposal(target_dir, draft_dir, plain, kind):
    """A stop token, a stop string and max_tokens each land inside a verified proposal."""
    prompt = _prompts(1, seed=5)[0]
    ref = _run(plain, [("r", prompt, GREEDY)])["r"]
    stop_tok = ref["tokens"][9]
    stop_str = plain.tokenizer.decode(ref["tokens"][12:14])
    cases = [
        ("tok", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok])),
        ("str", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop_str])),
        ("len", SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
    ]
    refs = _run(plain, [(n, prompt, sp) for n, sp in cases])
    spec = _engine(target_dir, _spec(kind, target_dir, draft_dir))
    got = _run(spec, [(n, prompt, sp) for n, sp in cases])
    for n, _ in cases:
        assert got[n]["tokens"] == refs[n]["tokens"], n
        assert got[n]["text"] == refs[n]["text"], n
        assert got[n]["outs"][-1].finish_reason == refs[n]["outs"][-1].finish_reason
        assert got[n]["outs"][-1].stop_reason == refs[n]["outs"][-1].stop_reason


@pytest.mark.parametrize("kind", ["ngram", "draft-other"])
def test_abort_mid_run_and_penalties_and_logprobs(target_dir, draft_dir, plain, kind):
    prompts = _prompts(3, seed=7)
    pen = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.3, logprobs=3)
    reqs = [("x", prompts[0], GREEDY), ("pen", prompts[1], pen), ("keep", prompts[2], GREEDY)]
    ref = _run(plain, reqs)
    spec = _engine(target_dir, _spec(kind, target_dir, draft_dir))
    got = _run(spec, reqs, abort_after={"x": 6})
    assert 6 <= len(got["x"]["tokens"]) < 24 and got["x"]["tokens"] == ref["x"]["tokens"][: len(got["x"]["tokens"])]
    assert got["pen"]["tokens"] == ref["pen"]["tokens"]
    assert got["keep"]["tokens"] == ref["keep"]["tokens"]
    lps = [lp for o in got["pen"]["outs"] for lp in o.new_logprobs]
    ref_lps = [lp for o in ref["pen"]["outs"] for lp in o.new_logprobs]
    assert [lp.token_id for lp in lps] == ref["pen"]["tokens"]
    for a, b in zip(lps, ref_lps):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_speculation_switches_off_for_large_batches(target_dir):
    spec = _engine(
        target_dir,
        SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, disable_batch_size=2),
    )
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts(4, seed=11))]
    for rid, p, sp in reqs:
        spec.add_request(p, sp, rid)
    spec.step()  # prefill: 4 requests now decoding
    before = spec.spec_steps
    spec.step()
    assert spec.spec_steps == before, "4 decoding requests > disable_batch_size 2: no verification"
    while spec.has_unfinished_requests():
        spec.step()
    spec.leak_check()


def test_seeded_random_reproducible(target_dir, draft_dir):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    prompts = _prompts(3, seed=13)
    for kind in ("ngram", "draft-other"):
        a = _run(
            _engine(target_dir, _spec(kind, target_dir, draft_dir)),
            [(f"r{i}", p, params) for i, p in enumerate(prompts)],
        )
        b = _run(
            _engine(target_dir, _spec(kind, target_dir, draft_dir)),
            [(f"r{i}", p, params) for i, p in enumerate(prompts[::-1])],
        )
        for i in range(3):
            assert a[f"r{i}"]["tokens"] == b[f"r{2 - i}"]["tokens"]


def test_config_errors(target_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ConfigError, match="must be one of"):
        SpeculativeConfig(method="eagle9")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        SpeculativeConfig(method="ngram", prompt_lookup_min=3, prompt_lookup_max=2)
    other = make_tiny_hf_model(tmp_path, "llama", vocab_size=VOCAB * 2)
    with pytest.raises(ConfigError, match="share the target's tokenizer"):
        _engine(target_dir, SpeculativeConfig(method="draft", draft_model=str(other)))


@pytest.mark.parametrize("kind", ["ngram", "draft-other"])
def test_sampling_matches_the_target_distribution(target_dir, draft_dir, plain, kind):
    """temperature 1, top_k 4: token 2 comes out of verification (token 1 out of the prefill). Over 600
    seeds, among the runs whose token 1 is the most common one, token 2 must follow the target's exact
    distribution: softmax over its 4 best raw logits (read from a plain run's logprobs)."""
    import random
    from collections import Counter

    from tests.unit.test_spec_verify import chi2_pvalue

    prompt = list(range(3, VOCAB))  # every token appears: lookup always proposes what followed token 1
    random.Random(17).shuffle(prompt)
    n = 600
    reqs = [
        (f"s{i}", prompt, SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=i, ignore_eos=True))
        for i in range(n)
    ]
    spec = _engine(target_dir, _spec(kind, target_dir, draft_dir, k=2), num_blocks=2048)
    got = _run(spec, reqs)
    assert spec.spec_steps > n // 2, "most runs must verify a proposal at token 2"
    t1 = Counter(r["tokens"][0] for r in got.values()).most_common(1)[0][0]
    t2 = Counter(r["tokens"][1] for r in got.values() if r["tokens"][0] == t1)
    exact = _run(plain, [("e", prompt + [t1], SamplingParams(max_tokens=1, temperature=0.0, logprobs=4))])["e"]
    top = exact["outs"][0].new_logprobs[0].top
    probs = torch.tensor([lp for _, lp in top]).exp()
    probs /= probs.sum()
    ids = [t for t, _ in top]
    assert set(t2) <= set(ids)
    counts = Counter({ids.index(t): c for t, c in t2.items()})
    assert sum(counts.values()) >= 100
    assert chi2_pvalue(counts, probs) > 1e-3, (counts, probs)


def test_seeded_request_does_not_depend_on_the_batch(target_dir):
    """The batch cut-off turns speculation off for a crowded step, but never for a seeded random request:
    its tokens are the same alone and among 11 others."""
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, disable_batch_size=2)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
    prompt = _prompts(1, seed=21)[0]
    alone = _run(_engine(target_dir, spec), [("s", prompt, seeded)])["s"]["tokens"]
    crowd = [(f"g{i}", p, GREEDY) for i, p in enumerate(_prompts(11, seed=22))]
    among = _run(_engine(target_dir, spec), [("s", prompt, seeded), *crowd])["s"]["tokens"]
    assert among == alone


def test_draft_catch_up_is_spread_over_steps(target_dir, draft_dir, plain):
    """A draft that starts behind (every request's prompt) catches up at most the token budget per step,
    over all requests, and proposes once caught up; tokens still equal the plain engine's."""
    prompts = _prompts(4, seed=31)
    reqs = [(f"c{i}", p * 2, GREEDY) for i, p in enumerate(prompts)]  # 16..90 tokens each
    ref = _run(plain, reqs)
    spec = _engine(target_dir, _spec("draft-other", target_dir, draft_dir), budget=16)
    proposer = spec.proposer
    passes: list[int] = []
    prepare = proposer.runner.prepare_spans

    def recording(spans):
        passes.append(sum(s.n for s in spans if not (s.rows and s.n == 1 and s.num_logits == 1 and s.start > 0)))
        return prepare(spans)

    proposer.runner.prepare_spans = recording
    got = _run(spec, reqs)
    for rid, _, _ in reqs:
        assert got[rid]["tokens"] == ref[rid]["tokens"]
    assert max(passes) <= 16 and spec.spec_steps > 0
