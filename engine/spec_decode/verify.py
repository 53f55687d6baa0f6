"""Verification: which proposed tokens the target accepts, and the one token of its own after them.

The target's logits for a request verifying k proposals d1..dk are k + 1 rows: row i is the
distribution at the position of d_{i+1} (row k: after dk). Tokens are emitted in order, each through
the engine's usual append (stop tokens, EOS, max_tokens and stop strings are checked per token, so a
stop landing mid-proposal ends the request exactly where a plain run ends it):

* greedy rows: emit argmax(row i) (penalties applied as for any greedy row); while it equals d_{i+1}
  the proposal is accepted and the next row is read. The tokens are exactly the non-speculative
  greedy tokens: each row saw the same context a plain step would have.
* random rows (rejection sampling, Leviathan et al. 2023; Chen et al. 2023): p = the target's
  distribution after penalties, temperature and filters, q = the draft's (a point mass for n-gram
  proposals). d is accepted with probability min(1, p(d) / q(d)); on rejection a token is drawn from
  max(0, p - q), normalised, and verification ends. After k acceptances one token is drawn from the
  last row. Each emitted token is then distributed exactly as the target's. Draws come from the
  request's own generator when it is seeded, so a seeded request reproduces.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch

from engine.outputs import StepOutput, merge_step_outputs
from engine.sampler import Sampler, TokenLogprobs

if TYPE_CHECKING:
    from engine.kv_cache_manager import KVCacheManager
    from engine.model_runner import StepBatch
    from engine.spec_decode.proposer import Proposer

Emit = Callable[[int, "TokenLogprobs | None"], StepOutput]


def verify(
    sampler: Sampler, req, logits: torch.Tensor, greedy_ids: list[int] | None, emit: Emit
) -> tuple[int, list[StepOutput]]:
    """Emit the accepted proposals and the target's own token; returns (proposals accepted, outputs).

    `greedy_ids`: argmax of each row, precomputed for a greedy request without penalties (else None).
    Stops early when an emitted token finishes the request.
    """
    drafts = req.spec_token_ids
    q_rows = req.spec_draft_probs
    params = req.params
    state = req.sampling
    outs: list[StepOutput] = []
    accepted = 0
    for i in range(len(drafts) + 1):
        row = logits[i : i + 1]
        draft = drafts[i] if i < len(drafts) else None
        if params.greedy or draft is None:
            if greedy_ids is not None:
                tok = greedy_ids[i]
                lp = sampler.logprobs(row, [params], [tok])[0] if params.logprobs is not None else None
            else:
                res = sampler(row, [state])
                tok, lp = res.token_ids[0], res.logprobs[0]
            ok = tok == draft
        else:
            p = sampler.distribution(row, [state])[0]
            qd = float(q_rows[i][draft]) if q_rows is not None else 1.0
            ok = sampler.uniform(state, row.device) * qd < float(p[draft])
            if ok:
                tok = draft
            else:
                residual = p.clone()
                if q_rows is not None:
                    residual = (residual - q_rows[i].to(residual.device)).clamp_min_(0.0)
                else:
                    residual[draft] = 0.0
                if float(residual.sum()) <= 0.0:  # p == q up to rounding: fall back to p without d
                    residual = p.clone()
                    residual[draft] = 0.0
                tok = int(sampler.race(residual.unsqueeze(0), [state])[0])
            lp = sampler.logprobs(row, [params], [tok])[0] if params.logprobs is not None else None
        if ok:
            accepted += 1
            req.spec_accepted += 1
        out = emit(tok, lp)
        outs.append(out)
        if out.finished or not ok:
            break
    return accepted, outs


def verify_step(
    sampler: Sampler,
    kv_manager: KVCacheManager,
    proposer: Proposer | None,
    k_max: int,
    append: Callable[..., StepOutput],
    batch: StepBatch,
    logits: torch.Tensor,
    offsets: list[int],
    now: float,
) -> tuple[list[StepOutput], int, int, int]:
    """The requests of one step that verified proposals: accept, emit (`append(req, tid, lp, now=)`, the
    engine's append), advance their computed tokens, adapt their next proposal length. `offsets[i]`: the
    first logits row of `batch.sample[i]`. Returns the outputs and this step's (steps, proposed, accepted)."""
    greedy_ids = None
    todo = [(i, s.request) for i, s in enumerate(batch.sample) if s.request.spec_token_ids]
    if any(r.params.greedy and not r.params.penalized for _, r in todo):
        greedy_ids = logits.argmax(dim=-1).tolist()
    outputs = []
    proposed = accepted_total = 0
    for i, req in todo:
        lo, hi = offsets[i], offsets[i + 1]
        k = len(req.spec_token_ids)
        start = req.num_computed_tokens
        req.spec_steps += 1
        req.spec_proposed += k
        plain_greedy = greedy_ids is not None and req.params.greedy and not req.params.penalized
        fast = greedy_ids[lo:hi] if greedy_ids is not None and plain_greedy else None
        accepted, outs = verify(sampler, req, logits[lo:hi], fast, functools.partial(append, req, now=now))
        proposed += k
        accepted_total += accepted
        # the next proposal's length follows this one's fate: all accepted -> twice as many (up to
        # num_speculative_tokens), else one more than were accepted: rejected rows cost a step time
        req.spec_k = min(k_max, 2 * k) if accepted == k else accepted + 1
        if not req.status.finished:
            req.num_computed_tokens = start + 1 + accepted
            kv_manager.commit(req.request_id, req.token_ids, req.num_computed_tokens)
            if proposer is not None:
                proposer.verified(req, k, accepted)
        outputs.append(merge_step_outputs(outs))
    return outputs, len(todo), proposed, accepted_total
