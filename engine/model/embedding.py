"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary rows. The embedding zeroes
rows outside its slice and all-reduces; the head computes its slice of the
logits and all-gathers them. With one rank both are plain lookups / matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.cpu_kernels import CpuKernels, cpu_kernels
from engine.model.linear import LinearBase, kernel_max_rows
from engine.model.parallel import SINGLE_RANK, ParallelContext


def _vocab_range(vocab_size: int, pc: ParallelContext) -> tuple[int, int]:
    per = -(-vocab_size // pc.tp_size)  # ceil: the last rank may hold padding rows
    return pc.tp_rank * per, (pc.tp_rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, *, dtype, device, pc: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.pc = pc
        self.vocab_size = vocab_size
        self.start, self.end = _vocab_range(vocab_size, pc)
        self.weight = nn.Parameter(
            torch.zeros(self.end - self.start, hidden, dtype=dtype, device=device), requires_grad=False
        )

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        rows = loaded[self.start : min(self.end, loaded.shape[0])]
        LinearBase._copy(param.data[: rows.shape[0]], rows, "embedding shard")

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.pc.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.pc.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; may share its weight with the embedding (tied)."""

    _kernel: CpuKernels | None = None
    _packed: torch.Tensor | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def finalize(self) -> None:
        """On CPU, a packed copy for the CPU kernel (kept beside a tied embedding's rows; bf16: decode batches only)."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
            kernel = cpu_kernels()
            if kernel is not None:
                self._kernel, self._packed = kernel, kernel.pack(w.data)
                self._kernel_max_rows = kernel_max_rows(kernel, w.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        packed = self._packed
        if (
            self._kernel is not None
            and packed is not None
            and hidden.numel() <= self._kernel_max_rows * hidden.shape[-1]
        ):
            logits = self._kernel.linear(hidden, packed, None, self.weight.shape[0])
        else:
            logits = F.linear(hidden, self.weight)
        if self.pc.tp_size == 1:
            return logits
        return self.pc.all_gather_last_dim(logits)[..., : self.vocab_size]
