"""Sampling parameters end to end through the real engine (tiny random llama, float32).

Seeded sampling must not depend on the batch a request shares; stop strings,
stop token ids, EOS and max_tokens must end a request exactly where they say;
logprobs must describe the tokens that were produced. Expected values come
from a greedy run of the same engine, so the tests are deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.sampling_params import SamplingParams
from engine.llm import LLM, PromptInput
from engine.outputs import CompletionOutput
from tests.helpers.tiny_models import make_tiny_hf_model

VOCAB = 512
PROMPT = "The quick brown fox"
SEEDED = SamplingParams(seed=7, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("sampling"), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", num_blocks=128, block_size=16)


@pytest.fixture(scope="module")
def greedy_run(llm: LLM) -> CompletionOutput:
    """32 greedy tokens of PROMPT, EOS ignored: the source of the deterministic expectations below."""
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 32
    return out


def one(llm: LLM, prompt, params: SamplingParams) -> CompletionOutput:
    (out,) = llm.generate(prompt, params)
    llm.engine.leak_check()
    return out


# ---- seeds -------------------------------------------------------------------------------------------------------


def test_seeded_request_is_reproducible_alone_and_in_any_batch(llm: LLM) -> None:
    alone = one(llm, PROMPT, SEEDED)
    assert len(alone.token_ids) == 16
    assert one(llm, PROMPT, SEEDED).token_ids == alone.token_ids

    others: list[tuple[PromptInput, SamplingParams]] = [
        ("Hello there", SamplingParams(seed=1, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True)),
        ([5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)),  # unseeded
        (PROMPT, SamplingParams(seed=8, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True)),  # same prompt
        ("x" * 40, SamplingParams(temperature=1.3, top_k=50, max_tokens=5)),  # unseeded, finishes early
        ("A longer prompt that needs more than one block of cache " * 2, SamplingParams(seed=99, temperature=0.5)),
    ]
    for position in (0, 3, 5):
        batch = [p for p, _ in others]
        params = [sp for _, sp in others]
        batch.insert(position, PROMPT)
        params.insert(position, SEEDED)
        outs = llm.generate(batch, params)
        llm.engine.leak_check()
        assert outs[position].token_ids == alone.token_ids, f"seeded request changed at batch position {position}"


def test_different_seed_gives_different_tokens(llm: LLM) -> None:
    base = one(llm, PROMPT, SEEDED)
    other = one(llm, PROMPT, SamplingParams(seed=8, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True))
    assert other.token_ids != base.token_ids


def test_sampling_is_not_greedy(llm: LLM, greedy_run: CompletionOutput) -> None:
    """Control for the seed tests: temperature 0.8 really samples (else equality above proves nothing)."""
    assert one(llm, PROMPT, SEEDED).token_ids != greedy_run.token_ids[:16]


# ---- stop conditions ---------------------------------------------------------------------------------------------


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character ASCII substring of `text` (not at its start) at its first occurrence."""
    for i in range(2, len(text) - 3):
        s = text[i : i + 3]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            return s, i
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_cuts_the_text(llm: LLM, greedy_run: CompletionOutput) -> None:
    stop, at = _stop_string(greedy_run.text)
    out = one(llm, PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=(stop,)))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == greedy_run.text[:at]
    assert out.token_ids == greedy_run.token_ids[: len(out.token_ids)] and len(out.token_ids) < 32


def test_include_stop_str_in_output_keeps_it(llm: LLM, greedy_run: CompletionOutput) -> None:
    stop, at = _stop_string(greedy_run.text)
    out = one(
        llm,
        PROMPT,
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True),
    )
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == greedy_run.text[: at + len(stop)]


def test_stop_token_id_stops_with_that_id(llm: LLM, greedy_run: CompletionOutput) -> None:
    ids = greedy_run.token_ids
    k = next(i for i in range(3, len(ids)) if ids.index(ids[i]) == i)  # first occurrence, not at the start
    out = one(llm, PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop_token_ids=(ids[k],)))
    assert out.token_ids == ids[: k + 1]  # the stop token itself is kept in the ids
    assert out.finish_reason == "stop" and out.stop_reason == ids[k]


def test_eos_stops_unless_ignore_eos(model_dir: Path, tmp_path: Path, greedy_run: CompletionOutput) -> None:
    """A copy of the model whose EOS is a token greedy decoding produces: EOS stops it, ignore_eos does not."""
    ids = greedy_run.token_ids
    k = next(i for i in range(2, len(ids)) if ids.index(ids[i]) == i and 2 not in ids[: i + 1])  # 2: the real EOS
    eos_dir = Path(shutil.copytree(model_dir, tmp_path / "eos-model"))
    for name in ("config.json", "generation_config.json"):
        file = eos_dir / name
        if file.is_file():
            config = json.loads(file.read_text())
            config["eos_token_id"] = [2, ids[k]]
            file.write_text(json.dumps(config))
    llm = LLM(str(eos_dir), dtype="float32", num_blocks=64, block_size=16)
    assert ids[k] in llm.engine.eos_token_ids

    stopped = one(llm, PROMPT, SamplingParams(max_tokens=32, temperature=0.0))
    assert stopped.token_ids == ids[: k + 1] and stopped.finish_reason == "stop" and stopped.stop_reason == ids[k]

    full = one(llm, PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert full.token_ids == ids and full.finish_reason == "length" and full.stop_reason is None


def test_max_tokens_one(llm: LLM, greedy_run: CompletionOutput) -> None:
    out = one(llm, PROMPT, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert out.token_ids == greedy_run.token_ids[:1] and out.finish_reason == "length"
    sampled = one(llm, [3, 4, 5], SamplingParams(max_tokens=1, temperature=1.0, seed=3, ignore_eos=True))
    assert len(sampled.token_ids) == 1 and sampled.finish_reason == "length"


# ---- logprobs ----------------------------------------------------------------------------------------------------


def test_logprobs_five_per_token_and_greedy_token_is_the_best(llm: LLM, greedy_run: CompletionOutput) -> None:
    out = one(llm, PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5))
    assert out.token_ids == greedy_run.token_ids[:8]
    assert out.logprobs is not None and len(out.logprobs) == 8
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tid
        assert len(lp.top) == 5 and len({t for t, _ in lp.top}) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0.0 for v in values)
        assert lp.logprob == pytest.approx(max(values), abs=1e-6)
        assert lp.top[0][0] == tid or lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-6)


def test_logprobs_of_sampled_tokens_match_their_top_entry(llm: LLM) -> None:
    """Under sampling the chosen token need not be the best, but when it is in the top list the values agree."""
    out = one(llm, PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, logprobs=20))
    assert out.logprobs is not None and len(out.logprobs) == 12
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tid and len(lp.top) == 20
        assert lp.logprob <= lp.top[0][1] + 1e-6
        top = dict(lp.top)
        if tid in top:
            assert top[tid] == pytest.approx(lp.logprob, abs=1e-6)


def test_no_logprobs_unless_asked(llm: LLM) -> None:
    assert one(llm, PROMPT, SamplingParams(max_tokens=3, temperature=0.0)).logprobs is None
