"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured when the engine is built.

A decode-only step launches a few hundred small kernels whose launch cost, not their work, bounds a
small batch on a GPU. `GraphedExecutor` runs such a step as one graph replay:

    decode-only step, n rows <= the largest size
      -> pad_decode: n rows padded to the next captured size B (1, 2, 4, 8, 16, 32, 64, 128, 256) by
         repeating the last row (same token, position and KV slot: it writes the very K/V the real row
         writes, so no block is touched that the step does not own), one block table [B, max blocks of a
         sequence] and the context lengths (the Triton decode kernel reads lengths from memory, so a
         graph serves every context length), logits for every row
      -> copy into the size's static inputs, replay, logits[the step's rows]

Anything else runs eagerly: prefill chunks, mixed steps, more rows than the largest size, a worker of
several ranks (its collectives run in other processes), and the gather attention path (its shapes follow
the longest context). On CUDA every size is captured when the engine is built (`warm_up`), before any
request, KV pull or other thread touches the device, on dummy rows that write one slot of a block no
request holds yet; each capture is checked against an eager run of the same inputs, and a mismatch or an
error turns graphs off for this executor with a warning. TANDEM_CUDA_GRAPHS=0 turns them off.

`capture` is injectable: `cuda_capture` records a torch.cuda.CUDAGraph; tests on CPU pass
`eager_capture`, which runs the same static-buffer path without a graph.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from engine.distributed import LocalExecutor
from engine.model.attention import AttentionMetadata, DecodeGroup
from engine.shard import ModelInputs, ModelShard

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAPHS_ENV = "TANDEM_CUDA_GRAPHS"

Replay = Callable[[], torch.Tensor]  # runs the captured step, returns the static logits [B, vocab]


def padded_size(rows: int, sizes: tuple[int, ...] = SIZES) -> int | None:
    """The smallest captured size holding `rows` decode rows; None above the largest."""
    return next((s for s in sizes if s >= rows), None)


def is_graphable(inputs: ModelInputs) -> bool:
    """A decode-only step: every token a decode row (no prefill chunk), at least one."""
    md = inputs.md
    return not md.prefills and md.num_decode == inputs.input_ids.shape[0] > 0


def pad_decode(inputs: ModelInputs, size: int, max_blocks: int, block_size: int, mask: bool = True) -> ModelInputs:
    """A decode-only step's inputs padded to `size` rows, as one decode group of `max_blocks` columns.

    Padding rows repeat the last row; logits are computed for every row (the caller keeps the step's).
    `mask`: build the gather path's attention mask (rows x max_blocks * block_size); without it a [rows, 1, 1,
    1] placeholder (the Triton and native kernels read the lengths)."""
    md = inputs.md
    n = inputs.input_ids.shape[0]
    dev = inputs.input_ids.device
    pad = torch.full((size - n,), n - 1, dtype=torch.long, device=dev)
    take = torch.cat([torch.arange(n, device=dev), pad])
    table = torch.zeros((n, max_blocks), dtype=torch.long, device=dev)
    lens = torch.empty(n, dtype=torch.long, device=dev)
    for g in md.decode_groups:
        width = g.block_table.shape[1]
        if width > max_blocks:
            raise ValueError(f"a decode row spans {width} blocks, more than the graph's {max_blocks}")
        table[g.start : g.end, :width] = g.block_table
        lens[g.start : g.end] = g.context_lens()
    table, lens = table[take], lens[take]
    if mask:
        attend = (torch.arange(max_blocks * block_size, device=dev)[None, :] < lens[:, None]).view(size, 1, 1, -1)
    else:
        attend = torch.ones((size, 1, 1, 1), dtype=torch.bool, device=dev)
    padded_md = AttentionMetadata(
        slot_block=md.slot_block[take],
        slot_offset=md.slot_offset[take],
        slot_mapping=md.slot_mapping[take],
        num_decode=size,
        decode_groups=[DecodeGroup(0, size, table, attend, lens)],
    )
    return ModelInputs(inputs.input_ids[take], inputs.positions[take], padded_md, torch.arange(size, device=dev))


def _copy_into(static: ModelInputs, new: ModelInputs) -> None:
    static.input_ids.copy_(new.input_ids)
    static.positions.copy_(new.positions)
    static.logits_indices.copy_(new.logits_indices)
    s, m = static.md, new.md
    s.slot_block.copy_(m.slot_block)
    s.slot_offset.copy_(m.slot_offset)
    s.slot_mapping.copy_(m.slot_mapping)
    sg, mg = s.decode_groups[0], m.decode_groups[0]
    sg.block_table.copy_(mg.block_table)
    sg.mask.copy_(mg.mask)
    assert sg.lens is not None and mg.lens is not None
    sg.lens.copy_(mg.lens)


def cuda_capture(forward: Callable[[ModelInputs], torch.Tensor], static: ModelInputs, pool) -> Replay:
    """Record forward(static) as a CUDA graph (after warm-up runs on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # kernels compiled, autotuned and their workspaces allocated outside the graph
            forward(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of the worker (a KV pull's CUDA IPC, say) may call CUDA meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        logits = forward(static)

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


def eager_capture(forward: Callable[[ModelInputs], torch.Tensor], static: ModelInputs, pool) -> Replay:
    """The same static-buffer path without a graph (CPU tests)."""
    return lambda: forward(static)


class GraphedExecutor(LocalExecutor):
    """A one-rank executor whose decode-only steps replay a captured graph per padded batch size."""

    def __init__(
        self,
        shard: ModelShard,
        max_blocks_per_seq: int,
        capture: Callable[..., Replay] = cuda_capture,
        sizes: tuple[int, ...] = SIZES,
        usable: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(shard)
        self.max_blocks = max_blocks_per_seq
        self.capture = capture
        self.sizes = sizes
        self.usable = usable  # e.g. the Triton attention path is active (graphs need its shapes)
        self.enabled = True
        self.mask = shard.device.type != "cuda"  # the gather path's mask: only where graphs may meet it (tests)
        self._graphs: dict[int, tuple[ModelInputs, Replay]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None
        self.replays = 0  # decode steps served from a graph (tests, logs)

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        size = padded_size(inputs.input_ids.shape[0], self.sizes)
        if not (self.enabled and size is not None and is_graphable(inputs) and self.usable()):
            return super().execute(inputs)
        try:
            padded = pad_decode(inputs, size, self.max_blocks, self.shard.kv_spec.block_size, self.mask)
        except ValueError:  # a row longer than the graphs' table: this step runs eagerly
            return super().execute(inputs)
        entry = self._graphs.get(size) or self._capture(size, padded)
        if entry is None:
            return super().execute(inputs)
        static, replay = entry
        _copy_into(static, padded)
        logits = replay()
        self.replays += 1
        return logits[inputs.logits_indices]

    def warm_up(self) -> None:
        """Capture every size now, on dummy rows (token 0 at position 0, writing slot 0 of block 0): call it
        before any request holds a block, and before other threads use the device."""
        if not (self.enabled and self.usable()):
            return
        dev = self.shard.device
        for size in self.sizes:
            zeros = torch.zeros(size, dtype=torch.long, device=dev)
            md = AttentionMetadata(
                slot_block=zeros,
                slot_offset=zeros.clone(),
                slot_mapping=zeros.clone(),
                num_decode=size,
                decode_groups=[
                    DecodeGroup(0, size, torch.zeros((size, 1), dtype=torch.long, device=dev), zeros, zeros + 1)
                ],
            )
            dummy = ModelInputs(zeros.clone(), zeros.clone(), md, torch.arange(size, device=dev))
            padded = pad_decode(dummy, size, self.max_blocks, self.shard.kv_spec.block_size, self.mask)
            if self._capture(size, padded) is None:
                return

    def _capture(self, size: int, padded: ModelInputs) -> tuple[ModelInputs, Replay] | None:
        """Capture `size` on these inputs, checked against an eager run of them; None (graphs off) on an error
        or a difference."""
        try:
            want = self.shard.forward(padded)
            static = padded  # its tensors become the graph's static inputs
            replay = self.capture(self.shard.forward, static, self._pool)
            got = replay()
        except Exception as exc:  # noqa: BLE001 - a capture that fails leaves eager steps, which still work
            self.enabled = False
            log.warning("CUDA graphs off: capturing %d rows failed: %s: %s", size, type(exc).__name__, exc)
            return None
        tol = 1e-3 if self.shard.dtype == torch.float32 else 2e-2
        if not torch.allclose(got, want, atol=tol, rtol=tol):
            self.enabled = False
            diff = float((got - want).abs().max())
            log.warning("CUDA graphs off: the graph of %d rows differs from eager by up to %.3g", size, diff)
            return None
        self._graphs[size] = (static, replay)
        log.info("decode graph captured for %d rows (%d captured)", size, len(self._graphs))
        return self._graphs[size]


def graphs_wanted(device: torch.device) -> bool:
    """Graphs for a one-rank engine on CUDA unless TANDEM_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1").strip() not in ("0", "false", "no", "off")


def one_rank_executor(shard: ModelShard, max_positions: int) -> LocalExecutor:
    """The executor of a tp = pp = 1 engine: graphed decode on CUDA (unless turned off), else plain."""
    if not graphs_wanted(shard.device):
        return LocalExecutor(shard)
    from engine.model.attention import triton_kernels

    spec = shard.kv_spec
    per_seq = -(-max_positions // spec.block_size)
    executor = GraphedExecutor(
        shard,
        max_blocks_per_seq=min(spec.num_blocks, per_seq),
        usable=lambda: triton_kernels(shard.device, shard.dtype, spec.head_dim, spec.block_size) is not None,
    )
    executor.warm_up()  # every size captured now: no request, pull or other thread on the device yet
    return executor
