"""Linear layers that know which shard of the full weight they hold.

Each layer allocates only its rank's slice and exposes `weight_loader(param,
full_tensor, shard_id)`, which narrows a full checkpoint tensor to that slice.
Loading code therefore never does sharding arithmetic, and tensor parallelism
only changes the `ParallelContext` handed in.

    ColumnParallelLinear   output dim split across ranks      (no communication)
    MergedColumnLinear     [gate | up] fused, each part split  (shard_id 0, 1, ...)
    QKVLinear              [q | k | v] fused by heads          (shard_id "q", "k", "v")
    RowParallelLinear      input dim split, outputs all-reduced

After loading, `finalize()` picks the fastest matmul form for the device and
dtype. On CPU in float32 that is Tandem's own kernel (`cpu_kernels.py`): the weight is
packed into blocks of 64 (AVX-512) or 32 (AVX2) outputs that stream sequentially, which
reads weights at the core's full bandwidth for decode-sized batches (issue 17: 26 GB/s on one
thread where `x @ W[in, out]` reached 17.6 and `F.linear` 11) and is level with oneDNN at
prefill sizes on AVX-512 (on AVX2 oneDNN is 1.05-1.4x faster there, so float32 keeps a second,
[in, out] copy for batches over F32_AVX2_KERNEL_MAX_ROWS). Without a compiler, fp32 falls back to
`x @ W` in the [in, out] layout (`benchmarks/gemv_bandwidth.py`). bf16 keeps the stored [out, in]
weight for F.linear (oneDNN's bf16 dot products win at prefill sizes) and a packed copy for
decode-sized batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.cpu_kernels import CpuKernels, cpu_kernels
from engine.model.parallel import SINGLE_RANK, ParallelContext

# bfloat16: batches of at most this many rows use the packed kernel (it streams the weights faster), larger ones
# oneDNN's bf16 dot products. Chosen on whole decode steps, where the weights come from memory, not on one weight
# in cache (there oneDNN wins from 8 rows, `cpu_kernels_micro.py`): `benchmarks/bf16_crossover.py` (2026-12-06
# 21:33, AVX512-BF16 EPYC, 1 thread, 288-token rows), step ms at 4 / 12 as the threshold: 5 rows 68.1 / 42.9,
# 8 rows 72.3 / 59.9, 12 rows 97.8 / 87.5, 16 rows 146 / 145, 24 rows 211 / 193. Measured at one thread (a
# worker's default); with more threads per worker the crossover was not re-measured
BF16_KERNEL_MAX_ROWS = 12
# (so in bf16 a row's logits can differ by bf16 rounding with the size of its batch)
# float32 with the 8-lane (AVX2) kernels: batches of at most this many rows use the packed kernel, larger ones
# oneDNN (`x @ W[in, out]`, a second copy of the weights): at prefill sizes oneDNN's AVX2 GEMM is 1.05-1.4x the
# kernel's speed (`cpu_kernels_micro.py`, docs/BENCHMARKS.md). With AVX-512 the kernel is level with oneDNN at
# every size and float32 keeps the packed copy only. Rows of one request get the same bits either way only where
# both paths sum alike, so float32 on AVX2 is batch-invariant up to this many rows, as bf16 is up to its threshold.
F32_AVX2_KERNEL_MAX_ROWS = 32


def kernel_max_rows(kernel: CpuKernels, dtype: torch.dtype) -> float:
    """Rows up to which a linear of `dtype` runs the packed kernel; above it, oneDNN over a second weight copy."""
    if dtype == torch.bfloat16:
        return BF16_KERNEL_MAX_ROWS
    return float("inf") if kernel.lanes >= 16 else F32_AVX2_KERNEL_MAX_ROWS


class LinearBase(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self._weight_t: torch.Tensor | None = None  # [in, out] copy when that form is faster
        self._packed: torch.Tensor | None = None  # [ceil(out / 64), in, 64] for the CPU kernel
        self._kernel: CpuKernels | None = None
        self._kernel_max_rows = float("inf")  # bf16: rows above this go to oneDNN

    def finalize(self) -> None:
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return
        kernel = cpu_kernels()
        if kernel is not None:  # decode-sized batches on the kernel; prefill too, or on oneDNN (both layouts kept)
            self._kernel, self._kernel_max_rows = kernel, kernel_max_rows(kernel, w.dtype)
        if w.dtype == torch.bfloat16:
            if kernel is not None:
                self._packed = kernel.pack(w.data)
            return
        if kernel is not None and self._kernel_max_rows == float("inf"):
            self._packed = kernel.pack(w.data)
            # the packed copy is the only one kept: the parameter becomes an empty placeholder
            self.weight = nn.Parameter(w.new_empty(0), requires_grad=False)
            return
        self._weight_t = w.t().contiguous()
        # keep the [out, in] parameter as a transposed view of the same storage (no double memory)
        self.weight = nn.Parameter(self._weight_t.t(), requires_grad=False)
        if kernel is not None:  # float32 on AVX2: packed from the [in, out] copy, runs of a block's width
            self._packed = kernel.pack_t(self._weight_t)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + bias, plus `residual` when given (fused into the CPU kernel's output pass)."""
        packed = self._packed
        if self._kernel is not None and packed is not None and x.numel() <= self._kernel_max_rows * x.shape[-1]:
            return self._kernel.linear(x, packed, self.bias, self.out_features, residual)
        if self._weight_t is not None:
            y = torch.addmm(self.bias, x, self._weight_t) if self.bias is not None else x @ self._weight_t
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
        if dst.shape != src.shape:
            from common.errors import ModelLoadError

            raise ModelLoadError(f"weight {what}: expected shape {tuple(dst.shape)}, checkpoint has {tuple(src.shape)}")
        dst.copy_(src)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features, out_features, bias=False, *, dtype, device, pc: ParallelContext = SINGLE_RANK):
        self.pc = pc
        self.out_start, self.out_end = pc.split(out_features, "output features")
        super().__init__(in_features, self.out_end - self.out_start, bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        self._copy(param.data, loaded[self.out_start : self.out_end], "column shard")


class MergedColumnLinear(LinearBase):
    """Several column-parallel outputs fused into one matmul ([gate | up])."""

    def __init__(
        self, in_features, out_sizes: list[int], bias=False, *, dtype, device, pc: ParallelContext = SINGLE_RANK
    ):
        self.pc = pc
        self.out_sizes = list(out_sizes)
        self.local_sizes = [pc.split(n, "output features")[1] - pc.split(n, "output features")[0] for n in out_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int) -> None:
        start, end = self.pc.split(self.out_sizes[shard_id], "output features")
        offset = sum(self.local_sizes[:shard_id])
        self._copy(param.data[offset : offset + end - start], loaded[start:end], f"merged shard {shard_id}")


class QKVLinear(LinearBase):
    """[q | k | v] projections fused; query heads split, KV heads split or replicated."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias=False,
        *,
        dtype,
        device,
        pc: ParallelContext = SINGLE_RANK,
    ):
        self.pc = pc
        self.head_dim = head_dim
        self.q_heads = pc.split(num_heads, "num_heads")
        self.kv_heads = pc.kv_head_range(num_kv_heads)
        self.num_local_heads = self.q_heads[1] - self.q_heads[0]
        self.num_local_kv_heads = self.kv_heads[1] - self.kv_heads[0]
        out = (self.num_local_heads + 2 * self.num_local_kv_heads) * head_dim
        super().__init__(hidden, out, bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str) -> None:
        d = self.head_dim
        q = self.num_local_heads * d
        kv = self.num_local_kv_heads * d
        heads = self.q_heads if shard_id == "q" else self.kv_heads
        offset = {"q": 0, "k": q, "v": q + kv}[shard_id]
        size = q if shard_id == "q" else kv
        self._copy(param.data[offset : offset + size], loaded[heads[0] * d : heads[1] * d], f"{shard_id} heads")


class RowParallelLinear(LinearBase):
    def __init__(self, in_features, out_features, bias=False, *, dtype, device, pc: ParallelContext = SINGLE_RANK):
        self.pc = pc
        self.in_start, self.in_end = pc.split(in_features, "input features")
        super().__init__(self.in_end - self.in_start, out_features, bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            self._copy(param.data, loaded if self.pc.tp_rank == 0 else torch.zeros_like(loaded), "row bias")
            return
        self._copy(param.data, loaded[:, self.in_start : self.in_end], "row shard")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.pc.tp_size == 1:
            return super().forward(x, residual)
        y = self.pc.all_reduce(super().forward(x))  # the residual is added once, after the sum over ranks
        return y if residual is None else residual + y
