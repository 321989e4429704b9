"""32-bit TCP sequence number arithmetic (RFC 9293 §3.4).

Sequence numbers live in a circle of 2**32 values, so "less than" only makes sense
for numbers less than half the circle apart (RFC 1982 serial number arithmetic).
Every comparison here goes through the signed distance :func:`seq_diff`.

The TCP state machine keeps its own positions as unwrapped integers (offsets from
ISS/IRS that only grow) and uses :func:`seq_unwrap` once per incoming number, which
keeps the per-segment hot path free of modular comparisons. The wire format is
recovered with :func:`seq_add`.
"""

from __future__ import annotations

import os

SEQ_MOD = 1 << 32
"""Size of the sequence number space."""

SEQ_MASK = SEQ_MOD - 1
"""Mask that reduces an integer to a 32-bit sequence number."""

SEQ_HALF = 1 << 31
"""Half the circle: distances at or beyond this are taken as negative."""


def seq_add(a: int, n: int) -> int:
    """Return ``a + n`` modulo 2**32 (``n`` may be negative)."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """Return the signed distance ``a - b`` in ``[-2**31, 2**31)``.

    Exactly half the circle apart is ambiguous (RFC 1982 §3.2 leaves it undefined);
    it is reported as ``-2**31``, i.e. ``a`` is taken to be behind ``b``.
    """
    d = (a - b) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


def seq_lt(a: int, b: int) -> bool:
    """``a < b`` in sequence space (RFC 9293 §3.4 "=<" family)."""
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    """``a <= b`` in sequence space."""
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    """``a > b`` in sequence space."""
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    """``a >= b`` in sequence space."""
    return seq_diff(a, b) >= 0


def seq_in_window(x: int, left: int, size: int) -> bool:
    """Whether ``left <= x < left + size`` in sequence space.

    This is the building block of the RFC 9293 §3.10.7.4 acceptability test; a
    window of size 0 contains nothing.
    """
    return ((x - left) & SEQ_MASK) < size


def seq_unwrap(wire: int, near: int, origin: int) -> int:
    """Map a 32-bit ``wire`` number to an unwrapped position.

    ``origin`` is the wire value of unwrapped position 0 (the ISS or IRS) and
    ``near`` a known unwrapped position (SND.UNA, RCV.NXT); the result is the
    position closest to ``near`` whose wire value is ``wire``. Valid as long as the
    true position is within 2**31 of ``near``, which the window limits guarantee.
    """
    return near + seq_diff(wire, (origin + near) & SEQ_MASK)


class IsnSource:
    """Initial sequence numbers from the kernel's CSPRNG, fetched many at a time.

    Random ISNs are what RFC 6528 protects against (off-path guessing). One
    getrandom() per connection was ~2 % of proxyvpn's CPU at 2,600 connections/s
    (py-spy, bench cps_64); one per ``batch`` connections is noise.
    """

    __slots__ = ("_batch", "_values")

    def __init__(self, batch: int = 1024) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self._batch = batch
        self._values: list[int] = []

    def next(self) -> int:
        """A fresh, unpredictable 32-bit ISN."""
        values = self._values
        if not values:
            values.extend(memoryview(os.urandom(4 * self._batch)).cast("I"))
        return values.pop()
