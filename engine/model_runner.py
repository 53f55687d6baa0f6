"""Turns a scheduler step into tensors, runs the model, returns logits to sample.

Requests with exactly one token this step (decoding, or a prefill with one token
left) and requests verifying proposed tokens (one row per token) go first and share
the batched decode attention path; prefill chunks follow, one attention call each.
Logits are computed only for requests whose scheduled tokens reach the end of their
known tokens (the others are partway through a chunked prefill and sample nothing
this step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import KVCacheSpec
from engine.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.shard import ModelInputs


@dataclass
class Span:
    """Tokens [start, start + n) of one sequence to compute in one forward pass.

    `rows`: each token is its own decode-like row (one query token attending to the cache up to its
    position): plain decoding, and verification of proposed tokens (engine/spec_decode/), whose KV is
    written before attention so row i sees rows < i. Otherwise the span is a prefill chunk.
    `num_logits`: logits wanted for the last `num_logits` positions (0: none this pass).
    """

    key: object  # whatever the caller uses to find its logits again (a ScheduledRequest, a Request)
    tokens: list[int]
    start: int
    n: int
    block_ids: list[int]
    rows: bool
    num_logits: int


@dataclass
class StepBatch:
    order: list  # spans' keys, decode-like rows' first, then prefill chunks
    sample: list  # keys of the spans that want logits, in logits row order
    sample_rows: list[int]  # logits rows of each of them (1, or 1 + proposed tokens)
    input_ids: torch.Tensor
    positions: torch.Tensor
    md: AttentionMetadata
    logits_indices: torch.Tensor

    def model_inputs(self) -> ModelInputs:
        return ModelInputs(self.input_ids, self.positions, self.md, self.logits_indices)


def scheduled_span(s: ScheduledRequest) -> Span:
    req = s.request
    spec = req.spec_token_ids
    if spec:  # verification: the last sampled token and the proposals, all with logits
        return Span(s, req.token_ids + spec, s.start, s.num_new_tokens, s.block_ids, True, s.num_new_tokens)
    wants = 1 if s.start + s.num_new_tokens == req.num_tokens else 0
    return Span(s, req.token_ids, s.start, s.num_new_tokens, s.block_ids, s.num_new_tokens == 1, wants)


def length_groups(
    sorted_lens: list[int], ratio: float = 1.5, min_rows: int = 4, max_groups: int = 4
) -> list[tuple[int, int]]:
    """Cut ascending context lengths into contiguous [lo, hi) groups.

    A new group starts when a length exceeds `ratio` times the group's shortest
    and the group already has `min_rows` rows, at most `max_groups` groups: every
    attention call then pads at most ~1.5x, and tiny batches stay one call.
    """
    groups: list[tuple[int, int]] = []
    lo = 0
    for i in range(1, len(sorted_lens)):
        if sorted_lens[i] > ratio * sorted_lens[lo] and i - lo >= min_rows and len(groups) < max_groups - 1:
            groups.append((lo, i))
            lo = i
    if sorted_lens:
        groups.append((lo, len(sorted_lens)))
    return groups


class ModelRunner:
    """Builds each step's tensors on `device`; the executor (engine/distributed.py) runs them."""

    def __init__(self, executor, spec: KVCacheSpec, device: torch.device) -> None:
        self.executor = executor
        self.spec = spec
        self.device = device

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        return self.prepare_spans([scheduled_span(s) for s in out.scheduled])

    def prepare_spans(self, spans: list[Span]) -> StepBatch:
        bs = self.spec.block_size
        # decode-like rows sorted by context length, so that length groups are contiguous
        rows = sorted(
            ((sp, p) for sp in spans if sp.rows for p in range(sp.start, sp.start + sp.n)), key=lambda r: r[1]
        )
        prefill = [sp for sp in spans if not sp.rows]
        ids: list[int] = []
        pos: list[int] = []
        slot_block: list[int] = []
        slot_off: list[int] = []
        row_of: dict[tuple[int, int], int] = {}  # (span index, position) -> token index, for logits
        index = {id(sp): i for i, sp in enumerate(spans)}
        chunks: list[PrefillChunk] = []
        for sp, p in rows:
            row_of[(index[id(sp)], p)] = len(ids)
            ids.append(sp.tokens[p])
            pos.append(p)
            slot_block.append(sp.block_ids[p // bs])
            slot_off.append(p % bs)
        for sp in prefill:
            start, n = sp.start, sp.n
            first = len(ids)
            ids.extend(sp.tokens[start : start + n])
            rng = range(start, start + n)
            pos.extend(rng)
            slot_block.extend(sp.block_ids[p // bs] for p in rng)
            slot_off.extend(p % bs for p in rng)
            row_of[(index[id(sp)], start + n - 1)] = len(ids) - 1
            ctx = start + n
            if start == 0:
                chunks.append(PrefillChunk(first, first + n, ctx, None, None))
            else:
                nblk = -(-ctx // bs)
                blocks = torch.tensor(sp.block_ids[:nblk], dtype=torch.long, device=self.device)
                q_pos = torch.arange(start, ctx, device=self.device)
                mask = torch.arange(ctx, device=self.device)[None, :] <= q_pos[:, None]
                chunks.append(PrefillChunk(first, first + n, ctx, blocks, mask))
        logits_idx: list[int] = []
        sample: list = []
        sample_rows: list[int] = []
        for i, sp in enumerate(spans):
            if sp.num_logits:
                end = sp.start + sp.n
                logits_idx.extend(row_of[(i, p)] for p in range(end - sp.num_logits, end))
                sample.append(sp.key)
                sample_rows.append(sp.num_logits)
        dev = self.device
        t_block = torch.tensor(slot_block, dtype=torch.long, device=dev)
        t_off = torch.tensor(slot_off, dtype=torch.long, device=dev)
        md = AttentionMetadata(
            slot_block=t_block,
            slot_offset=t_off,
            slot_mapping=t_block * bs + t_off,
            num_decode=len(rows),
            prefills=chunks,
        )
        ctx_lens = [p + 1 for _, p in rows]
        for lo, hi in length_groups(ctx_lens):
            group = rows[lo:hi]
            max_blocks = -(-ctx_lens[hi - 1] // bs)
            table = [
                sp.block_ids[:max_blocks] + [0] * (max_blocks - min(len(sp.block_ids), max_blocks)) for sp, _ in group
            ]
            lens = torch.tensor(ctx_lens[lo:hi], dtype=torch.long, device=dev)
            mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None]).view(hi - lo, 1, 1, -1)
            md.decode_groups.append(DecodeGroup(lo, hi, torch.tensor(table, dtype=torch.long, device=dev), mask, lens))
        return StepBatch(
            order=[sp.key for sp in spans if sp.rows] + [sp.key for sp in prefill],
            sample=sample,
            sample_rows=sample_rows,
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            md=md,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(batch.sample), vocab] in float32."""
        return self.executor.execute(batch.model_inputs())
