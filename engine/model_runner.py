"""Turns a scheduler step into tensors, runs the model, returns logits to sample.

Requests with exactly one token this step (decoding, or a prefill with one token
left) go first and share the batched decode attention path; prefill chunks
follow, one attention call each. Logits are computed only for requests whose
scheduled tokens reach the end of their known tokens (the others are partway
through a chunked prefill and sample nothing this step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import KVCacheSpec
from engine.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.shard import ModelInputs


@dataclass
class StepBatch:
    order: list[ScheduledRequest]  # decode-like first, then prefill chunks
    sample: list[ScheduledRequest]  # those that produce a token, in logits row order
    input_ids: torch.Tensor
    positions: torch.Tensor
    md: AttentionMetadata
    logits_indices: torch.Tensor

    def model_inputs(self) -> ModelInputs:
        return ModelInputs(self.input_ids, self.positions, self.md, self.logits_indices)


def length_groups(sorted_lens: list[int], ratio: float = 1.5, min_rows: int = 4, max_groups: int = 4) -> list[tuple[int, int]]:
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
        bs = self.spec.block_size
        # decode-like rows sorted by context length, so that length groups are contiguous
        decode = sorted((s for s in out.scheduled if s.num_new_tokens == 1), key=lambda s: s.start)
        prefill = [s for s in out.scheduled if s.num_new_tokens > 1]
        order = decode + prefill
        ids: list[int] = []
        pos: list[int] = []
        slot_block: list[int] = []
        slot_off: list[int] = []
        logits_idx: list[int] = []
        sample: list[ScheduledRequest] = []
        chunks: list[PrefillChunk] = []
        for s in order:
            start, n = s.start, s.num_new_tokens
            req = s.request
            first = len(ids)
            ids.extend(req.token_ids[start : start + n])
            rng = range(start, start + n)
            pos.extend(rng)
            slot_block.extend(s.block_ids[p // bs] for p in rng)
            slot_off.extend(p % bs for p in rng)
            if start + n == req.num_tokens:
                logits_idx.append(len(ids) - 1)
                sample.append(s)
            if n > 1:
                ctx = start + n
                if start == 0:
                    chunks.append(PrefillChunk(first, first + n, ctx, None, None))
                else:
                    nblk = -(-ctx // bs)
                    blocks = torch.tensor(s.block_ids[:nblk], dtype=torch.long, device=self.device)
                    q_pos = torch.arange(start, ctx, device=self.device)
                    mask = torch.arange(ctx, device=self.device)[None, :] <= q_pos[:, None]
                    chunks.append(PrefillChunk(first, first + n, ctx, blocks, mask))
        dev = self.device
        t_block = torch.tensor(slot_block, dtype=torch.long, device=dev)
        t_off = torch.tensor(slot_off, dtype=torch.long, device=dev)
        md = AttentionMetadata(
            slot_block=t_block, slot_offset=t_off, slot_mapping=t_block * bs + t_off, num_decode=len(decode), prefills=chunks
        )
        ctx_lens = [s.start + 1 for s in decode]
        for lo, hi in length_groups(ctx_lens):
            rows = decode[lo:hi]
            max_blocks = -(-ctx_lens[hi - 1] // bs)
            table = [s.block_ids[:max_blocks] + [0] * (max_blocks - min(len(s.block_ids), max_blocks)) for s in rows]
            lens = torch.tensor(ctx_lens[lo:hi], dtype=torch.long, device=dev)
            mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None]).view(hi - lo, 1, 1, -1)
            md.decode_groups.append(DecodeGroup(lo, hi, torch.tensor(table, dtype=torch.long, device=dev), mask, lens))
        return StepBatch(
            order=order,
            sample=sample,
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            md=md,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(batch.sample), vocab] in float32."""
        return self.executor.execute(batch.model_inputs())
