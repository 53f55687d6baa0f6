"""Prefill and decode roles of one EngineCore, wired by hand (no Ray, no transport).

P runs the prompt and samples token 1 with its blocks leased; the leased blocks are
copied into D's cache (what a transport does); D replays token 1 and decodes on.
The tokens and text must equal a single engine running the whole request, for greedy
and seeded sampling, with and without a prefix hit on D, and both pools end empty.
"""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig
from engine.engine_core import EngineCore
from engine.request import RequestStatus
from tests.helpers.tiny_models import make_tiny_hf_model

BLOCK = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("roles"), "llama", vocab_size=512)


def _engine(model_dir, device: str = "cpu") -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(model_dir), dtype="float32", device=device, cache=CacheConfig(block_size=BLOCK, num_blocks=64)
        )
    )


def _run_all(engine: EngineCore) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def _disaggregated(p: EngineCore, d: EngineCore, prompt, params, rid="r", prior=()) -> tuple[list[int], str]:
    p.add_request(prompt, params, rid, kv_handoff=True, prior_output_ids=prior)
    first = _run_all(p)[rid]
    assert len(first) == 1
    first = first[0]
    tokens, text = list(first.new_token_ids), first.new_text
    if first.finished:
        assert first.kv_block_ids is None and rid not in p.leases
        return tokens, text
    assert p.get_request(rid) is None and p.leases[rid].status is RequestStatus.KV_LEASED
    replay = d.add_remote_request(prompt, params, rid, first.new_token_ids[0], prior)
    assert replay.new_text == first.new_text and not replay.finished
    allocated = d.allocate_remote_kv(rid)
    assert allocated is not None  # the pool has room for the prompt
    dst, start = allocated
    src = first.kv_block_ids[start:]
    assert len(src) == len(dst)
    d.kv_cache[:, :, dst] = p.kv_cache[:, :, src]  # the transport's job
    assert p.release_kv(rid)
    d.finish_remote_kv(rid)
    for o in _run_all(d)[rid]:
        tokens += o.new_token_ids
        text += o.new_text
    return tokens, text


PARAMS = [  # greedy, seeded random, and penalties over the output so far (which a resume must carry)
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
    SamplingParams(
        max_tokens=12,
        temperature=0.0,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.7,
        presence_penalty=0.4,
    ),
]
PARAM_IDS = ["greedy", "seeded", "penalized"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_disaggregated_equals_one_engine(model_dir, params, device):
    """Each prompt alone on one engine vs P+D. Alone, not batched: on CUDA a batch of 4 picks other
    GEMM kernels than a batch of 1, and a random tiny model's close logits then flip greedy picks."""
    torch.set_num_threads(1)
    p, d = _engine(model_dir, device), _engine(model_dir, device)
    prompts = [list(range(3, 3 + n)) for n in (1, 4, 9, 17)]
    for i, prompt in enumerate(prompts):
        agg = _engine(model_dir, device)
        agg.add_request(prompt, params, "a")
        ref = _run_all(agg)["a"]
        want, want_text = [t for o in ref for t in o.new_token_ids], "".join(o.new_text for o in ref)
        got, text = _disaggregated(p, d, prompt, params, f"r{i}")
        assert got == want and text == want_text
        agg.leak_check()
    # the second time D's own prefix cache already holds the full prompt blocks: fewer are pulled
    got_again, _ = _disaggregated(p, d, prompts[3], params, "again")
    assert got_again == got
    for e in (p, d):
        e.check_integrity()
        e.leak_check()


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_resumed_request_continues_exactly(model_dir, params):
    """A request resumed with the first k tokens it produced (its worker died) continues with exactly
    the tokens and text deltas of an undisturbed run: on one engine, and prefilled on P, decoded on D."""
    torch.set_num_threads(1)
    prompt = list(range(3, 3 + 9))
    agg = _engine(model_dir)
    agg.add_request(prompt, params, "a")
    ref = _run_all(agg)["a"]
    want = [t for o in ref for t in o.new_token_ids]
    assert len(want) == 12
    p, d = _engine(model_dir), _engine(model_dir)
    for k in (1, 5, 11):
        one = _engine(model_dir)
        one.add_request(prompt, params, "r", prior_output_ids=want[:k])
        outs = _run_all(one)["r"]
        assert [t for o in outs for t in o.new_token_ids] == want[k:]
        assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in ref[k:])
        assert outs[-1].finish_reason == ref[-1].finish_reason
        one.leak_check()
        got, text = _disaggregated(p, d, prompt, params, f"d{k}", prior=want[:k])
        assert got == want[k:] and text == "".join(o.new_text for o in ref[k:])
    for e in (p, d):
        e.check_integrity()
        e.leak_check()


def test_resumed_request_stops_at_the_same_stop_string(model_dir):
    """A stop string that the undisturbed run hits after token k: the resumed run (with the text held
    back for it replayed) hits it too, at the same token, with the same text cut."""
    torch.set_num_threads(1)
    prompt = list(range(3, 3 + 9))
    free = _engine(model_dir)
    free.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "f")
    outs = _run_all(free)["f"]
    texts = [o.new_text for o in outs]
    at = next(i for i in range(4, len(texts)) if texts[i].strip())  # a token past k with some text
    stop = texts[at].strip()[:2]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    agg = _engine(model_dir)
    agg.add_request(prompt, params, "a")
    ref = _run_all(agg)["a"]
    assert ref[-1].finish_reason == "stop" and ref[-1].stop_reason == stop
    want = [t for o in ref for t in o.new_token_ids]
    k = 2
    assert len(want) > k
    one = _engine(model_dir)
    one.add_request(prompt, params, "r", prior_output_ids=want[:k])
    got = _run_all(one)["r"]
    assert [t for o in got for t in o.new_token_ids] == want[k:]
    assert "".join(o.new_text for o in got) == "".join(o.new_text for o in ref[k:])
    assert (got[-1].finish_reason, got[-1].stop_reason) == ("stop", stop)
    one.leak_check()


def test_resume_refuses_output_that_already_ends_the_request(model_dir):
    engine = _engine(model_dir)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="leave none of max_tokens=3"):
        engine.add_request([5, 6, 7], params, "r", prior_output_ids=[1, 2, 3])
    with pytest.raises(InvalidRequestError, match="already ends the request"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, stop_token_ids=[9]), "r", prior_output_ids=[9])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([5, 6, 7], params, "r", prior_output_ids=[10**6])
    assert not engine.has_unfinished_requests()
    engine.leak_check()


def test_first_token_that_ends_the_request_skips_decode(model_dir):
    p = _engine(model_dir)
    p.add_request([5, 6, 7], SamplingParams(max_tokens=1, temperature=0.0), "one", kv_handoff=True)
    (out,) = _run_all(p)["one"]
    assert out.finished and out.finish_reason == "length" and out.kv_block_ids is None
    p.leak_check()


def test_abort_releases_a_lease_and_remote_waiting_request(model_dir):
    p, d = _engine(model_dir), _engine(model_dir)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    p.add_request(list(range(3, 12)), params, "x", kv_handoff=True)
    _run_all(p)
    assert p.kv_manager.num_free_blocks < p.kv_spec.num_blocks
    with pytest.raises(InvalidRequestError, match="already in use"):
        p.add_request([1, 2], params, "x")
    assert p.abort_request("x") and not p.release_kv("x")
    p.leak_check()
    d.add_remote_request(list(range(3, 12)), params, "y", 9)
    assert d.allocate_remote_kv("y") is not None
    assert d.abort_request("y")
    d.leak_check()


def test_decode_admission_waits_when_the_pool_is_full(model_dir):
    d = EngineCore(
        EngineConfig(model=str(model_dir), dtype="float32", cache=CacheConfig(block_size=BLOCK, num_blocks=4))
    )
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    d.add_remote_request(list(range(3, 14)), params, "a", 9)  # 11 tokens: 3 blocks
    d.add_remote_request(list(range(20, 31)), params, "b", 9)
    assert d.allocate_remote_kv("a") is not None
    assert d.allocate_remote_kv("b") is None  # only 1 block left: nothing changes
    assert d.kv_manager.num_free_blocks == 1
    d.abort_request("a")
    assert d.allocate_remote_kv("b") is not None
    d.abort_request("b")
    d.leak_check()
