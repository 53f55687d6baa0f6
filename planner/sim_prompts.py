"""Prompts as content segments: the bench's datasets, built by the same code and seeds, for the simulator.

A prompt is a tuple of `(segment id, tokens)`: equal content is the same segment id, so shared system prompts,
multi-turn histories and trace prefix groups hash to the same blocks (planner/sim_worker.py, `block_hashes`)
as their token ids would, with exact lengths and without making or tokenizing text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from tandem_api.bench.datasets import Prompt, PromptMaker


@dataclass(frozen=True)
class SegPrompt(Prompt):
    """A prompt as content segments (see sim_worker): exact lengths, no token ids, no text."""

    segments: tuple[tuple[int, int], ...] = ()

    def __add__(self, other: Prompt) -> SegPrompt:
        return SegPrompt(None, "", self.segments + segments_of(other))

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.segments)


def segments_of(p: Prompt) -> tuple[tuple[int, int], ...]:
    if isinstance(p, SegPrompt):
        return p.segments
    raise TypeError(f"the simulator's datasets are made of SegPrompt, got {type(p).__name__}")


_SEGMENT_IDS = itertools.count(1)  # one numbering per process: segments of different makers never collide


class SegmentPromptMaker(PromptMaker):
    """Makes the bench's datasets (same seeds, same lengths and groups) out of fresh segments."""

    def __init__(self) -> None:  # no corpus, no tokenizer: lengths are exact by construction
        self.tokenizer = None
        self.vocab_size = None
        self.corpus_ids = None

    @property
    def exact(self) -> bool:
        return True

    def make(self, n: int, rng: Any) -> Prompt:
        return self.fresh(n)

    def fresh(self, n: int) -> SegPrompt:
        return SegPrompt(None, "", ((next(_SEGMENT_IDS), n),))

    def head(self, prompt: Prompt, n: int) -> Prompt:
        out: list[tuple[int, int]] = []
        for sid, k in segments_of(prompt):
            if n <= 0:
                break
            out.append((sid, min(k, n)))
            n -= k
        return SegPrompt(None, "", tuple(out))
