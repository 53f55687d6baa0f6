"""Stop-string search over the output text, looking only where new text can complete a match.

Order of the stop checks the engine runs after each generated token `tid`
(the first that fires wins):

    1. append tid to the request's output token ids
    2. delta = detokenizer.push(tid)          (text is updated first, so a
                                               stop string ending in tid's text is seen)
    3. tid in params.stop_token_ids           -> finish "stop"   (token kept in ids)
    4. tid is an EOS id and not ignore_eos    -> finish "stop"
    5. len(output ids) >= params.max_tokens   -> finish "length"
    6. find_stop(text, len(delta), params.stop, params.include_stop_str_in_output)
                                              -> finish "stop", text cut to text[:truncate_at]

`find_stop` only scans the tail that the newest `new_text_len` characters could
complete, so the cost per token is O(len(delta) + longest stop), not
O(len(text)). When several stop strings match in that tail, the one that
*completes first* (smallest end index) wins, as it would have if the text had
arrived one character at a time; on equal ends the longer one (earlier start)
wins.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, new_text_len: int, stops: Sequence[str], include_stop_str: bool) -> tuple[int, str] | None:
    """Return (truncate_at, matched_stop) for the first stop string completed by the new text, else None.

    `text` is all output text so far, its last `new_text_len` characters new.
    The output must be cut to `text[:truncate_at]`: the cut keeps the stop
    string when `include_stop_str`, else it ends just before it.
    """
    if not stops or new_text_len <= 0:
        return None
    new_start = max(len(text) - new_text_len, 0)
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        if not stop:
            continue
        # A match completed by the new text ends after new_start, so it starts at or after this.
        idx = text.find(stop, max(new_start - len(stop) + 1, 0))
        if idx < 0:
            continue
        end = idx + len(stop)
        if best is None or (end, idx) < (best[0], best[1]):
            best = (end, idx, stop)
    if best is None:
        return None
    end, start, stop = best
    return (end if include_stop_str else start), stop
