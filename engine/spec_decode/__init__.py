"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and exact verification.

    step():  scheduler gives a decoding request 1 + k slots (k = num_speculative_tokens, fewer near
             max_tokens or the token budget, 0 when the decode batch exceeds disable_batch_size)
             proposer.propose(...)   -> request.spec_token_ids (<= k tokens; none when nothing matches)
             target forward: the last sampled token + the proposals, one decode-like row each
             verify (verify.py)       -> accepted proposals + one token of the target's own
             num_computed += 1 + accepted; commit; blocks only rejected tokens reached are trimmed

See `proposer.py` for the interface, `ngram.py` and `draft.py` for the two proposers.
"""

from engine.spec_decode.proposer import Proposer, describe, make_proposer
from engine.spec_decode.verify import verify_step

__all__ = ["Proposer", "describe", "make_proposer", "verify_step"]
