"""Decode rows are cut into length groups: bounded padding, few attention calls."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model_runner import length_groups


def test_examples():
    assert length_groups([]) == []
    assert length_groups([5]) == [(0, 1)]
    assert length_groups([10, 11, 12, 100]) == [(0, 4)]  # fewer than min_rows before the jump: one call
    assert length_groups([10, 10, 11, 12, 100, 101, 102, 103]) == [(0, 4), (4, 8)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=64))
def test_groups_cover_rows_in_order_with_bounded_padding(lens):
    lens = sorted(lens)
    groups = length_groups(lens)
    assert [i for lo, hi in groups for i in range(lo, hi)] == list(range(len(lens)))
    assert len(groups) <= 4
    for lo, hi in groups[:-1]:  # past its first 4 rows, a group (but the last) pads at most 1.5x its shortest row
        assert hi - lo >= 4
        assert all(lens[j] <= 1.5 * lens[lo] for j in range(lo + 4, hi))
        assert lens[hi] > 1.5 * lens[lo]  # and it was cut only where that bound broke
