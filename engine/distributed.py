"""Executors: how a step's inputs become logits, on one rank or on tp x pp ranks.

    LocalExecutor         one ModelShard holding the whole model (tp = pp = 1)
    DistributedExecutor   the leader (global rank 0) of a torch.distributed group:

    leader (rank 0, stage 0)                 other ranks (serve_rank loop, one process each)
    ────────────────────────                 ──────────────────────────────────────────────
    broadcast(("step", inputs)) ───gloo───>  recv step
    stage 0 forward (TP all-reduces) <─────> stage 0 ranks: same forward, same collectives
    send hidden [T, H] ──────────────────>   stage 1 (same tp rank) forward ... last stage
                                             last stage: logits all-gathered over its TP group
    recv logits [rows, V] <──────────────    last stage tp rank 0 sends them to rank 0
    sample (only the leader samples)

Inputs are broadcast as one pickled object over a gloo group (CPU), so ranks on GPUs
receive host tensors and move them; TP collectives and stage-to-stage tensors use the
device group (nccl on CUDA, gloo on CPU). An idle worker broadcasts a keep-alive now
and then, so a waiting rank never hits the collective timeout, while a dead rank still
fails the next step within it.

This module knows torch.distributed, not Ray: whoever starts the rank processes
(worker_core/ranks.py) calls `DistEnv(...)` in each of them with the same init method.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.model.parallel import ParallelContext, RankPosition
from engine.shard import ModelInputs, ModelShard

log = logging.getLogger(__name__)

STEP, KEEPALIVE, STOP = "step", "keepalive", "stop"


class DistEnv:
    """One rank's membership of its worker's process group, and the collectives the model needs."""

    def __init__(self, pos: RankPosition, init_method: str, backend: str, timeout_s: float) -> None:
        self.pos = pos
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend, init_method=init_method, world_size=pos.world_size, rank=pos.rank, timeout=self.timeout
        )
        self.group = dist.group.WORLD
        self.cpu_group = self.group if backend == "gloo" else dist.new_group(backend="gloo", timeout=self.timeout)
        self.tp_group = None
        for stage in range(pos.pp_size):  # every rank creates every group, in the same order
            g = dist.new_group(pos.stage_ranks(stage), timeout=self.timeout) if pos.tp_size > 1 else None
            if stage == pos.pp_rank:
                self.tp_group = g

    def parallel_context(self) -> ParallelContext:
        pos, group = self.pos, self.tp_group
        if pos.tp_size == 1:
            return ParallelContext()

        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x, group=group)
            return x

        def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous()
            parts = [torch.empty_like(x) for _ in range(pos.tp_size)]
            dist.all_gather(parts, x, group=group)
            return torch.cat(parts, dim=-1)

        return ParallelContext(pos.tp_rank, pos.tp_size, all_reduce, all_gather_last_dim)

    # ---- step messages (leader -> every rank) ---------------------------------------------------------------------

    def broadcast(self, kind: str, payload: object = None) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.cpu_group)

    def receive(self) -> tuple[str, object]:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    # ---- pipeline ----------------------------------------------------------------------------------------------------

    def _peer(self, pp_rank: int, tp_rank: int | None = None) -> int:
        return pp_rank * self.pos.tp_size + (self.pos.tp_rank if tp_rank is None else tp_rank)

    def send(self, t: torch.Tensor, dst: int) -> None:
        t = t.contiguous()
        if self.backend == "gloo" and t.is_cuda:  # gloo's point-to-point moves host memory only
            t = t.cpu()
        dist.send(t, dst=dst, group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        host = self.backend == "gloo" and device.type == "cuda"
        out = torch.empty(shape, dtype=dtype, device="cpu" if host else device)
        dist.recv(out, src=src, group=self.group)
        return out.to(device) if host else out

    def send_next(self, hidden: torch.Tensor) -> None:
        self.send(hidden, self._peer(self.pos.pp_rank + 1))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.recv(shape, dtype, device, self._peer(self.pos.pp_rank - 1))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_stage(shard: ModelShard, env: DistEnv, inputs: ModelInputs) -> torch.Tensor | None:
    """This rank's part of one step. Returns the logits on the leader, None elsewhere."""
    pos = shard.pos
    cfg = shard.model_config
    hidden = None
    if not pos.is_first_stage:
        hidden = env.recv_prev((inputs.input_ids.shape[0], cfg.hidden_size), shard.dtype, shard.device)
    out = shard.forward(inputs, hidden)
    if not pos.is_last_stage:
        env.send_next(out)
        return None
    rows = inputs.logits_indices.shape[0]
    if pos.rank == 0:
        return out
    if pos.tp_rank == 0 and rows:  # the last stage's first TP rank hands the (all-gathered) logits to the leader
        env.send(out, 0)
    return None


def serve_rank(shard: ModelShard, env: DistEnv) -> None:
    """Loop of a non-leader rank: run every step the leader broadcasts, until STOP (then leave the group).

    Leaving explicitly matters: a process that exits with its gloo group still open can
    abort in teardown ("terminate called without an active exception").
    """
    while True:
        kind, payload = env.receive()
        if kind == STOP:
            env.close()
            return
        if kind == STEP and isinstance(payload, ModelInputs):
            run_stage(shard, env, payload.to(shard.device))


class LocalExecutor:
    """tp = pp = 1: the whole model in this process."""

    world_size = 1

    def __init__(self, shard: ModelShard) -> None:
        self.shard = shard

    @property
    def kv_spec(self):
        return self.shard.kv_spec

    @property
    def kv_cache(self) -> torch.Tensor:
        if self.shard.kv_cache is None:
            raise RuntimeError("the shard's KV cache is not allocated yet")
        return self.shard.kv_cache

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        return self.shard.forward(inputs)

    def keepalive(self) -> None:
        """Called by an idle engine loop now and then (no-op here)."""

    def close(self) -> None:
        pass


class DistributedExecutor(LocalExecutor):
    """The leader's side of a tp x pp worker; its shard is rank 0's (stage 0, TP rank 0)."""

    def __init__(self, shard: ModelShard, env: DistEnv) -> None:
        super().__init__(shard)
        if shard.pos.rank != 0:
            raise ValueError(f"the executor runs on rank 0, not {shard.pos.describe()}")
        self.env = env
        self.world_size = shard.pos.world_size
        self._closed = False

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        env, shard = self.env, self.shard
        env.broadcast(STEP, inputs.to(torch.device("cpu")))
        out = run_stage(shard, env, inputs)
        if out is not None:
            return out
        rows = inputs.logits_indices.shape[0]
        shape = (rows, shard.model_config.vocab_size)
        if not rows:
            return torch.empty(shape, dtype=torch.float32, device=shard.device)
        last_stage_first_rank = (shard.pos.pp_size - 1) * shard.pos.tp_size
        return env.recv(shape, torch.float32, shard.device, last_stage_first_rank)

    def keepalive(self) -> None:
        if not self._closed:
            self.env.broadcast(KEEPALIVE)

    def close(self) -> None:
        """Tell every rank to leave its loop (they exit serve_rank), then leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            self.env.broadcast(STOP)
        except Exception as e:  # noqa: BLE001 - a dead rank: the group is going away anyway
            log.warning("could not tell the ranks to stop: %s", e)
        self.env.close()
