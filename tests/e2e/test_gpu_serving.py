"""A served cluster on one GPU (skipped without one): prefill and decode as separate Ray actors sharing the device,
found by `device: auto`, KV moved VRAM -> VRAM over NIXL (CUDA IPC), tokens equal to transformers."""

from __future__ import annotations

import random

import pytest

from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.reference import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("ray_session")]
NEW = 8


def test_one_gpu_cluster_equals_transformers(tiny_dir, reference):
    pools = {"both.device": "auto", "both.dtype": "float32", "both.block_size": 4}
    with serve(str(tiny_dir), **pools) as s:
        cfg = s.cluster.config
        assert (cfg.prefill.device, cfg.decode.device) == ("cuda", "cuda")  # auto: the Ray cluster has the GPU
        assert cfg.prefill.gpus + cfg.decode.gpus <= 1.0  # one GPU: the two workers share it
        assert len(s.cluster.kv_routes) == 1 and s.cluster.kv_routes[0].endswith(
            "VRAM->VRAM by CUDA IPC (NVLink or PCIe)"
        ), s.cluster.kv_routes
        client = TandemClient(s.address)
        rng = random.Random(0)
        for n in (5, 17, 40):
            ids = [rng.randrange(3, 500) for _ in range(n)]
            _, tokens, last = client.complete(token_ids=ids, max_tokens=NEW, temperature=0.0, ignore_eos=True)
            assert tokens == hf_greedy(reference, ids, NEW)
            assert last.timings.kv_transfer_s > 0  # the prompt's KV really moved P -> D
        s.cluster.check_pools()
