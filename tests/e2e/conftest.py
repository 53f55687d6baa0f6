"""End-to-end fixtures: one local Ray for the session, clusters served over real gRPC.

Ray starts once (about 4 s) and every cluster in the session runs on it; each
`Serving` kills its own actors on exit. Clusters are module-scoped so one model load
serves many tests, and every test that sends traffic ends with `check_pools()`:
every worker idle, block pools intact, no leaked block or lease.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # PLATFORM.md: token auth on by default; off for tests
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace="tandem-tests",
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


TINY_VOCAB = 512


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny llama (vocabulary 512) per test module: loads in a second, serves in milliseconds."""
    from tests.helpers.tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), "llama", vocab_size=TINY_VOCAB)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """transformers' float32 model of `tiny_dir`: what served tokens are compared with (hf_greedy)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def serve(model: str, **overrides):
    """A started `Serving` with small pools; overrides use with_overrides keys.

    Port 0: the router binds a free port itself and `Serving.address` reports it (picking a free
    port here and binding it later races with every other process on the machine; seen once).
    """
    from deploy.config import ServeConfig, with_overrides
    from deploy.serve import Serving

    base = {
        "router.port": 0,
        "router.http_port": 0,
        "both.kv_cache_memory": "64MiB",
        "both.dtype": "float32",
        "both.num_cpus": 0.5,
        "both.device": "cpu",  # the CPU suite stays on CPU on a GPU host too (tests/e2e/test_gpu_serving.py: auto)
        "model": model,
    }
    return Serving(with_overrides(ServeConfig(), **{**base, **overrides}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
