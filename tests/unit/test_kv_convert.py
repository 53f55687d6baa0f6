"""Layout conversion (kv_transfer/planner.py, conversion_plan.py, scatter.py) against a slow, obvious reference.

The reference shares no arithmetic with the planner: a request's KV values live in one
global array truth[layer, kv, token, head, :]; each rank's cache is filled from it
with per-token, per-layer, per-head Python loops indexing the cache's OWN shape
(NHD: [layer, kv, block, slot, head], HND: [layer, kv, block, head, slot]); the
expected decode caches are built the same way. Replicas hold the same values (as
they do in a real TP worker), so the planner's choice of replica cannot matter.
Values are random integer bit patterns compared bitwise (NaNs included).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer import (
    IncompatiblePeerError,
    InvalidPlanError,
    KVLayout,
    RowScatter,
    UnsupportedConversionError,
    apply_scatter,
    check_pair,
    describe_pair,
    execute_locally,
    plan_conversion,
    plan_transfer,
)
from kv_transfer.testing import worker_layouts

INT_OF: dict[str, type[np.signedinteger[Any]]] = {"float32": np.int32, "bfloat16": np.int16}


def model(**kw) -> dict:
    return dict(model_fingerprint="m", total_layers=4, total_kv_heads=4, head_dim=4) | kw


def worker(tp=1, pp=1, block_size=4, num_blocks=16, order="NHD", dtype="bfloat16", **geo) -> list[KVLayout]:
    return worker_layouts(**model(**geo), tp=tp, pp=pp, block_size=block_size, num_blocks=num_blocks,
                          order=order, dtype=dtype)  # fmt: skip


# ---- the slow reference ---------------------------------------------------------------------------
def cache_index(lay: KVLayout, layer: int, kv: int, block: int, slot: int, head: int) -> tuple[int, ...]:
    """Index of one row in a cache of `lay`'s shape (local layer and head)."""
    if lay.order == "NHD":
        return (layer, kv, block, slot, head)
    return (layer, kv, block, head, slot)


def fill_from_truth(cache: np.ndarray, lay: KVLayout, truth: np.ndarray, blocks, tokens: range, mask=None) -> None:
    """cache[... token t ...] = truth[global layer, kv, t, global head] for t in tokens; marks `mask`."""
    for t in tokens:
        block = blocks[t // lay.block_size - tokens.start // lay.block_size]
        slot = t % lay.block_size
        for layer in range(lay.num_layers):
            for kv in (0, 1):
                for head in range(lay.num_kv_heads):
                    idx = cache_index(lay, layer, kv, block, slot, head)
                    cache[idx] = truth[lay.layer_start + layer, kv, t, lay.head_start + head]
                    if mask is not None:
                        mask[idx] = True


def block_rows_mask(lay: KVLayout, blocks) -> np.ndarray:
    """True on every row of the given blocks (all layers, K and V, slots, heads)."""
    mask = np.zeros(lay.shape[:-1], dtype=bool)
    for b in blocks:
        mask[:, :, b] = True
    return mask


def random_ints(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    info = np.iinfo(INT_OF[dtype])
    return rng.integers(info.min, info.max, size=shape, dtype=INT_OF[dtype], endpoint=True)


def as_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(getattr(torch, dtype))


def as_ints(t: torch.Tensor, dtype: str) -> np.ndarray:
    return t.cpu().view(torch.int16 if dtype == "bfloat16" else torch.int32).numpy()


# ---- plan checks -----------------------------------------------------------------------------------
def check_rounds(rounds, plan, staging_bytes: int, requested_rows: np.ndarray, block_rows: np.ndarray) -> None:
    """No overlapping destinations per round; every requested row delivered once; nothing else touched."""
    d = plan.dst
    rb = plan.row_bytes
    cache_rows = d.region_bytes // rb
    count = np.zeros(cache_rows, dtype=np.int64)
    for rnd in rounds:
        regions = [(int(dst), int(n), int(src_i)) for src_i, p in rnd.reads for _, dst, n in p.as_array()]
        regions.sort()
        for (a, n, _), (b, _, _) in zip(regions, regions[1:]):
            assert a + n <= b, "destination regions overlap in one round"
        staged = np.zeros(max(1, staging_bytes // rb), dtype=bool)
        for src_i, p in rnd.reads:
            lay = plan.src_layouts[src_i]
            p.check_bounds(lay.region_bytes, d.region_bytes, staging_bytes)
            for s, dst, n in p.as_array().tolist():
                assert s % rb == 0 and dst % rb == 0 and n % rb == 0, "regions are whole rows"
                if dst >= d.region_bytes:
                    lo = (dst - d.region_bytes) // rb
                    staged[lo : lo + n // rb] = True
                else:
                    count[dst // rb : (dst + n) // rb] += 1
        if rnd.scatter is not None:
            src_rows, dst_rows = rnd.scatter
            assert len(src_rows) == len(dst_rows) > 0
            assert (np.diff(src_rows) > 0).all(), "scatter source rows strictly increase"
            assert staged[src_rows].all(), "a scatter reads staging rows this round's reads did not fill"
            assert requested_rows[dst_rows].all(), "a scatter writes a row that was not requested"
            np.add.at(count, dst_rows, 1)
    assert (count[requested_rows] == 1).all(), "a requested row was not delivered exactly once"
    assert (count[~block_rows] == 0).all(), "a row outside the request's destination blocks was written"
    assert (count <= 1).all(), "a row was written twice"


def run_case(src_layouts, dst_layouts, n, t0, src_blocks, dst_blocks, staging_choice, seed, dtype) -> None:
    """Plan, bind, check and execute every decode rank; compare with the reference."""
    rng = np.random.default_rng(seed)
    s0 = src_layouts[0]
    truth = random_ints(rng, (s0.total_layers, 2, max(n, 1), s0.total_kv_heads, s0.head_dim), dtype)
    src_caches = []
    for lay in src_layouts:  # garbage everywhere, the request's tokens from the truth
        c = random_ints(rng, lay.shape, dtype)
        fill_from_truth(c, lay, truth, src_blocks, range(0, n))
        src_caches.append(as_torch(c, dtype))
    for d in dst_layouts:
        plan = plan_conversion(src_layouts, d)
        assert plan_conversion(src_layouts, d) == plan and hash(plan) == hash(plan_conversion(src_layouts, d))
        one_round = plan.staging_bytes(n, t0)
        staging_bytes = {"none": 0, "row": plan.row_bytes, "few": 3 * plan.row_bytes + 5,
                         "half": max(plan.row_bytes, one_round // 2), "full": one_round}[staging_choice]  # fmt: skip
        if one_round and not staging_bytes:
            with pytest.raises(InvalidPlanError, match="staging buffer has 0 bytes"):
                plan.bind(src_blocks, dst_blocks, n, t0, 0)
            staging_bytes = one_round
        rounds = plan.bind(src_blocks, dst_blocks, n, t0, staging_bytes)
        if n == t0:
            assert rounds == []
        if staging_bytes >= one_round and rounds:
            assert len(rounds) == 1
        initial = random_ints(rng, d.shape, dtype)
        expected = initial.copy()
        requested = np.zeros(d.shape[:-1], dtype=bool)
        fill_from_truth(expected, d, truth, dst_blocks, range(t0, n), requested)
        in_blocks = block_rows_mask(d, dst_blocks)
        check_rounds(rounds, plan, staging_bytes, requested.reshape(-1), in_blocks.reshape(-1))

        dst = as_torch(initial.copy(), dtype)
        staging = torch.zeros(max(staging_bytes, 1), dtype=torch.uint8)
        backend = execute_locally(rounds, src_caches, dst, staging)
        assert backend == ("torch" if any(r.scatter is not None for r in rounds) else "none")
        got = as_ints(dst, dtype)
        assert (got[requested] == expected[requested]).all(), "a requested row holds the wrong values"
        assert (got[~in_blocks] == initial[~in_blocks]).all(), "a row outside the destination blocks changed"


# ---- properties ---------------------------------------------------------------------------------------
def tp_options(heads: int) -> list[int]:
    return [t for t in range(1, 9) if heads % t == 0 or t % heads == 0]


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 8]))
    layers = draw(st.integers(1, 6))
    geo = dict(total_layers=layers, total_kv_heads=heads, head_dim=draw(st.sampled_from([1, 2, 4])))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    bs, bd = draw(st.sampled_from([4, 8, 16, 32])), draw(st.sampled_from([4, 8, 16, 32]))
    n = draw(st.integers(0, 80))
    t0 = draw(st.integers(0, n // bd)) * bd
    n_src, n_dst = -(-n // bs), -(-n // bd) - t0 // bd
    nb_src, nb_dst = n_src + draw(st.integers(0, 3)), n_dst + draw(st.integers(0, 3))

    def table(count: int, num_blocks: int) -> list[int]:
        if draw(st.booleans()):  # a fresh pool: one run
            start = draw(st.integers(0, num_blocks - count))
            return list(range(start, start + count))
        return draw(st.permutations(range(num_blocks)))[:count]

    def shape(block_size: int, num_blocks: int) -> list[KVLayout]:
        return worker_layouts(**model(**geo), tp=draw(st.sampled_from(tp_options(heads))),
                              pp=draw(st.integers(1, min(layers, 3))), block_size=block_size, num_blocks=num_blocks,
                              order=draw(st.sampled_from(["NHD", "HND"])), dtype=dtype)  # fmt: skip

    src, dst = shape(bs, nb_src), shape(bd, nb_dst)
    staging = draw(st.sampled_from(["row", "few", "half", "full", "full", "none"]))
    return src, dst, n, t0, table(n_src, nb_src), table(n_dst, nb_dst), staging, draw(st.integers(0, 2**32 - 1)), dtype


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_conversion_delivers_every_requested_row_once_and_nothing_else(case):
    src, dst, n, t0, src_blocks, dst_blocks, staging, seed, dtype = case
    check_pair(src, dst)
    run_case(src, dst, n, t0, src_blocks, dst_blocks, staging, seed, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("staging", ["few", "full"])
def test_combined_conversion_per_dtype(dtype, staging):
    # TP 1 -> 2, PP 2 -> 1, blocks 8 -> 4, NHD -> HND, a prefix already cached on D
    src = worker(tp=1, pp=2, block_size=8, num_blocks=9, order="NHD", dtype=dtype, total_layers=3, head_dim=8)
    dst = worker(tp=2, pp=1, block_size=4, num_blocks=20, order="HND", dtype=dtype, total_layers=3, head_dim=8)
    assert describe_pair(src, dst) == ["tp-split", "pp-restage", "reblock 8->4", "NHD->HND"]
    n, t0 = 45, 12
    src_blocks, dst_blocks = [8, 2, 5, 0, 1, 3], [19, 4, 5, 6, 11, 0, 9, 2, 3]
    run_case(src, dst, n, t0, src_blocks, dst_blocks, staging, seed=5, dtype=dtype)


def test_replicated_heads_are_read_once_from_the_lowest_rank():
    src = worker(tp=8, total_kv_heads=2)  # ranks 0-3 hold head 0, ranks 4-7 head 1
    [d] = worker(tp=1, total_kv_heads=2)
    plan = plan_conversion(src, d)
    assert [(p.src, p.head_start, p.num_heads) for p in plan.pieces] == [(0, 0, 1), (4, 1, 1)]
    assert describe_pair(src, [d]) == ["tp-merge"]
    # replicated on both sides: each decode rank copies its head from one replica, plainly
    assert describe_pair(src, worker(tp=4, total_kv_heads=2)) == ["identical"]


@pytest.mark.parametrize("staging", ["row", "few", "full"])
def test_direct_and_staged_pieces_mix_in_one_request(staging):
    # uneven hand-made ranks: rank 0 holds head 1, rank 1 all heads -> owners 1,0,1,1 per head
    geo = dict(model_fingerprint="m", total_layers=2, total_kv_heads=4, head_dim=2, block_size=8, num_blocks=6,
               dtype="bfloat16", order="HND", device="cpu", layer_start=0, num_layers=2)  # fmt: skip
    src = [KVLayout(**geo, head_start=1, num_kv_heads=1), KVLayout(**geo, head_start=0, num_kv_heads=4)]
    d = KVLayout(**geo | dict(block_size=4, num_blocks=9), head_start=0, num_kv_heads=4)
    plan = plan_conversion(src, d)
    assert [(p.src, p.head_start, p.num_heads, p.direct) for p in plan.pieces] == [
        (0, 1, 1, True), (1, 0, 1, True), (1, 2, 2, False)]  # fmt: skip
    run_case(src, [d], 21, 4, [5, 0, 3], [8, 1, 2, 6, 0], staging, seed=3, dtype="bfloat16")


# ---- what is direct, and how cheap --------------------------------------------------------------------
def test_identical_topology_binds_to_exactly_plan_transfer():
    [s], [d] = worker(num_blocks=40), worker(num_blocks=30)
    plan = plan_conversion([s], d)
    assert describe_pair([s], [d]) == ["identical"] and not plan.needs_staging and plan.staging_bytes(99) == 0
    src_blocks = [7, 8, 9, 2, 20, 21, 22, 23, 30, 31]
    dst_blocks = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    [rnd] = plan.bind(src_blocks, dst_blocks, num_tokens=39, first_token=0)
    assert rnd.scatter is None and rnd.reads == ((0, plan_transfer(s, d, src_blocks, dst_blocks)),)
    [rnd] = plan.bind(src_blocks, dst_blocks[2:], num_tokens=39, first_token=8)  # D caches 2 blocks
    assert rnd.reads == ((0, plan_transfer(s, d, src_blocks[2:], dst_blocks[2:])),)


@pytest.mark.parametrize(
    "src_kw, dst_kw, kinds",
    [
        (dict(order="HND"), dict(order="HND", tp=2), ["tp-split"]),  # HND head sub-ranges
        (dict(order="HND", tp=2), dict(order="HND"), ["tp-merge"]),
        (dict(pp=2), dict(pp=1), ["pp-restage"]),
        (dict(block_size=4), dict(block_size=16), ["reblock 4->16"]),  # NHD, same heads
        (dict(block_size=16), dict(block_size=4), ["reblock 16->4"]),
        (dict(tp=4, order="NHD"), dict(tp=4, order="HND", block_size=8), ["reblock 4->8", "NHD->HND"]),  # 1 head
    ],
)
def test_contiguous_conversions_read_straight_into_the_cache(src_kw, dst_kw, kinds):
    src, dst = worker(num_blocks=32, **src_kw), worker(num_blocks=32, **dst_kw)
    assert describe_pair(src, dst) == kinds
    for d in dst:
        plan = plan_conversion(src, d)
        assert not plan.needs_staging
        rounds = plan.bind(list(range(0, -(-50 // src[0].block_size))), list(range(1, 1 + -(-50 // d.block_size))), 50)
        assert len(rounds) == 1 and rounds[0].scatter is None


def test_staged_conversion_reads_minimal_spans_and_merges_contiguous_blocks():
    [s], [d] = worker(num_blocks=8, order="NHD"), worker(num_blocks=8, order="HND")
    plan = plan_conversion([s], d)
    assert plan.needs_staging and plan.kinds == ["NHD->HND"]
    rb = plan.row_bytes
    block_rows = 4 * 4  # block_size 4 x 4 heads, all needed: one span is the whole block
    assert plan.staging_bytes(16) == 4 * 2 * 4 * block_rows * rb  # 4 layers x K,V x 4 blocks
    [rnd] = plan.bind([2, 3, 4, 6], [0, 1, 2, 3], 16, 0, plan.staging_bytes(16))
    [(src_index, read)] = rnd.reads
    # per (layer, K|V): blocks 2,3,4 are one span, block 6 another
    assert src_index == 0 and len(read) == 4 * 2 * 2
    assert (read.as_array()[:, 1] >= d.region_bytes).all()
    assert read.total_bytes == plan.staging_bytes(16) and len(rnd.scatter.dst_rows) == 4 * 2 * 16 * 4


@pytest.mark.parametrize("order, rows_per_block, regions", [("NHD", 4 * 4, 4 * 2), ("HND", 4 * 2, 4 * 2 * 3)])
def test_a_staged_tp_split_reads_whole_nhd_blocks_or_hnd_head_ranges(order, rows_per_block, regions):
    [s], dst = worker(num_blocks=4, tp=1, order=order), worker(num_blocks=8, tp=2, block_size=8, order="NHD")
    plan = plan_conversion([s], dst[1])  # heads 2,3 of 4, into NHD blocks of 8: staged either way
    assert plan.needs_staging and plan.kinds == ["tp-split", "reblock 4->8"] + (["HND->NHD"] if order == "HND" else [])
    assert plan.staging_bytes(12) == 4 * 2 * 3 * rows_per_block * plan.row_bytes  # 4 layers x K,V x 3 blocks
    [rnd] = plan.bind([1, 2, 3], [5, 6], 12, 0, plan.staging_bytes(12))
    assert len(rnd.reads[0][1]) == regions  # NHD: blocks 1-3 merge per (layer, K|V)


def test_a_request_bigger_than_staging_is_split_in_rounds():
    [s], [d] = worker(num_blocks=16, order="NHD"), worker(num_blocks=16, order="HND")
    plan = plan_conversion([s], d)
    need = plan.staging_bytes(64)
    rounds = plan.bind(list(range(16)), list(range(16)), 64, 0, need // 5)
    assert len(rounds) == math.ceil(need / (need // 5 // plan.row_bytes * plan.row_bytes))
    assert all(r.scatter is not None and r.nbytes <= need // 5 for r in rounds)
    assert sum(r.nbytes for r in rounds) == need


@pytest.mark.parametrize("kind", ["identical", "NHD->HND", "tp-split"])
def test_binding_a_4096_token_smollm2_request_takes_well_under_10_ms(kind):
    geo = dict(model_fingerprint="smollm2", total_layers=30, total_kv_heads=3, head_dim=64)
    src = worker_layouts(**geo, tp=1, pp=1, block_size=16, num_blocks=300)
    dst = {"identical": dict(tp=1), "NHD->HND": dict(tp=1, order="HND"), "tp-split": dict(tp=3)}[kind]
    d = worker_layouts(**geo, pp=1, block_size=16, num_blocks=300, **dst)[-1]
    plan = plan_conversion(src, d)
    rng = np.random.default_rng(0)
    src_blocks, dst_blocks = rng.permutation(300)[:256], rng.permutation(300)[:256]
    staging = plan.staging_bytes(4096)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        plan.bind(src_blocks, dst_blocks, 4096, 0, staging)
        best = min(best, time.perf_counter() - t)
    assert best < 0.010, f"bind took {best * 1e3:.2f} ms"


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, dst, error, message",
    [
        (worker(block_size=12), worker(block_size=8), UnsupportedConversionError,
         "block_size: prefill 12 vs decode 8: one must divide the other"),
        (worker(dtype="bfloat16"), worker(dtype="float32"), IncompatiblePeerError,
         "prefill and decode KV caches can never be exchanged: dtype: prefill 'bfloat16' vs decode 'float32'"),
        (worker(model_fingerprint="a", head_dim=4), worker(model_fingerprint="b", head_dim=8), IncompatiblePeerError,
         "prefill and decode KV caches can never be exchanged: model_fingerprint: prefill 'a' vs decode 'b'; "
         "head_dim: prefill 4 vs decode 8"),
        (worker(total_layers=4), worker(total_layers=5), IncompatiblePeerError,
         "prefill and decode KV caches can never be exchanged: total_layers: prefill 4 vs decode 5"),
        (worker(total_kv_heads=4), worker(total_kv_heads=2), IncompatiblePeerError,
         "prefill and decode KV caches can never be exchanged: total_kv_heads: prefill 4 vs decode 2"),
        (worker(pp=2)[:1], worker(), UnsupportedConversionError,
         "coverage: decode rank 0 holds layers [0, 4) x KV heads [0, 4) but no prefill rank holds layer 2 KV head 0 "
         "(prefill rank 0: layers [0, 2) heads [0, 4))"),
        (worker(tp=2)[1:], worker(tp=4), UnsupportedConversionError,
         "coverage: decode rank 0 holds layers [0, 4) x KV heads [0, 1) but no prefill rank holds layer 0 KV head 0 "
         "(prefill rank 0: layers [0, 4) heads [2, 4))"),
        ([], worker(), UnsupportedConversionError, "malformed prefill rank set: no ranks"),
        (worker(), [worker()[0], "rank"], UnsupportedConversionError,
         "malformed decode rank set: rank 1 is a str, not a KVLayout"),
        (worker(tp=2)[:1] + worker(tp=2, num_blocks=8)[1:], worker(), UnsupportedConversionError,
         "malformed prefill rank set: rank 1 has num_blocks 8 but rank 0 has 16; "
         "all ranks of one worker share one model and one block pool"),
        (worker(), worker(pp=2)[:1] + worker(pp=2, order="HND")[1:], UnsupportedConversionError,
         "malformed decode rank set: rank 1 has order 'HND' but rank 0 has 'NHD'; "
         "all ranks of one worker share one model and one block pool"),
    ],
)  # fmt: skip
def test_impossible_pairs_are_refused_with_a_message_naming_both_sides(src, dst, error, message):
    with pytest.raises(error) as e:
        check_pair(src, dst)
    assert str(e.value) == message
    if "decode rank set" not in message:  # plan_conversion sees one decode rank at a time
        with pytest.raises(error):
            for d in dst:
                plan_conversion(src, d)


def test_block_sizes_that_divide_each_other_are_accepted_both_ways():
    check_pair(worker(block_size=16), worker(block_size=4))
    check_pair(worker(block_size=4), worker(block_size=16))


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(src_blocks=[0, 1]), "2 source block ids but tokens \\[0, 10\\) in blocks of 4 need 3"),
        (dict(dst_blocks=[0]), "1 destination block ids but tokens \\[0, 10\\) in blocks of 8 need 2"),
        (dict(src_blocks=[0, 1, 16]), "source block id 16 is out of range \\[0, 16\\)"),
        (dict(dst_blocks=[-1, 2]), "destination block id -1 is out of range"),
        (dict(dst_blocks=[3, 3]), "destination block ids repeat: \\[3\\]"),
        (dict(first_token=4, dst_blocks=[3]), "first_token 4 is not a multiple of the decode block size 8"),
        (dict(first_token=16, dst_blocks=[]), "first_token 16 is past num_tokens 10"),
        (dict(num_tokens=-1), "num_tokens must be >= 0"),
        (dict(num_tokens=10.0), "num_tokens 10.0 is not an integer"),
        (dict(src_blocks=[0.0, 1.0, 2.0]), "source block ids must be integers"),
        (dict(src_blocks=[True, False, True]), "source block ids must be integers"),
        (dict(staging_bytes=7), "stages rows of 8 bytes but the staging buffer has 7 bytes"),
    ],
)
def test_bad_requests_are_refused(kw, needle):
    [s], [d] = worker(block_size=4, head_dim=4), worker(block_size=8, order="HND", head_dim=4)
    args = dict(src_blocks=[0, 1, 2], dst_blocks=[0, 1], num_tokens=10, first_token=0, staging_bytes=4096) | kw
    with pytest.raises(InvalidPlanError, match=needle):
        plan_conversion([s], d).bind(**args)


def test_nothing_to_copy_binds_to_no_rounds():
    plan = plan_conversion(worker(), worker(order="HND")[0])
    assert plan.bind([], [], 0) == [] and plan.bind([0, 1, 2], [], 12, 12) == []


# ---- the scatter ------------------------------------------------------------------------------------------
def test_apply_scatter_moves_rows_and_reports_the_torch_backend_on_cpu():
    staging = torch.arange(6 * 4, dtype=torch.float32)
    cache = torch.zeros(2, 3, 4)
    assert apply_scatter(RowScatter(np.array([1, 4, 5]), np.array([5, 0, 2])), staging, cache) == "torch"
    rows = cache.view(-1, 4)
    assert rows[5].tolist() == [4, 5, 6, 7] and rows[0].tolist() == [16, 17, 18, 19]
    assert rows[2].tolist() == [20, 21, 22, 23]
    assert rows[[1, 3, 4]].abs().sum() == 0
    contiguous = RowScatter(np.array([2, 3]), np.array([1, 3]))  # staging rows 2-3: a slice, no gather
    assert apply_scatter(contiguous, staging, cache) == "torch"
    assert rows[1].tolist() == [8, 9, 10, 11] and rows[3].tolist() == [12, 13, 14, 15]
    assert apply_scatter(RowScatter(np.empty(0, np.int64), np.empty(0, np.int64)), staging, cache) == "none"
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        apply_scatter(RowScatter(np.array([0]), np.array([0])), staging, cache, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 3])
def test_triton_scatter_equals_the_torch_scatter_on_cuda(dtype, head_dim):
    g = torch.Generator().manual_seed(0)
    rows = 50_000
    staging = torch.randint(0, 256, (rows * head_dim * dtype.itemsize,), generator=g, dtype=torch.uint8)
    staging = staging.view(dtype).cuda()
    cache = torch.zeros(2 * rows, head_dim, dtype=dtype, device="cuda")
    src = np.sort(torch.randperm(rows, generator=g)[: rows // 2].numpy())
    dst = torch.randperm(2 * rows, generator=g)[: rows // 2].numpy()
    by_torch = cache.clone()
    assert apply_scatter(RowScatter(src, dst), staging, by_torch, backend="torch") == "torch"
    assert apply_scatter(RowScatter(src, dst), staging, cache) == "triton"
    torch.cuda.synchronize()
    assert torch.equal(cache.view(torch.uint8), by_torch.view(torch.uint8))
    want = staging.view(-1, head_dim)[torch.from_numpy(src).cuda()]
    assert torch.equal(cache[torch.from_numpy(dst).cuda()].view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
def test_a_conversion_executes_on_cuda_like_on_cpu():
    src = worker(tp=1, pp=2, block_size=8, num_blocks=9, order="NHD", total_layers=3, head_dim=64)
    dst = worker(tp=2, pp=1, block_size=4, num_blocks=20, order="HND", total_layers=3, head_dim=64)
    g = torch.Generator().manual_seed(1)
    src_caches = [torch.randint(-99, 99, s.shape, generator=g).to(torch.bfloat16) for s in src]
    src_blocks, dst_blocks = [8, 2, 5, 0, 1, 3], [19, 4, 5, 6, 11, 0, 9, 2, 3]
    for d in dst:
        plan = plan_conversion(src, d)
        rounds = plan.bind(src_blocks, dst_blocks, 45, 12, plan.staging_bytes(45, 12) // 3)
        outs = []
        for dev in ("cpu", "cuda"):
            cache = torch.zeros(d.shape, dtype=torch.bfloat16, device=dev)
            staging = torch.empty(plan.staging_bytes(45, 12) // 3, dtype=torch.uint8, device=dev)
            execute_locally(rounds, [c.to(dev) for c in src_caches], cache, staging)
            outs.append(cache.cpu())
        assert torch.equal(outs[0], outs[1])
