"""Sampler: greedy, seeded reproducibility independent of the batch, filters, distribution, logprobs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from common.sampling_params import SamplingParams
from engine.sampler import Sampler, SamplingState


def _states(n: int, **kwargs: Any) -> list[SamplingState]:
    return [SamplingState.create(SamplingParams(**kwargs)) for _ in range(n)]


def _draw(logits_row: torch.Tensor, n: int, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """n independent draws from one row of logits (one unseeded request per batch row)."""
    sampler = Sampler(generator=torch.Generator().manual_seed(seed))
    out = sampler(logits_row.unsqueeze(0).expand(n, -1).contiguous(), _states(n, **kwargs))
    return torch.tensor(out.token_ids)


def _step_logits(step: int, batch: int, vocab: int, salt: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1000 * salt + step))


# ---------------------------------------------------------------- greedy
def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, _states(6, temperature=0.0))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_tie_picks_lowest_index() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]])
    assert Sampler()(logits, _states(1, temperature=0.0)).token_ids == [1]


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    states = [
        SamplingState.create(SamplingParams(temperature=0.0)),
        SamplingState.create(SamplingParams(temperature=1.0, seed=1)),
        SamplingState.create(SamplingParams(temperature=0.8, top_k=1)),
        SamplingState.create(SamplingParams(temperature=1.5)),
        SamplingState.create(SamplingParams(temperature=0.0)),
    ]
    ids = Sampler(torch.Generator().manual_seed(0))(logits, states).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [ids[0], ids[2], ids[4]] == [argmax[0], argmax[2], argmax[4]]


def test_top_k_1_equals_greedy() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3))
    out = Sampler(torch.Generator().manual_seed(0))(logits, _states(8, temperature=2.0, top_k=1))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_bf16_logits_accepted() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = Sampler()(logits, _states(3, temperature=0.0))
    assert out.token_ids == logits.float().argmax(-1).tolist()
    out = Sampler(torch.Generator().manual_seed(0))(logits, _states(3, temperature=1.0))
    assert all(0 <= t < 40 for t in out.token_ids)


def test_vocab_limit_excludes_padding_columns() -> None:
    logits = torch.zeros(4, 20)
    logits[:, 16:] = 100.0  # padded columns that must never be chosen
    assert all(t < 16 for t in Sampler()(logits, _states(4, temperature=0.0), vocab_limit=16).token_ids)
    ids = Sampler(torch.Generator().manual_seed(0))(logits, _states(4, temperature=1.0), vocab_limit=16).token_ids
    assert all(t < 16 for t in ids)


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(3, 10), _states(2))
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), _states(2), vocab_limit=11)


# ---------------------------------------------------------------- seeds
def _run_seeded(seed: int, steps: int = 20, vocab: int = 500) -> list[int]:
    state = SamplingState.create(SamplingParams(temperature=1.0, seed=seed))
    sampler = Sampler()
    return [sampler(_step_logits(s, 1, vocab), [state]).token_ids[0] for s in range(steps)]


def test_same_seed_same_tokens() -> None:
    assert _run_seeded(7) == _run_seeded(7)


def test_different_seeds_different_tokens() -> None:
    runs = {tuple(_run_seeded(seed)) for seed in (1, 2, 3)}
    assert len(runs) == 3


def test_seeded_row_independent_of_batch() -> None:
    vocab, steps = 500, 20
    alone = _run_seeded(7, steps, vocab)

    # Same request among others that change: other seeds, unseeded rows, greedy rows, filters, order.
    target = SamplingState.create(SamplingParams(temperature=1.0, seed=7))
    others = [
        SamplingState.create(SamplingParams(temperature=0.9, seed=99)),
        SamplingState.create(SamplingParams(temperature=1.2)),
        SamplingState.create(SamplingParams(temperature=0.0)),
        SamplingState.create(SamplingParams(temperature=1.0, top_p=0.5, top_k=20, min_p=0.1)),
    ]
    sampler = Sampler(torch.Generator().manual_seed(123))
    got = []
    for s in range(steps):
        n_before = s % 3  # the request moves around in the batch
        batch = others[:n_before] + [target] + others[n_before:]
        logits = _step_logits(s, len(batch), vocab, salt=5)
        logits[n_before] = _step_logits(s, 1, vocab)[0]
        got.append(sampler(logits, batch).token_ids[n_before])
    assert got == alone


def test_unseeded_rows_follow_sampler_generator() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(5))
    a = Sampler(torch.Generator().manual_seed(11))(logits, _states(4)).token_ids
    b = Sampler(torch.Generator().manual_seed(11))(logits, _states(4)).token_ids
    c = [Sampler(torch.Generator().manual_seed(12 + i))(logits, _states(4)).token_ids for i in range(3)]
    assert a == b
    assert any(x != a for x in c)


# ---------------------------------------------------------------- filters
def _probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


P4 = [0.5, 0.3, 0.15, 0.05]


def test_top_k_masks_outside_set() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(6))
    drawn = set(_draw(logits, 3000, temperature=5.0, top_k=5).tolist())
    assert drawn == set(logits.topk(5).indices.tolist())


def test_top_k_larger_than_vocab_is_disabled() -> None:
    logits = torch.zeros(8)
    assert set(_draw(logits, 2000, top_k=1000).tolist()) == set(range(8))


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.75, {0, 1}), (0.9, {0, 1, 2}), (0.1, {0}), (0.5, {0})])
def test_top_p_sampled_set_is_exactly_the_nucleus(top_p: float, nucleus: set[int]) -> None:
    # Shuffle the vocab order so the sort really matters.
    perm = [2, 0, 3, 1]
    logits = _probs_logits([P4[i] for i in perm])
    drawn = {perm[t] for t in _draw(logits, 3000, top_p=top_p).tolist()}
    assert drawn == nucleus


def test_top_p_rows_mixed_with_disabled_rows() -> None:
    logits = _probs_logits(P4).unsqueeze(0).expand(2000, -1).contiguous()
    states = [SamplingState.create(SamplingParams(top_p=0.75 if i % 2 else 1.0)) for i in range(2000)]
    ids = torch.tensor(Sampler(torch.Generator().manual_seed(0))(logits, states).token_ids)
    assert set(ids[1::2].tolist()) == {0, 1}
    assert set(ids[0::2].tolist()) == {0, 1, 2, 3}


def test_top_k_then_top_p() -> None:
    # top_k=3 renormalises to [0.526, 0.316, 0.158]; top_p=0.8 keeps {0, 1}.
    assert set(_draw(_probs_logits(P4), 3000, top_k=3, top_p=0.8).tolist()) == {0, 1}


@pytest.mark.parametrize(("min_p", "kept"), [(0.35, {0, 1}), (0.2, {0, 1, 2}), (0.05, {0, 1, 2, 3}), (1.0, {0})])
def test_min_p_excludes_unlikely_tokens(min_p: float, kept: set[int]) -> None:
    assert set(_draw(_probs_logits(P4), 3000, min_p=min_p).tolist()) == kept


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 1.2])
    n = 6000
    counts = torch.bincount(_draw(logits, n, seed=42, temperature=temperature), minlength=8).float()
    probs = (logits / temperature).softmax(-1)
    # df = 7: P(chi2 > 24.32) = 0.001; the draw is seeded, so this is deterministic.
    assert _chi_square(counts, probs) < 24.32
    # The test can fail: the untempered softmax is far off for temperature 0.5.
    if temperature != 1.0:
        assert _chi_square(counts, logits.softmax(-1)) > 100


def test_seeded_draws_also_follow_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    state = SamplingState.create(SamplingParams(seed=3))
    sampler = Sampler()
    ids = [sampler(logits.unsqueeze(0), [state]).token_ids[0] for _ in range(2000)]
    counts = torch.bincount(torch.tensor(ids), minlength=4).float()
    assert _chi_square(counts, logits.softmax(-1)) < 16.27  # df = 3, p = 0.001


# ---------------------------------------------------------------- logprobs
def test_logprobs_from_raw_logits_and_ordered() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(8)) * 3
    states = [
        SamplingState.create(SamplingParams(temperature=0.5, logprobs=5, seed=1)),
        SamplingState.create(SamplingParams(temperature=0.0)),
        SamplingState.create(SamplingParams(temperature=0.0, logprobs=0)),
        SamplingState.create(SamplingParams(temperature=1.3, top_k=10, logprobs=20)),
    ]
    out = Sampler(torch.Generator().manual_seed(0))(logits, states)
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for row, n in ((0, 5), (2, 0), (3, 20)):
        lp = out.logprobs[row]
        assert lp is not None
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(ref[row, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in lp.top] == ref[row].topk(n).indices.tolist()
        for t, v in lp.top:
            assert v == pytest.approx(ref[row, t].item(), abs=1e-5)
    greedy_lp = out.logprobs[2]
    assert greedy_lp is not None
    assert greedy_lp.logprob == pytest.approx(ref[2].max().item(), abs=1e-5)


def test_logprobs_of_greedy_fast_path_and_vocab_limit() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(9))
    logits[:, 25:] = 50.0
    out = Sampler()(logits, _states(2, temperature=0.0, logprobs=3), vocab_limit=25)
    ref = logits[:, :25].log_softmax(-1)
    for row in range(2):
        lp = out.logprobs[row]
        assert lp is not None and all(t < 25 for t, _ in lp.top)
        assert math.isclose(sum(math.exp(v) for v in ref[row].tolist()), 1.0, rel_tol=1e-5)
        assert lp.top[0] == (out.token_ids[row], pytest.approx(ref[row].max().item(), abs=1e-5))


# ---------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_row_independent_of_batch_and_greedy_matches() -> None:
    dev = torch.device("cuda")
    vocab = 1000

    def run(batch_size: int, position: int) -> list[int]:
        target = SamplingState.create(SamplingParams(temperature=1.0, top_p=0.9, seed=5))
        sampler = Sampler(torch.Generator(device=dev).manual_seed(0))
        got = []
        for s in range(10):
            states = _states(batch_size, temperature=0.8)
            states[position] = target
            logits = _step_logits(s, batch_size, vocab, salt=batch_size).to(dev)
            logits[position] = _step_logits(s, 1, vocab)[0].to(dev)
            got.append(sampler(logits, states).token_ids[position])
        return got

    assert run(1, 0) == run(4, 2) == run(7, 6)
    logits = torch.randn(3, vocab, device=dev)
    assert Sampler()(logits, _states(3, temperature=0.0)).token_ids == logits.argmax(-1).tolist()
    cpu_gen_sampler = Sampler(torch.Generator().manual_seed(0))  # CPU engine generator, CUDA logits
    assert all(0 <= t < vocab for t in cpu_gen_sampler(logits, _states(3)).token_ids)


def test_top_p_with_top_k_rows_mixed_with_unfiltered_rows() -> None:
    # Every top-p row has a top-k, so only the top max(k) candidates are sorted; an unfiltered
    # row in the same batch must still reach the whole vocabulary.
    perm = [5, 2, 0, 3, 1, 4]  # vocab position -> rank in P6
    p6 = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    row = torch.tensor([p6[r] for r in perm]).log()
    n = 3000
    logits = row.unsqueeze(0).expand(n, -1).contiguous()
    states = [
        SamplingState.create(
            SamplingParams(top_k=4, top_p=0.7)
            if i % 3 == 0
            else SamplingParams(top_k=3)
            if i % 3 == 1
            else SamplingParams()
        )
        for i in range(n)
    ]
    ids = torch.tensor(Sampler(torch.Generator().manual_seed(0))(logits, states).token_ids)
    ranks = [{perm[t] for t in ids[j::3].tolist()} for j in range(3)]
    # top_k=4 renormalises to [0.444, 0.278, 0.167, 0.111]; top_p=0.7 keeps ranks {0, 1}.
    assert ranks == [{0, 1}, {0, 1, 2}, set(range(6))]


# ---------------------------------------------------------------- penalties
def test_penalties_arithmetic_and_raw_logprobs() -> None:
    """repetition over prompt + output (positive / rp, negative * rp), then frequency per occurrence and
    presence once over the output; logprobs stay those of the raw logits; other rows untouched."""
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logprobs=0
    )
    state = SamplingState.create(params, [1, 2, 2])
    for t in (3, 3, 1):
        state.record(t)
    logits = torch.tensor([[1.0, 2.0, -1.0, 4.0, 0.5], [1.0, 2.0, -1.0, 4.0, 0.5]])
    plain = SamplingState.create(SamplingParams(temperature=0.0), [1, 2])
    plain.record(3)
    penalized = Sampler._penalize(logits, [state, plain])
    assert penalized[0].tolist() == [1.0, 2.0 / 2 - 0.5 - 0.25, -2.0, 4.0 / 2 - 1.0 - 0.25, 0.5]
    assert penalized[1].tolist() == logits[1].tolist()
    out = Sampler()(logits, [state, plain])
    assert out.token_ids == [0, 3]  # 4.0 became 0.75: token 0 (1.0) wins the penalized row
    lp = out.logprobs[0]
    assert lp is not None
    assert lp.logprob == pytest.approx(logits[0].log_softmax(-1)[0].item())


def test_negative_penalties_favour_repeats_and_counts_start_empty() -> None:
    state = SamplingState.create(SamplingParams(temperature=0.0, presence_penalty=-2.0), [4])
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0]])
    assert Sampler()(logits, [state]).token_ids == [1]  # nothing in the output yet: the prompt does not count
    state.record(2)
    assert Sampler()(logits, [state]).token_ids == [2]  # 0.5 + 2


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 100]"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number"),
        ({"presence_penalty": "1"}, "presence_penalty must be a number"),
    ],
)
def test_penalty_validation(kwargs, fragment) -> None:
    from common.errors import InvalidSamplingParamsError

    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert fragment in str(err.value)


def test_only_penalized_requests_keep_token_history() -> None:
    state = SamplingState.create(SamplingParams(), [1, 2, 3])
    state.record(5)
    assert state.prompt_ids == () and state.output_counts == {}
    rep = SamplingState.create(SamplingParams(repetition_penalty=1.2), [3, 1, 3])
    assert rep.prompt_ids == (1, 3)
