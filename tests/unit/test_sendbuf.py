"""SendBuffer behaves exactly like the bytearray it replaced, and shares instead of copying."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxyvpn.netstack.sendbuf import SendBuffer

ops = st.lists(
    st.one_of(
        st.tuples(st.just("extend"), st.binary(max_size=80), st.booleans()),
        st.tuples(st.just("discard"), st.integers(-5, 200), st.booleans()),
        st.tuples(st.just("slice"), st.integers(0, 400), st.integers(0, 400)),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_matches_a_bytearray(ops) -> None:
    buf, ref = SendBuffer(), bytearray()
    for op, a, b in ops:
        if op == "extend":
            buf.extend(a if b else bytearray(a))
            ref += a
        elif op == "discard":
            buf.discard(a)
            if a > 0:
                del ref[:a]
        elif op == "slice":
            lo, hi = sorted((min(a, len(ref)), min(b, len(ref))))
            assert bytes(buf.slice(lo, hi)) == bytes(ref[lo:hi])
        else:
            buf.clear()
            ref.clear()
        assert len(buf) == len(ref)


def test_a_segment_inside_one_chunk_is_a_view_not_a_copy() -> None:
    chunk = bytes(range(200))
    buf = SendBuffer()
    buf.extend(b"x" * 10)
    buf.extend(chunk)
    assert buf.slice(10, 210) is chunk
    view = buf.slice(20, 60)
    assert isinstance(view, memoryview) and view.obj is chunk and view == chunk[10:50]
    buf.discard(100)  # a view handed out stays valid after the bytes are acknowledged
    assert view == chunk[10:50]
    assert buf.slice(0, 110) == chunk[90:]


def test_many_chunks_are_compacted() -> None:
    buf = SendBuffer()
    for i in range(1000):
        buf.extend(bytes([i % 256]) * 3)
        buf.discard(3 if i % 2 else 2)
    assert len(buf) == 1000 * 3 - 500 * 3 - 500 * 2
    assert len(buf._chunks) < 1000
