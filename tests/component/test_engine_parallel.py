"""The tp x pp engine without Ray: ranks as spawned processes in one torch.distributed group.

The leader process runs an EngineCore over a DistributedExecutor; the other ranks run
`serve_rank`. Greedy tokens of every shape equal one TP1 engine on the same tiny llama
(8 heads, 4 KV heads, 4 layers), a mixed batch of a long and a short prompt included
(chunked prefill next to decode). On CUDA (gpu-marked) the same runs with gloo
collectives on device tensors, so several ranks can share one GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from common.sampling_params import SamplingParams
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.engine_core import EngineCore
from tests.helpers.tiny_models import make_tiny_hf_model

PROMPTS = [list(range(5, 45)), list(range(100, 107))]
NEW = 10


def _config(model: str, tp: int, pp: int, device: str, backend: str = "gloo") -> EngineConfig:
    return EngineConfig(
        model=model,
        dtype="float32",
        device=device,
        cache=CacheConfig(num_blocks=64, block_size=8),
        scheduler=SchedulerConfig(max_num_batched_tokens=24),  # the long prompt is chunked
        parallel=ParallelConfig(tp, pp, backend=backend, collective_timeout_s=120),
    )


def _greedy(core: EngineCore) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    ids = [core.add_request(p, params) for p in PROMPTS]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while core.has_unfinished_requests():
        for o in core.step():
            out[o.request_id] += o.new_token_ids
    return [out[i] for i in ids]


def _rank(rank: int, model: str, tp: int, pp: int, device: str, init: str, results, backend: str = "gloo") -> None:
    from engine.distributed import DistEnv, DistributedExecutor, serve_rank
    from engine.loader import load_model_source
    from engine.model.parallel import RankPosition
    from engine.shard import ModelShard

    torch.set_num_threads(1)
    if backend == "nccl":  # NCCL ranks each own a GPU
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    cfg = _config(model, tp, pp, device, backend)
    pos = RankPosition.of(rank, tp, pp)
    env = DistEnv(pos, init, backend, 120)
    source = load_model_source(model)
    shard = ModelShard(cfg, source, pos, env.parallel_context(), dtype=torch.float32)
    shard.allocate(64)
    if rank:
        serve_rank(shard, env)
        return
    core = EngineCore(cfg, source, executor=DistributedExecutor(shard, env))
    try:
        results.put(_greedy(core))
    finally:
        core.close()


def _run(model: str, tp: int, pp: int, device: str, backend: str = "gloo") -> list[list[int]]:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, model, tp, pp, device, init, results, backend)) for r in range(tp * pp)]
    for p in procs:
        p.start()
    try:
        tokens = results.get(timeout=120)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("par"), "llama", vocab_size=512))


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2), (8, 1)])
def test_parallel_engine_equals_one_rank(tiny, tp, pp):
    want = _greedy(EngineCore(_config(tiny, 1, 1, "cpu")))
    assert _run(tiny, tp, pp, "cpu") == want


def test_one_rank_config_refuses_a_parallel_shape_without_ranks(tiny):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="tp=2 pp=1 needs rank processes"):
        EngineCore(_config(tiny, 2, 1, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_parallel_engine_on_cuda_equals_one_rank(tiny, tp, pp):
    want = _greedy(EngineCore(_config(tiny, 1, 1, "cuda")))
    assert _run(tiny, tp, pp, "cuda") == want


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (each NCCL rank owns one)")
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_parallel_engine_over_nccl_equals_one_rank(tiny, tp, pp):
    want = _greedy(EngineCore(_config(tiny, 1, 1, "cuda")))
    assert _run(tiny, tp, pp, "cuda", backend="nccl") == want
