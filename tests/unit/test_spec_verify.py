"""Rejection sampling keeps the target's distribution; n-gram lookup finds what it should.

`verify` is driven with fixed target rows p and draft rows q over a 6-token vocabulary, many times;
the first emitted token must follow p[0] and, after an accepted first proposal, the second p[1]
(chi-square goodness of fit, p-value > 1e-3, fixed seeds: deterministic). Greedy acceptance stops at
the first mismatch and emits the target's argmax there.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.sampling_params import SamplingParams
from engine.outputs import StepOutput
from engine.sampler import Sampler, SamplingState, TokenLogprobs
from engine.spec_decode.ngram import ngram_lookup
from engine.spec_decode.verify import verify

V = 6
P = torch.tensor(
    [[0.05, 0.40, 0.25, 0.10, 0.15, 0.05], [0.30, 0.05, 0.05, 0.35, 0.20, 0.05], [0.10, 0.10, 0.50, 0.10, 0.10, 0.10]]
)
Q = torch.tensor([[0.30, 0.10, 0.30, 0.10, 0.10, 0.10], [0.10, 0.40, 0.10, 0.10, 0.20, 0.10]])


def chi2_pvalue(counts: Counter, probs: torch.Tensor) -> float:
    n = sum(counts.values())
    expected = probs.double() * n
    observed = torch.tensor([counts.get(i, 0) for i in range(len(probs))], dtype=torch.float64)
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _run(drafts_of, q_rows, n: int, seed: int) -> tuple[Counter, Counter]:
    sampler = Sampler(torch.Generator().manual_seed(seed))
    logits = P.log()
    first: Counter = Counter()
    second: Counter = Counter()
    for i in range(n):
        drafts = drafts_of(i)
        state = SamplingState.create(SamplingParams(temperature=1.0, seed=seed * 100_000 + i))
        req = SimpleNamespace(
            spec_token_ids=drafts, spec_draft_probs=q_rows, params=state.params, sampling=state, spec_accepted=0
        )
        emitted: list[int] = []

        def emit(tok, lp):
            emitted.append(tok)
            return StepOutput("r", [tok], "", finished=False)

        accepted, _ = verify(sampler, req, logits, None, emit)
        assert emitted[:accepted] == drafts[:accepted] and len(emitted) == accepted + 1
        first[emitted[0]] += 1
        if accepted >= 1:
            second[emitted[1]] += 1
    return first, second


def test_draft_model_rejection_sampling_keeps_target_distribution():
    rng = np.random.default_rng(0)
    draws = [[int(rng.choice(V, p=Q[j].numpy() / Q[j].sum().item())) for j in range(2)] for _ in range(6000)]
    first, second = _run(lambda i: draws[i], Q, 6000, seed=1)
    assert chi2_pvalue(first, P[0]) > 1e-3, first
    assert chi2_pvalue(second, P[1]) > 1e-3, second
    # and the test has power: the draft's own distribution is rejected
    assert chi2_pvalue(first, Q[0]) < 1e-6


def test_point_mass_proposals_keep_target_distribution():
    """n-gram proposals carry no distribution: q is a point mass at the proposed token."""
    first, second = _run(lambda i: [1, 3] if i % 2 else [5, 0], None, 6000, seed=2)
    assert chi2_pvalue(first, P[0]) > 1e-3, first
    assert chi2_pvalue(second, P[1]) > 1e-3, second


@pytest.mark.parametrize("drafts, emitted", [([1, 3], [1, 3, 2]), ([1, 0], [1, 3]), ([4, 3], [1]), ([], [1])])
def test_greedy_acceptance(drafts: list[int], emitted: list[int]) -> None:
    state = SamplingState.create(SamplingParams(temperature=0.0))
    req = SimpleNamespace(
        spec_token_ids=drafts, spec_draft_probs=None, params=state.params, sampling=state, spec_accepted=0
    )
    out: list[int] = []

    def emit(tok: int, lp: TokenLogprobs | None) -> StepOutput:
        out.append(tok)
        return StepOutput("r", [tok], "", finished=False)

    rows = P[: len(drafts) + 1].log()
    for greedy_ids in (rows.argmax(-1).tolist(), None):  # the batched argmax and the per-row sampler agree
        out.clear()
        accepted, _ = verify(Sampler(), req, rows, greedy_ids, emit)
        assert out == emitted and accepted == len(emitted) - 1


def test_greedy_stops_when_a_token_finishes() -> None:
    state = SamplingState.create(SamplingParams(temperature=0.0))
    req = SimpleNamespace(
        spec_token_ids=[1, 3], spec_draft_probs=None, params=state.params, sampling=state, spec_accepted=0
    )
    out: list[int] = []

    def emit(tok: int, lp: TokenLogprobs | None) -> StepOutput:
        out.append(tok)
        return StepOutput("r", [tok], "", finished=True)

    accepted, outs = verify(Sampler(), req, P.log(), None, emit)
    assert out == [1] and accepted == 1 and len(outs) == 1


@pytest.mark.parametrize(
    "tokens, k, lo, hi, expected",
    [
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 3, [4, 1, 2]),  # longest suffix "1 2 3" seen at 0: what followed it
        ([1, 2, 9, 5, 2, 7, 1, 2], 2, 1, 3, [9, 5]),  # "1 2" at 0 (the later "2" at 4 is only a 1-gram)
        ([5, 6, 5, 7, 5], 2, 1, 1, [7, 5]),  # latest earlier occurrence of "5" wins
        ([1, 2, 3, 4], 3, 1, 3, []),  # nothing repeats
        ([1, 2, 1, 2], 3, 3, 4, []),  # a 2-gram repeats, but min is 3
        ([7], 2, 1, 3, []),
        ([3, 3, 3], 4, 1, 2, [3]),  # the match ends one before the last token: one token follows
    ],
)
def test_ngram_lookup(tokens, k, lo, hi, expected):
    assert ngram_lookup(tokens, k, lo, hi) == expected
