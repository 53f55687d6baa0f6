"""N-gram prompt lookup: propose the tokens that followed the request's latest earlier n-gram match.

The longest suffix of the request's tokens (prompt + output) of prompt_lookup_max down to
prompt_lookup_min tokens that also occurs earlier is looked up; its most recent earlier occurrence
proposes up to k of the tokens after it. No weights, no state; nothing is proposed on a miss, so a
request whose text never repeats verifies nothing and pays nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_lookup(tokens: Sequence[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    arr = np.asarray(tokens, dtype=np.int64)
    total = len(arr)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        # windows starting at 0 .. total - n - 1: every earlier occurrence, never the suffix itself
        windows = sliding_window_view(arr[: total - 1], n)
        hits = np.flatnonzero((windows == arr[total - n :]).all(axis=1))
        if hits.size:
            after = int(hits[-1]) + n
            return arr[after : after + k].tolist()
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, slots) -> None:
        for s in slots:
            req = s.request
            req.spec_token_ids = ngram_lookup(req.token_ids, s.spec_slots, self.n_min, self.n_max)
            req.spec_draft_probs = None

    def verified(self, req, num_proposed: int, num_accepted: int) -> None:
        pass
