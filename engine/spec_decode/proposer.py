"""The proposer interface. A proposer fills `request.spec_token_ids` for the requests a step verifies.

    propose(slots)           slots: the step's ScheduledRequests with spec_slots > 0; set at most
                             spec_slots tokens in each request's spec_token_ids (and, for a proposer
                             that samples, spec_draft_probs: the distribution each token was drawn from,
                             [k, V]; None means each proposal is a point mass, as for n-gram lookup)
    verified(req, k, a)      after verification: k tokens proposed, a accepted (a proposer with its own
                             state, a draft model's KV, updates it here)

A proposer never changes the target's KV or the request's tokens: verification alone decides what is
emitted, so every proposer keeps the target's outputs exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from engine.config import EngineConfig, SpeculativeConfig
    from engine.request import Request
    from engine.scheduler import ScheduledRequest


class Proposer(Protocol):
    def propose(self, slots: Sequence[ScheduledRequest]) -> None: ...

    def verified(self, req: Request, num_proposed: int, num_accepted: int) -> None: ...


def describe(spec: SpeculativeConfig, proposer: Proposer | None) -> str:
    """The speculative config in one comparable string ("" when off); checked equal on every worker of a
    cluster when they start and when one joins. A draft is named by its weights' fingerprint."""
    if not spec.enabled:
        return ""
    desc = f"{spec.method} k={spec.num_speculative_tokens} off_above={spec.disable_batch_size}"
    if spec.method == "ngram":
        return f"{desc} lookup={spec.prompt_lookup_min}..{spec.prompt_lookup_max}"
    return f"{desc} draft={getattr(proposer, 'fingerprint', '')}"


def make_proposer(
    config: EngineConfig,
    target_vocab: int,
    device: torch.device,
    dtype: torch.dtype,
    num_blocks: int,
    generator: torch.Generator,
) -> Proposer | None:
    spec = config.speculative
    if spec.method is None:
        return None
    if spec.method == "ngram":
        from engine.spec_decode.ngram import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from engine.spec_decode.draft import DraftProposer

    return DraftProposer(config, target_vocab, device, dtype, num_blocks, generator)
