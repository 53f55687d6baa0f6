"""KVLayout and plan_transfer: offsets against the real tensor, plans against a naive copy.

The oracle for a plan is tensor indexing on the cache's own shape
(`dst[:, :, d] = src[:, :, s]` for every block pair), which shares no arithmetic with
`KVLayout.offset`; the plan is executed as a plain byte copy over flat uint8 views.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import KVCacheSpec, KVOrder, allocate_kv_cache
from kv_transfer import (
    COMPAT_FIELDS,
    IncompatiblePeerError,
    InvalidLayoutError,
    InvalidPlanError,
    KVLayout,
    Region,
    TransferPlan,
    UnsupportedConversionError,
    check_compatible,
    plan_transfer,
)


def layout(**kw) -> KVLayout:
    base = dict(
        model_fingerprint="m1", total_layers=4, layer_start=0, num_layers=4, total_kv_heads=2, head_start=0,
        num_kv_heads=2, head_dim=8, block_size=4, num_blocks=16, dtype="bfloat16", order="NHD", device="cpu",
    )  # fmt: skip
    return KVLayout(**{**base, **kw})


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# ---- layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [KVOrder.NHD, KVOrder.HND])
def test_from_cache_offsets_match_the_tensor(order):
    spec = KVCacheSpec(
        num_layers=3, layer_start=2, total_layers=6, num_kv_heads=2, head_start=1, total_kv_heads=4,
        head_dim=8, block_size=4, num_blocks=5, dtype=torch.bfloat16, order=order,
    )  # fmt: skip
    kv = allocate_kv_cache(spec)
    lay = KVLayout.from_cache(kv, spec, "fp")
    assert (lay.order, lay.dtype, lay.device, lay.layer_start, lay.head_start) == (order.value, "bfloat16", "cpu", 2, 1)
    assert lay.shape == tuple(kv.shape) and lay.region_bytes == kv.numel() * 2
    for layer, k, block in [(0, 0, 0), (1, 1, 3), (2, 1, 4)]:
        assert kv[layer, k, block].data_ptr() - kv.data_ptr() == lay.offset(layer, k, block)
        assert kv[layer, k, block].numel() * 2 == lay.block_bytes


def test_from_cache_refuses_a_tensor_that_is_not_its_spec():
    spec = KVCacheSpec(2, 0, 2, 1, 0, 1, 4, 2, 3, torch.float32)
    with pytest.raises(InvalidLayoutError, match="shape"):
        KVLayout.from_cache(torch.zeros(2, 2, 4, 2, 1, 4), spec, "fp")
    with pytest.raises(InvalidLayoutError, match="dtype"):
        KVLayout.from_cache(torch.zeros(spec.shape, dtype=torch.float16), spec, "fp")


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(layer_start=2, num_layers=3), "layer range"),
        (dict(head_start=1, num_kv_heads=2), "head range"),
        (dict(dtype="int4"), "dtype"),
        (dict(order="NDH"), "order"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=-1), "num_blocks"),
    ],
)
def test_invalid_layouts_are_refused(kw, needle):
    with pytest.raises(InvalidLayoutError, match=needle):
        layout(**kw)


def test_layout_round_trips_through_msgpack_and_validates_on_decode():
    lay = layout()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(lay), type=KVLayout) == lay
    bad = msgspec.msgpack.encode(msgspec.structs.asdict(lay) | {"head_start": 5})
    with pytest.raises(msgspec.ValidationError, match="head range"):
        msgspec.msgpack.decode(bad, type=KVLayout)


def test_compat_hash_covers_exactly_the_compat_fields():
    lay = layout()
    # capacity, device and topology (ranges, block size, order: convertible) do not change it
    same = layout(num_blocks=3, device="cuda:1", layer_start=2, num_layers=2, head_start=1, num_kv_heads=1,
                  block_size=16, order="HND")  # fmt: skip
    assert same.compat_hash() == lay.compat_hash()
    assert "block_size" not in COMPAT_FIELDS and "order" not in COMPAT_FIELDS
    changes = dict(model_fingerprint="m2", dtype="float32", head_dim=16, total_layers=5, total_kv_heads=4)
    assert set(changes) == set(COMPAT_FIELDS)
    for f, v in changes.items():
        assert layout(**{f: v}).compat_hash() != lay.compat_hash(), f


def test_check_compatible_names_every_mismatching_field_with_both_values():
    check_compatible(layout(), layout(num_blocks=2, head_start=1, num_kv_heads=1))  # topology is fine
    check_compatible(layout(), layout(block_size=16, order="HND"))  # convertible
    with pytest.raises(IncompatiblePeerError) as e:
        check_compatible(layout(), layout(dtype="float32", head_dim=16, model_fingerprint="other", block_size=16))
    msg = str(e.value)
    for part in ("dtype: local 'bfloat16' vs remote 'float32'", "head_dim: local 8 vs remote 16",
                 "model_fingerprint: local 'm1' vs remote 'other'"):  # fmt: skip
        assert part in msg
    assert "block_size" not in msg and "total_layers" not in msg


# ---- plan: properties -----------------------------------------------------------------------
@st.composite
def plan_cases(draw):
    geometry = dict(
        num_layers=draw(st.integers(1, 3)), num_kv_heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 2, 4])), block_size=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])), order=draw(st.sampled_from(["NHD", "HND"])),
    )  # fmt: skip
    geometry |= dict(total_layers=geometry["num_layers"], total_kv_heads=geometry["num_kv_heads"])
    src = layout(**geometry, num_blocks=draw(st.integers(1, 12)))
    dst = layout(**geometry, num_blocks=draw(st.integers(1, 12)))
    n = draw(st.integers(0, min(src.num_blocks, dst.num_blocks)))
    dst_ids = draw(st.permutations(range(dst.num_blocks)))[:n]
    if draw(st.booleans()):  # runs: consecutive on both sides, often
        dst_ids = sorted(dst_ids)
        start = draw(st.integers(0, src.num_blocks - n))
        src_ids = [start + i for i in range(n)]
        if n and draw(st.booleans()):
            src_ids[draw(st.integers(0, n - 1))] = draw(st.integers(0, src.num_blocks - 1))
    else:
        src_ids = draw(st.lists(st.integers(0, src.num_blocks - 1), min_size=n, max_size=n))
    return src, dst, src_ids, dst_ids


@settings(max_examples=150, deadline=None)
@given(plan_cases())
def test_executing_the_plan_equals_copying_block_by_block(case):
    src_l, dst_l, src_ids, dst_ids = case
    g = torch.Generator().manual_seed(len(src_ids))
    src = torch.randint(0, 256, (src_l.region_bytes,), dtype=torch.uint8, generator=g)
    src = src.view(getattr(torch, src_l.dtype)).reshape(src_l.shape)
    dst = torch.zeros(dst_l.shape, dtype=src.dtype)
    expected = dst.clone()
    for s, d in zip(src_ids, dst_ids):
        expected[:, :, d] = src[:, :, s]

    plan = plan_transfer(src_l, dst_l, src_ids, dst_ids)
    sb, db = flat(src), flat(dst)
    for r in plan.regions:
        db[r.dst_offset : r.dst_offset + r.nbytes] = sb[r.src_offset : r.src_offset + r.nbytes]
    assert torch.equal(flat(dst), flat(expected))
    assert plan.num_blocks == len(src_ids)
    per_block = src_l.block_bytes * 2 * src_l.num_layers
    assert plan.total_bytes == sum(r.nbytes for r in plan.regions) == len(src_ids) * per_block

    # destination regions never overlap
    spans = sorted((r.dst_offset, r.dst_offset + r.nbytes) for r in plan.regions)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))

    # merging is minimal: one region per (layer, K|V, maximal run)
    pairs = list(zip(src_ids, dst_ids))
    breaks = sum(1 for (s0, d0), (s1, d1) in zip(pairs, pairs[1:]) if (s1, d1) != (s0 + 1, d0 + 1))
    runs = breaks + 1 if src_ids else 0
    assert len(plan.regions) == src_l.num_layers * 2 * runs
    assert plan_transfer(src_l, dst_l, src_ids, dst_ids) == plan  # pure


def test_runs_are_merged_per_layer_and_kv():
    src, dst = layout(num_layers=2, total_layers=2), layout(num_layers=2, total_layers=2)
    plan = plan_transfer(src, dst, [7, 8, 9, 2], [0, 1, 2, 5])
    bb = src.block_bytes
    assert len(plan.regions) == 2 * 2 * 2
    assert plan.regions[0] == Region(src.offset(0, 0, 7), dst.offset(0, 0, 0), 3 * bb)
    assert plan.regions[1] == Region(src.offset(0, 0, 2), dst.offset(0, 0, 5), bb)


def test_empty_block_lists_give_an_empty_plan():
    assert plan_transfer(layout(), layout(), [], []) == TransferPlan((), 0, 0) == TransferPlan.empty()


# ---- plan: refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src_ids, dst_ids, needle",
    [
        ([1, 2], [1], "2 source blocks but 1 destination"),
        ([16], [0], r"source block id 16 is out of range \[0, 16\)"),
        ([0], [-1], "destination block id -1 is out of range"),
        ([0, 1], [3, 3], r"destination block ids repeat: \[3\]"),
        ([1.5], [0], "not an integer"),
        ([True], [0], "not an integer"),
    ],
)
def test_bad_block_lists_are_refused(src_ids, dst_ids, needle):
    with pytest.raises(InvalidPlanError, match=needle):
        plan_transfer(layout(), layout(), src_ids, dst_ids)


def test_repeated_source_blocks_are_allowed():
    assert plan_transfer(layout(), layout(), [3, 3], [0, 1]).num_blocks == 2


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(head_start=1, num_kv_heads=1), "num_kv_heads: src 2 vs dst 1"),
        (dict(layer_start=2, num_layers=2), "layer_start: src 0 vs dst 2"),
        (dict(block_size=8), "block_size: src 4 vs dst 8"),
        (dict(order="HND"), "order: src 'NHD' vs dst 'HND'"),
    ],
)
def test_a_different_topology_needs_a_conversion(kw, needle):
    with pytest.raises(UnsupportedConversionError, match=needle) as e:
        plan_transfer(layout(), layout(**kw), [0], [0])
    assert "needs layout conversion: use kv_transfer.plan_conversion" in str(e.value)


def test_incompatible_layouts_are_refused_before_planning():
    with pytest.raises(IncompatiblePeerError, match="dtype"):
        plan_transfer(layout(), layout(dtype="float32"), [0], [0])


def test_check_bounds_refuses_a_plan_built_for_other_layouts():
    plan = plan_transfer(layout(num_blocks=16), layout(num_blocks=16), [15], [15])
    plan.check_bounds(layout().region_bytes, layout().region_bytes)
    with pytest.raises(InvalidPlanError, match="outside the registered memory"):
        plan.check_bounds(layout(num_blocks=4).region_bytes, layout().region_bytes)


def test_check_bounds_accepts_destination_regions_inside_staging_only():
    staged = TransferPlan((Region(0, 1000, 24), Region(24, 0, 8)), 32, 1)
    staged.check_bounds(100, 1000, dst_staging_bytes=24)
    with pytest.raises(InvalidPlanError, match=r"\(src 100 bytes, dst 1000 bytes\)"):
        staged.check_bounds(100, 1000)  # no staging registered
    with pytest.raises(InvalidPlanError, match=r"1000 bytes \+ 16 staging bytes"):
        staged.check_bounds(100, 1000, dst_staging_bytes=16)
    with pytest.raises(InvalidPlanError, match="crosses the end of the KV cache"):
        TransferPlan((Region(0, 996, 8),), 8, 1).check_bounds(100, 1000, dst_staging_bytes=64)
    with pytest.raises(InvalidPlanError, match="malformed region"):
        TransferPlan((Region(0, 0, 0),), 0, 1).check_bounds(100, 1000)


def test_plans_are_immutable_values_whatever_they_were_built_from():
    regions = (Region(1, 2, 3), Region(4, 5, 6))
    plan = TransferPlan(regions, 9, 2)
    same = TransferPlan.from_array(np.array([[1, 2, 3], [4, 5, 6]]), 9, 2)
    assert plan == same and hash(plan) == hash(same) and same.regions == regions and len(same) == 2
    assert plan != TransferPlan(regions[:1], 3, 1) and plan != TransferPlan(regions, 9, 3)
    with pytest.raises(AttributeError):
        plan.total_bytes = 1
    with pytest.raises(ValueError):
        same.as_array()[0, 0] = 7
