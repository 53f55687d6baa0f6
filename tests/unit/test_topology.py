"""Start-up validation of pool shapes (deploy/topology.py) and the support matrix it generates."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from common.errors import ConfigError
from deploy.config import CPU_PREFILL_JOIN_TOKENS, PoolConfig, ServeConfig
from deploy.topology import (
    MATRIX_BEGIN,
    MATRIX_END,
    MATRIX_MODELS,
    check_pools,
    pool_engine_config,
    pool_layouts,
    support_matrix,
)
from engine.model.parallel import RankPosition, stage_layers
from engine.shard import rank_kv_spec

REPO = Path(__file__).resolve().parents[2]
TINY = MATRIX_MODELS["tiny test llama (4 layers, 8 heads, 4 KV heads)"]
SMOL = MATRIX_MODELS["SmolLM2-135M (30 layers, 9 heads, 3 KV heads)"]


def pools(p: dict, d: dict, **top) -> ServeConfig:
    return ServeConfig(
        prefill=msgspec.structs.replace(PoolConfig(), **p), decode=msgspec.structs.replace(PoolConfig(), **d), **top
    )


def test_stage_layers_split_evenly_with_the_remainder_first():
    assert [stage_layers(30, 4, r) for r in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert [stage_layers(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(ConfigError, match="exceeds the model's 4 layers"):
        stage_layers(4, 5, 0)


def test_pool_layouts_are_the_engine_rank_specs():
    pool = msgspec.structs.replace(PoolConfig(), tp=2, pp=2, block_size=8, kv_order="HND")
    layouts = pool_layouts(TINY, "fp", pool, "float32")
    engine = pool_engine_config("", pool)
    for rank, lay in enumerate(layouts):
        spec = rank_kv_spec(TINY, engine, RankPosition.of(rank, 2, 2), torch.float32, "cpu")
        assert (lay.layer_start, lay.num_layers, lay.head_start, lay.num_kv_heads, lay.block_size, lay.order) == (
            spec.layer_start,
            spec.num_layers,
            spec.head_start,
            spec.num_kv_heads,
            spec.block_size,
            spec.order.value,
        )
    # rank order is stage-major: ranks 0, 1 hold layers [0, 2), heads split 2 + 2
    assert [(x.layer_start, x.head_start) for x in layouts] == [(0, 0), (0, 2), (2, 0), (2, 2)]


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    layouts = pool_layouts(TINY, "fp", msgspec.structs.replace(PoolConfig(), tp=8))
    assert [x.head_start for x in layouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {x.num_kv_heads for x in layouts} == {1}


@pytest.mark.parametrize(
    ("p", "d", "message"),
    [
        (
            {"tp": 3},
            {},
            r"prefill pool \(tp3,pp1,bs16,NHD\): num_heads \(8\) is not divisible by tensor-parallel size 3",
        ),
        ({}, {"pp": 5}, r"decode pool \(tp1,pp5,bs16,NHD\): pipeline-parallel size 5 exceeds the model's 4 layers"),
        ({"dtype": "bfloat16"}, {"dtype": "float32"}, "dtype: prefill bfloat16 vs decode float32"),
    ],
)
def test_impossible_shapes_are_refused_naming_side_and_field(p, d, message):
    with pytest.raises(ConfigError, match=message):
        check_pools(pools(p, d), TINY)


def test_every_matrix_pair_of_the_e2e_test_is_accepted():
    for p in ({"tp": 1}, {"tp": 2}, {"tp": 4, "block_size": 32}, {"pp": 2, "kv_order": "HND"}, {"tp": 2, "pp": 2}):
        for d in ({"block_size": 32}, {"tp": 2, "block_size": 8, "kv_order": "HND"}, {"pp": 2}):
            check_pools(pools(p, d), TINY)
    check_pools(pools({"tp": 3}, {}), SMOL)


def test_support_matrix_doc_is_generated_from_the_validation_code():
    """docs/SUPPORT_MATRIX.md's shape tables are what deploy.topology computes now."""
    text = (REPO / "docs" / "SUPPORT_MATRIX.md").read_text()
    start, end = text.index(MATRIX_BEGIN), text.index(MATRIX_END) + len(MATRIX_END)
    assert text[start:end] == support_matrix(), "run: python -m deploy.topology --write docs/SUPPORT_MATRIX.md"


@pytest.mark.parametrize(
    ("device", "field", "expected"),
    [("cpu", None, CPU_PREFILL_JOIN_TOKENS), ("cuda", None, None), ("cpu", 0, 0), ("cuda", 256, 256)],
)
def test_a_pools_prefill_join_tokens_reach_its_engine(device, field, expected):
    """TTFT first by default on a CPU pool, the filled budget on a GPU one; an explicit value wins."""
    pool = msgspec.structs.replace(PoolConfig(), device=device, prefill_join_tokens=field)
    assert pool_engine_config("", pool).scheduler.prefill_join_tokens == expected


def test_a_negative_prefill_join_tokens_is_refused_with_what_to_write():
    with pytest.raises(ConfigError, match=r"prefill\.prefill_join_tokens must be >= 0"):
        pools({"prefill_join_tokens": -1}, {}).validate()


def test_the_routers_ttft_target_reaches_the_schedulers_triage_unless_the_pool_turns_it_off():
    assert pool_engine_config("", PoolConfig(), slo_ttft_ms=4000).scheduler.ttft_target_s == 4.0
    off = msgspec.structs.replace(PoolConfig(), slo_triage=False)
    assert pool_engine_config("", off, slo_ttft_ms=4000).scheduler.ttft_target_s == 0.0
    assert pool_engine_config("", PoolConfig()).scheduler.ttft_target_s == 0.0
