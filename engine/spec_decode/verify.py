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

from typing import Callable

import torch

from engine.outputs import StepOutput
from engine.sampler import Sampler, TokenLogprobs

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
