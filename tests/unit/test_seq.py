"""32-bit sequence arithmetic (RFC 9293 §3.4): comparisons across the wrap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyvpn.netstack.seq import (
    SEQ_MASK,
    IsnSource,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_in_window,
    seq_le,
    seq_lt,
    seq_unwrap,
)

u32 = st.integers(0, SEQ_MASK)
# Distances strictly inside half the circle, where ordering is well defined.
dist = st.integers(-(2**31) + 1, 2**31 - 1)


@pytest.mark.parametrize(
    ("a", "b", "diff"),
    [
        (5, 3, 2),
        (3, 5, -2),
        (0, SEQ_MASK, 1),  # 0 comes right after 2**32-1
        (SEQ_MASK, 0, -1),
        (0x10, 0xFFFFFFF0, 0x20),
        (2**31 - 1, 0, 2**31 - 1),
        (2**31, 0, -(2**31)),  # exactly half: taken as "behind"
        (7, 7, 0),
    ],
)
def test_seq_diff_table(a: int, b: int, diff: int) -> None:
    assert seq_diff(a, b) == diff


def test_comparisons_across_the_wrap() -> None:
    assert seq_lt(0xFFFFFFFF, 0)
    assert seq_gt(0, 0xFFFFFFFF)
    assert seq_le(0xFFFFFFFF, 0xFFFFFFFF)
    assert seq_ge(1, 0xFFFFFF00)
    assert not seq_lt(1, 0xFFFFFF00)
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert seq_add(1, -2) == 0xFFFFFFFF


def test_in_window_edges() -> None:
    assert seq_in_window(0xFFFFFFFF, 0xFFFFFFF0, 0x20)
    assert seq_in_window(0x0F, 0xFFFFFFF0, 0x20)
    assert not seq_in_window(0x10, 0xFFFFFFF0, 0x20)  # right edge is exclusive
    assert not seq_in_window(0xFFFFFFEF, 0xFFFFFFF0, 0x20)
    assert not seq_in_window(5, 5, 0)  # an empty window holds nothing


@given(u32, dist)
def test_add_then_diff_roundtrip(a: int, d: int) -> None:
    b = seq_add(a, d)
    assert 0 <= b <= SEQ_MASK
    assert seq_diff(b, a) == d
    assert seq_lt(a, b) == (d > 0)
    assert seq_gt(a, b) == (d < 0)
    assert seq_le(a, b) == (d >= 0)
    assert seq_ge(a, b) == (d <= 0)


@given(u32, u32)
def test_antisymmetry(a: int, b: int) -> None:
    if seq_diff(a, b) != -(2**31):
        assert seq_diff(a, b) == -seq_diff(b, a)
        assert seq_lt(a, b) == seq_gt(b, a)


@given(u32, st.integers(0, 2**40), dist)
def test_unwrap_recovers_position(origin: int, near: int, d: int) -> None:
    pos = near + d
    wire = (origin + pos) & SEQ_MASK
    assert seq_unwrap(wire, near, origin) == pos


def test_isn_source_gives_random_32_bit_numbers_across_refills() -> None:
    first, second = IsnSource(batch=64), IsnSource(batch=64)
    values = [first.next() for _ in range(1000)]  # 15 refills and a partial one
    assert all(0 <= v <= SEQ_MASK for v in values)
    assert len(set(values)) >= 999  # a repeat among 1,000 random 32-bit values: ~1e-4
    assert max(values) > 1 << 31 > min(values)  # all 32 bits are used
    assert [second.next() for _ in range(100)] != values[:100]
