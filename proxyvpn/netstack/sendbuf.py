"""The send queue of one connection: bytes from the proxy, kept until the app ACKs them.

A bytearray would copy every chunk in (``+=``) and every segment out (a slice must be
copied before the bytearray may grow again). This keeps the immutable ``bytes`` chunks
as they came from the proxy socket and hands out zero-copy memoryviews of them when a
segment lies inside one chunk -- the usual case for 64 KiB reads -- so a byte is copied
once between the proxy socket and the TUN: into the packet that build() assembles.
"""

from __future__ import annotations

from bisect import bisect_right

_COMPACT_AT = 64
"""Consumed chunks at the head are dropped from the lists in batches of this many."""


class SendBuffer:
    """Bytes indexed from 0 (the oldest unacknowledged byte), appended at the end and
    discarded from the front."""

    __slots__ = ("_chunks", "_ends", "_head", "_consumed", "_total")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ends: list[int] = []
        """Stream offset (counted from creation) just past each chunk; ascending."""
        self._head = 0
        """Index of the first chunk still (partly) queued."""
        self._consumed = 0
        """Stream offset of index 0."""
        self._total = 0
        """Stream offset just past the last byte."""

    def __len__(self) -> int:
        return self._total - self._consumed

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` (kept by reference if it is bytes, else copied once)."""
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        self._total += len(chunk)
        self._chunks.append(chunk)
        self._ends.append(self._total)

    def discard(self, n: int) -> None:
        """Drop the first `n` bytes (they were acknowledged)."""
        if n <= 0:
            return
        consumed = min(self._consumed + n, self._total)
        self._consumed = consumed
        ends, head = self._ends, self._head
        while head < len(ends) and ends[head] <= consumed:
            self._chunks[head] = b""  # free it now, not at the next compaction
            head += 1
        if head >= _COMPACT_AT:
            del self._chunks[:head]
            del self._ends[:head]
            head = 0
        self._head = head

    def slice(self, lo: int, hi: int) -> bytes | memoryview:
        """Bytes [lo, hi) (0 <= lo <= hi <= len): a view of one chunk when they lie inside
        one, else a new bytes object. A view stays valid after discard()."""
        if hi <= lo:
            return b""
        a, b = self._consumed + lo, self._consumed + hi
        ends, chunks = self._ends, self._chunks
        i = bisect_right(ends, a, self._head)
        end = ends[i]
        chunk = chunks[i]
        start = end - len(chunk)
        if b <= end:
            if a == start and b == end:
                return chunk
            return memoryview(chunk)[a - start : b - start]
        parts: list[bytes | memoryview] = [memoryview(chunk)[a - start :]]
        pos = end
        while pos < b:
            i += 1
            chunk = chunks[i]
            end = ends[i]
            parts.append(memoryview(chunk)[: len(chunk) - (end - b)] if end > b else chunk)
            pos = end
        return b"".join(parts)

    def clear(self) -> None:
        """Drop everything."""
        self._chunks.clear()
        self._ends.clear()
        self._head = 0
        self._consumed = self._total
