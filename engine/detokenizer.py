"""Incremental detokenization: token ids in, newly completed text out.

Decoding the whole output after every token costs O(length) per token. Instead
we decode a short *window* of recent token ids and remember how many of its
characters were already emitted (`_done`):

    window:  | context tokens (already emitted) | new tokens |
    decode:  |<------------- _done ------------>| delta |?|
                                                          ^ a trailing U+FFFD is held back

- Context tokens matter: several decoders render a token differently at the
  start of a decode (SentencePiece/Metaspace drop the leading space), so the
  new tokens are always decoded after a few older ones (the prefix_offset /
  read_offset technique of TGI and vLLM).
- A byte-level token can end in the middle of a multi-byte UTF-8 character;
  the decode then ends in U+FFFD. That last character is held back until a
  later token completes it (or `flush` gives up on it at the end), so no delta
  ever splits a character. Everything before it is emitted at once.
- The window is trimmed to its last `_KEEP` tokens when it grows past
  `2 * _KEEP`; `_done` is re-based on the trimmed window (the held-back tail,
  at most one character of at most 4 bytes, lies inside the kept tokens).
  So each push decodes at most `2 * _KEEP + 1` tokens: bounded cost.

Invariant, for any ids (tested): "".join(push(t) for t in ids) + flush()
== tokenizer.decode(ids) when the prompt is empty (and, with a prompt, the
text that the output tokens add after the prompt's text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
_KEEP = 8  # context tokens kept after a trim; more than a UTF-8 character's 4 bytes


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas."""

    def __init__(
        self, tokenizer: Decoder, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = list(prompt_token_ids[-_KEEP:])
        # The prompt's own text is context, never output.
        self._done = len(self._decode(self._window)) if self._window else 0
        self.text = ""  # all output text emitted so far (excluding what is held back)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" if none yet)."""
        self._window.append(token_id)
        decoded = self._decode(self._window)
        end = len(decoded) - 1 if decoded.endswith(_REPLACEMENT) else len(decoded)
        delta = decoded[self._done : end] if end > self._done else ""
        self._done = max(self._done, end)
        if len(self._window) > 2 * _KEEP:
            self._trim(decoded)
        self.text += delta
        return delta

    def _trim(self, decoded: str) -> None:
        """Keep the last `_KEEP` tokens; re-base `_done` so the unemitted tail lines up."""
        pending = max(len(decoded) - self._done, 0)  # 0 or the one held-back character
        kept = self._window[-_KEEP:]
        kept_text = self._decode(kept)
        if pending and not kept_text.endswith(decoded[-pending:]):
            return  # the held-back bytes reach past the kept tokens (only with invisible tokens): wait
        self._window = kept
        self._done = max(len(kept_text) - pending, 0)

    def flush(self) -> str:
        """End of the request: return whatever is still held back (may be U+FFFD if truly invalid)."""
        decoded = self._decode(self._window)
        rest = decoded[self._done :]
        self._done = len(decoded)
        self.text += rest
        return rest
