"""Draft-model proposer: a small model with the target's vocabulary proposes k tokens autoregressively.

The draft's paged KV cache has as many blocks as the target's and is indexed by the target's block
tables: a request's blocks hold its target KV in the target's cache and its draft KV in the draft's,
so the draft needs no block pool of its own and its KV lives and dies with the request's table.

Per request, `draft_computed` counts the positions whose draft KV is valid. One proposal:

    pass 1     the draft computes tokens [draft_computed, N) (N = tokens so far; usually the 1-2
               tokens the last verification produced, the whole prompt the first time) -> d1;
               at most the token budget per step over all requests: one far behind catches up
               over several steps (no proposal until it has), like a chunked prefill
    pass 2..k  one decode row per request: d_i at position N - 1 + i -> d_{i+1}
    verified   a of k accepted: draft KV is valid for N + min(a, k - 1) positions

The draft recomputes what it has not computed itself: a whole prompt after a prefix-cache hit (the
cached blocks' draft KV may never have been written), after preemption, and on a decode worker of a
disaggregated pair, where only the target's KV arrives over the transfer. That keeps the transfer
plan, the wire and the prefill worker free of any speculative state (docs/architecture.md,
"Speculative decoding").

Greedy requests take the draft's argmax; random ones sample the draft's distribution under the
request's own temperature / top-k / top-p / min-p, kept in `spec_draft_probs` for rejection sampling.
"""

from __future__ import annotations

import dataclasses

import torch

from common.errors import ConfigError
from engine.config import EngineConfig, ParallelConfig
from engine.distributed import LocalExecutor
from engine.loader import load_model_source
from engine.model_runner import ModelRunner, Span
from engine.sampler import Sampler, SamplingState
from engine.shard import ModelShard

_DRAFT_SEED_OFFSET = 0x5EED  # a seeded request's draft draws come from their own stream


class DraftProposer:
    def __init__(
        self,
        config: EngineConfig,
        target_vocab: int,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        generator: torch.Generator,
    ) -> None:
        path = config.speculative.draft_model
        if path is None:
            raise ConfigError("speculative method 'draft' needs draft_model")
        source = load_model_source(path)
        self.fingerprint = source.fingerprint
        if source.config.vocab_size != target_vocab:
            raise ConfigError(
                f"draft model {path!r} has a vocabulary of {source.config.vocab_size} tokens, the "
                f"target {target_vocab}: a draft must share the target's tokenizer"
            )
        draft_config = dataclasses.replace(config, model=path, parallel=ParallelConfig())
        self.shard = ModelShard(draft_config, source, device=device, dtype=dtype)
        self.shard.allocate(num_blocks)
        self.runner = ModelRunner(LocalExecutor(self.shard), self.shard.kv_spec, device)
        self.sampler = Sampler(generator)
        self.device = device
        # tokens the draft catches up on per step, over all requests (the target's token budget): a long
        # prompt's catch-up (on a decode worker, after a prefix hit or preemption) is spread over steps
        # like chunked prefill instead of stalling one step; a request proposes once it has caught up
        self.catchup_budget = config.scheduler.max_num_batched_tokens

    def propose(self, slots) -> None:
        items = [(s.request, s.spec_slots, s.block_ids) for s in slots if s.spec_slots > 0]
        if not items:
            return
        props: dict[int, list[int]] = {}
        probs: dict[int, list[torch.Tensor]] = {}
        spans = []
        ready = []
        budget = self.catchup_budget
        for req, k, blocks in items:
            n_tok = req.num_tokens
            start = min(req.draft_computed, n_tok - 1)
            need = n_tok - start
            if need <= budget:  # caught up in this pass: it proposes
                spans.append(Span(req, req.token_ids, start, need, blocks, need == 1, 1))
                req.draft_computed = n_tok
                ready.append((req, k, blocks))
                budget -= need
            elif budget > 0:  # part of the way this step, no proposal yet
                spans.append(Span(req, req.token_ids, start, budget, blocks, budget == 1, 0))
                req.draft_computed = start + budget
                budget = 0
            req.spec_token_ids, req.spec_draft_probs = [], None
        if spans:
            self._draw(spans, props, probs)
        items = ready
        if not items:
            return
        for i in range(1, max(k for _, k, _ in items)):
            spans = [
                Span(req, req.token_ids + props[id(req)], req.num_tokens - 1 + i, 1, blocks, True, 1)
                for req, k, blocks in items
                if k > i
            ]
            self._draw(spans, props, probs)
        for req, _, _ in items:
            req.spec_token_ids = props[id(req)]
            req.spec_draft_probs = torch.stack(probs[id(req)]) if id(req) in probs else None

    def _draw(self, spans: list[Span], props: dict, probs: dict) -> None:
        batch = self.runner.prepare_spans(spans)
        logits = self.runner.execute(batch)
        reqs = batch.sample
        greedy = [r.params.greedy for r in reqs]
        if any(greedy):
            best = logits.argmax(dim=-1).tolist()
        rand = [i for i, g in enumerate(greedy) if not g]
        if rand:
            states = [self._state(reqs[i]) for i in rand]
            q = self.sampler.distribution(logits[rand], states)
            drawn = self.sampler.race(q, states).tolist()
        for i, req in enumerate(reqs):
            if greedy[i]:
                props.setdefault(id(req), []).append(best[i])
            else:
                j = rand.index(i)
                props.setdefault(id(req), []).append(drawn[j])
                probs.setdefault(id(req), []).append(q[j])

    def _state(self, req) -> SamplingState:
        """Draws for a seeded request come from a draft generator seeded from its seed (reproducible, and
        its target generator's stream untouched); penalties are the target's business, not the draft's."""
        params = dataclasses.replace(req.params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
        if req.params.seed is None:
            return SamplingState.create(params)
        if req.draft_sampling is None:
            seed = (req.params.seed + _DRAFT_SEED_OFFSET) % (1 << 63)
            req.draft_sampling = SamplingState.create(dataclasses.replace(params, seed=seed))
        return req.draft_sampling

    def verified(self, req, num_proposed: int, num_accepted: int) -> None:
        # positions N .. N + num_proposed - 2 hold d1 .. d_{k-1}; those accepted stay valid
        n_before = req.num_tokens - num_accepted - 1  # N: tokens before this step's emitted ones
        req.draft_computed = n_before + min(num_accepted, max(num_proposed - 1, 0))
