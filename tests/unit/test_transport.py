"""SocketTransport against a real TCP peer on loopback: asyncio's Transport semantics
(flush on close, half-close, water marks, errors) with our own reader/writer callbacks."""

from __future__ import annotations

import asyncio
import hashlib
import random
import select
import socket
import tracemalloc
import weakref

import pytest
from transport_pair import Recorder, pair, read_mark, stream_until_marked, until

from proxyvpn.relay import transport as transport_module
from proxyvpn.relay.transport import SocketTransport


async def read_all(loop: asyncio.AbstractEventLoop, peer: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = await loop.sock_recv(peer, 1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def fill_socket(transport: SocketTransport, rng: random.Random) -> bytes:
    """Write more than the socket takes (the peer reads nothing yet): later writes queue."""
    fill = rng.randbytes(32 * 1024 * 1024)
    transport.write(fill)
    assert transport.get_write_buffer_size() > 0
    return fill


def test_data_both_ways_and_peer_half_close_keeps_writing_open() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            assert protocol.calls == ["made"] and transport.is_reading()
            await loop.sock_sendall(peer, b"hello")
            peer.shutdown(socket.SHUT_WR)
            while "eof" not in protocol.calls:
                await asyncio.sleep(0.01)
            assert bytes(protocol.data) == b"hello"
            assert not transport.is_closing() and not transport.is_reading()
            transport.resume_reading()  # after EOF: must not report it twice
            await asyncio.sleep(0.05)
            assert protocol.calls.count("eof") == 1
            transport.write(b"reply after your FIN")
            transport.write_eof()
            assert await read_all(loop, peer) == b"reply after your FIN"
            with pytest.raises(RuntimeError, match="after write_eof"):
                transport.write(b"more")

    run(body())


def test_eof_closes_when_protocol_returns_false() -> None:
    async def body() -> None:
        async with pair(lambda: Recorder(keep_open_on_eof=False)) as (transport, protocol, peer):
            peer.shutdown(socket.SHUT_WR)
            assert await protocol.lost is None
            assert protocol.calls == ["made", "eof", "lost"]
            assert transport.is_closing()
            assert transport.get_extra_info("socket").fileno() == -1  # closed

    run(body())


def test_back_pressure_marks_and_integrity_over_megabytes() -> None:
    payload = random.Random(3).randbytes(8 * 1024 * 1024 + 5)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
            assert transport.get_write_buffer_limits() == (64 * 1024, 256 * 1024)
            view = memoryview(payload)
            for i in range(0, len(payload), 100_000):
                transport.write(view[i:i + 100_000])
            # The peer reads nothing yet: the kernel buffers fill and ours grows past high.
            assert transport.get_write_buffer_size() > 256 * 1024
            assert protocol.calls == ["made", "pause_writing"]
            transport.close()  # must flush everything first
            assert not protocol.lost.done()
            received = await read_all(loop, peer)
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert await protocol.lost is None
            assert protocol.calls == ["made", "pause_writing", "resume_writing", "lost"]

    run(body())


def test_close_reports_lost_later_never_inside_the_call() -> None:
    async def body() -> None:
        async with pair() as (transport, protocol, peer):
            transport.close()
            assert transport.is_closing() and protocol.calls == ["made"]
            assert await protocol.lost is None
            transport.close()  # idempotent
            transport.abort()
            await asyncio.sleep(0.01)
            assert protocol.calls == ["made", "lost"]
            transport.write(b"dropped")  # a closing transport drops writes silently
            assert transport.get_write_buffer_size() == 0

    run(body())


def test_abort_drops_buffered_data() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            transport.write(b"x" * (32 * 1024 * 1024))
            queued = transport.get_write_buffer_size()
            assert queued > 0
            transport.abort()
            assert transport.get_write_buffer_size() == 0
            assert await protocol.lost is None
            received = await read_all(loop, peer)  # EOF comes: the socket was closed
            assert len(received) <= 32 * 1024 * 1024 - queued  # what we held never went

    run(body())


def test_peer_reset_is_connection_lost_with_the_error() -> None:
    async def body() -> None:
        async with pair() as (transport, protocol, peer):
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer.close()  # linger 0: RST
            exc = await protocol.lost
            assert isinstance(exc, ConnectionResetError)
            assert transport.is_closing()

    run(body())


def test_pause_reading_holds_data_until_resumed() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            transport.pause_reading()
            transport.pause_reading()
            await loop.sock_sendall(peer, b"held")
            await asyncio.sleep(0.05)
            assert protocol.data == b""
            transport.resume_reading()
            await asyncio.wait_for(protocol.got_data.wait(), 5)
            assert protocol.data == b"held"

    run(body())


def test_extra_info() -> None:
    async def body() -> None:
        async with pair() as (transport, protocol, peer):
            assert transport.get_extra_info("peername") == peer.getsockname()
            assert transport.get_extra_info("sockname") == peer.getpeername()
            assert transport.get_extra_info("sslcontext") is None
            assert transport.get_extra_info("nonsense", 7) == 7
            assert transport.can_write_eof() and transport.get_protocol() is protocol
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=1, low=2)

    run(body())


def test_writelines_partial_sends_keep_order_and_bytes() -> None:
    rng = random.Random(5)
    # One call with more buffers than one sendmsg() takes (512), large enough that the
    # kernel takes only part: the second batch goes out after a partial first one.
    first = [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(700)]
    second = [rng.randbytes(rng.randrange(1, 70_000)) for _ in range(100)]
    payload = b"".join(first + second)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            transport.writelines([memoryview(c) for c in first])
            assert transport.get_write_buffer_size() > 0  # the peer reads nothing yet
            transport.writelines(second)  # queued behind the buffer
            transport.write_eof()  # FIN only after all of it
            received = await read_all(loop, peer)
            assert len(received) == len(payload)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            with pytest.raises(RuntimeError, match="after write_eof"):
                transport.writelines([b"x"])

    run(body())


def test_queued_writes_keep_the_bytes_of_the_moment_they_were_written() -> None:
    """asyncio lets a writer reuse its buffer as soon as write() returns, so what the
    socket did not take must not change with it (a queue of views of them would: mutable
    buffers are copied)."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            fill = fill_socket(transport, random.Random(5))
            scratch = bytearray(b"first")
            transport.write(scratch)
            scratch[:] = b"XXXXX"
            transport.writelines([memoryview(scratch), b"-last"])
            scratch[:] = b"YYYYY"
            before = transport.get_write_buffer_size()
            transport.write_eof()
            received = await read_all(loop, peer)
            assert received == fill + b"firstXXXXX-last"
            assert before > 15 and transport.get_write_buffer_size() == 0

    run(body())


def test_queued_bytes_are_held_as_they_are_not_copied() -> None:
    """What the socket did not take waits as the writer's own bytes (or views of them):
    an upload through a slower proxy queues most of its bytes, and a copy of each was
    proxyvpn's largest user-space cost there. Mutable buffers are copied (test above),
    and so are short writes, into one buffer."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            fill = fill_socket(transport, random.Random(6))
            packet = random.Random(7).randbytes(65536)
            transport.writelines([memoryview(packet)[52:], b"end"])
            queue = list(transport._buffer)
            assert queue[0].obj is fill  # the unsent rest of it, as a view
            assert queue[1].obj is packet
            # Short writes are copied together: 100,000 of them do not make a queue of
            # 100,000 objects (each 3-byte write held as is would cost ~100 bytes more).
            tiny = [bytes([i % 256]) for i in range(100_000)]
            transport.writelines(tiny)
            assert len(transport._buffer) < 6
            assert transport.get_write_buffer_size() == sum(map(len, transport._buffer))
            transport.write_eof()
            received = await read_all(loop, peer)
            assert received == fill + packet[52:] + b"end" + b"".join(tiny)

    run(body())


def test_queued_writes_of_any_buffer_kind_arrive_as_written() -> None:
    """Large mutable buffers (and read-only views of them) are copied, a view the writer
    releases afterwards is still sent, a view of another item size counts in bytes: the
    queue's byte count stays the sum of what it holds while the peer reads in small steps."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            rng = random.Random(8)
            fill = fill_socket(transport, rng)
            big = bytearray(rng.randbytes(8192))
            readonly = bytearray(rng.randbytes(8192))
            words = rng.randbytes(16384)
            released = rng.randbytes(8192)
            expected = fill + bytes(big) + bytes(readonly) + words + released + b"tail"
            transport.write(big)
            transport.writelines([memoryview(readonly).toreadonly(),
                                  memoryview(words).cast("I")])
            with memoryview(released) as view:
                transport.write(view)
            transport.write(b"tail")
            big[:] = bytes(8192)
            readonly[:] = bytes(8192)

            def consistent() -> bool:
                queue = transport._buffer or ()
                return transport.get_write_buffer_size() == sum(map(len, queue))

            assert consistent()
            received = bytearray()
            while len(received) < len(expected):
                chunk = await loop.sock_recv(peer, rng.randrange(1, 3 * 65536))
                assert chunk
                received += chunk
                assert consistent()
            assert received == expected
            assert transport.get_write_buffer_size() == 0

    run(body())


def test_reset_while_data_is_buffered_is_connection_lost_with_the_error() -> None:
    async def body() -> None:
        async with pair() as (transport, protocol, peer):
            transport.write(b"y" * (32 * 1024 * 1024))
            assert transport.get_write_buffer_size() > 0
            transport.close()  # would flush: the reset comes first
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer.close()
            exc = await protocol.lost
            assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), exc
            assert transport.get_write_buffer_size() == 0

    run(body())


def test_write_eof_from_inside_resume_writing_flushes_then_half_closes() -> None:
    class EofOnResume(Recorder):
        transport: SocketTransport

        def resume_writing(self) -> None:
            super().resume_writing()
            self.transport.write_eof()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair(EofOnResume) as (transport, protocol, peer):
            protocol.transport = transport
            transport.set_write_buffer_limits(high=64 * 1024, low=0)
            transport.write(b"z" * (16 * 1024 * 1024))
            received = await read_all(loop, peer)
            assert len(received) == 16 * 1024 * 1024
            await asyncio.sleep(0.05)
            assert not protocol.lost.done()  # half-closed, not closed: we may still read
            assert "resume_writing" in protocol.calls

    run(body())


def test_a_protocol_callback_that_raises_closes_the_transport(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise ValueError("bug in the protocol")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        async with pair(Broken) as (transport, protocol, peer):
            await loop.sock_sendall(peer, b"boom")
            exc = await protocol.lost
            assert isinstance(exc, ValueError)
            assert transport.is_closing()
            assert errors and "data_received" in errors[0]["message"]
            assert await read_all(loop, peer) == b""  # the socket was closed: EOF

    run(body())


def test_close_gives_up_on_a_peer_that_takes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow is gone once it closes the tunnel: a proxy that stops reading must not
    keep the socket and its buffer for ever."""
    monkeypatch.setattr(transport_module, "CLOSE_STALL", 0.2)

    async def body() -> None:
        async with pair() as (transport, protocol, peer):
            transport.write(b"x" * (8 << 20))
            assert transport.get_write_buffer_size() > 0  # the peer reads nothing
            sock = transport.get_extra_info("socket")
            transport.close()
            exc = await asyncio.wait_for(protocol.lost, 2)
            assert isinstance(exc, TimeoutError)
            assert sock.fileno() == -1  # closed, not leaked

    run(body())


def test_close_waits_for_a_slow_peer_that_keeps_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress re-arms the stall timer: this peer needs several stall periods in all."""
    monkeypatch.setattr(transport_module, "CLOSE_STALL", 0.5)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            data = random.randbytes(16 << 20)
            transport.write(data)
            transport.close()
            received = bytearray()
            started = loop.time()
            while True:  # each read comes well within one stall period
                await asyncio.sleep(0.02)
                try:
                    chunk = peer.recv(256 * 1024)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                received += chunk
            assert await protocol.lost is None
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            assert loop.time() - started > 0.5, "it never needed a second stall period"

    run(body())


def test_replies_smaller_than_a_stream_never_raise_theread_mark() -> None:
    """Requests and replies (even ones larger than STREAM_READ, read in one go) never
    wait for the hold."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            total = 0
            for size in [1000] * 10 + [transport_module.STREAM_AFTER - 4096] * 3:
                await loop.sock_sendall(peer, b"r" * size)
                total += size
                await until(lambda want=total: len(protocol.data) == want)
                assert read_mark(transport) == 1
                await asyncio.sleep(transport_module.STREAM_HOLD * 5)  # a pause ends a burst

    run(body())


def test_a_streaming_peer_raises_the_read_mark_until_it_pauses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Our side of SO_RCVLOWAT; that the kernel then holds a tail below the mark and the
    hold releases it is tests/netns/test_stream_mark.py (loopback's 64 KiB MSS makes the
    kernel wake the reader for any tail here)."""
    monkeypatch.setattr(transport_module, "STREAM_HOLD", 0.05)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            sent = await stream_until_marked(transport, peer)
            await until(lambda: len(protocol.data) == sent)
            await until(lambda: read_mark(transport) == 1, timeout=1)
            await loop.sock_sendall(peer, b"tail")
            await until(lambda: len(protocol.data) == sent + 4)
            assert protocol.data.endswith(b"tail")
            assert read_mark(transport) == 1  # a small read does not raise it again

    run(body())


def test_reads_while_streaming_keep_the_mark_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "STREAM_HOLD", 0.05)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with pair() as (transport, protocol, peer):
            sent = await stream_until_marked(transport, peer)
            for _ in range(10):  # a read every 20 ms: the 50 ms hold never runs out
                await loop.sock_sendall(peer, b"m" * transport.read_size)
                sent += transport.read_size
                await asyncio.sleep(0.02)
                assert read_mark(transport) == transport.read_size
            await until(lambda: len(protocol.data) == sent)
            await until(lambda: read_mark(transport) == 1, timeout=1)

    run(body())


def test_closing_with_the_mark_up_leaves_no_check_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "STREAM_HOLD", 0.05)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        async with pair() as (transport, protocol, peer):
            await stream_until_marked(transport, peer)
            sock = transport.get_extra_info("socket")
            transport.abort()
            assert await protocol.lost is None
            await asyncio.sleep(0.15)  # past the hold: a live check would use a closed socket
            assert sock.fileno() == -1
        assert errors == []

    run(body())


class ChunkSizes(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def data_received(self, data: bytes) -> None:
        self.sizes.append(len(data))
        super().data_received(data)


def test_reads_are_cut_to_whole_units_and_the_mark_follows() -> None:
    """read_in_units(the app's segment size): a full read is whole segments, no runt."""
    unit = 65_483
    async def body() -> None:
        async with pair(ChunkSizes) as (transport, protocol, peer):
            assert transport.read_size == transport_module.READ_SIZE
            for bad in (0, -1, transport_module.READ_SIZE + 1):
                transport.read_in_units(bad)
                assert transport.read_size == transport_module.READ_SIZE
            transport.read_in_units(unit)
            assert transport.read_size == 4 * unit
            sent = await stream_until_marked(transport, peer)
            assert read_mark(transport) == 4 * unit
            await until(lambda: len(protocol.data) == sent)
            assert max(protocol.sizes) == 4 * unit

    run(body())


class FinWatch(Recorder):
    """Records each delivery with what eof_read() said during it, and whether eof_received
    came in the same event-loop callback (before a call_soon marker set by the delivery)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.calls.append(f"data {bytes(data[:8]).decode()} fin={self.transport.eof_read()}")
        asyncio.get_running_loop().call_soon(self.calls.append, "next callback")
        super().data_received(data)


async def _queued(transport: SocketTransport, peer: socket.socket, data: bytes,
                  fin: bool = False) -> None:
    """``data`` (and the FIN) queued in our socket before the transport reads any of it."""
    transport.pause_reading()
    peer.sendall(data)
    if fin:
        peer.shutdown(socket.SHUT_WR)
    poller = select.poll()
    poller.register(transport.get_extra_info("socket").fileno(),
                    select.POLLRDHUP if fin else select.POLLIN)
    assert poller.poll(5000), "never arrived"
    transport.resume_reading()


def test_a_short_reply_and_the_fin_behind_it_are_delivered_together() -> None:
    """The FIN that came with a reply is read at once: the protocol knows it during
    data_received (so the stack can send one segment with both), and eof_received
    follows in the same callback. The first read (the CONNECT answer) is not followed up."""
    async def body() -> None:
        async with pair(FinWatch) as (transport, protocol, peer):
            await _queued(transport, peer, b"answer")
            await until(lambda: "next callback" in protocol.calls)
            await _queued(transport, peer, b"reply", fin=True)
            await until(lambda: protocol.calls.count("next callback") == 2)
            assert protocol.calls == ["made", "data answer fin=False", "next callback",
                                      "data reply fin=True", "eof", "next callback"]
            assert not transport.is_reading()

    run(body())


def test_the_first_read_is_not_followed_up_even_with_a_fin_behind_it() -> None:
    async def body() -> None:
        async with pair(FinWatch) as (transport, protocol, peer):
            await _queued(transport, peer, b"answer", fin=True)
            await until(lambda: "eof" in protocol.calls)
            assert protocol.calls[:3] == ["made", "data answer fin=False", "next callback"]
            assert protocol.calls.count("eof") == 1

    run(body())


def test_a_follow_up_that_finds_nothing_ends_the_follow_ups() -> None:
    """A long-lived connection (request, reply, request, ...) pays for one empty recv()
    at most: once a follow-up found nothing, a later FIN is read on its own wake-up."""
    async def body() -> None:
        async with pair(FinWatch) as (transport, protocol, peer):
            await _queued(transport, peer, b"answer")
            await until(lambda: protocol.calls.count("next callback") == 1)
            await _queued(transport, peer, b"reply1")  # followed up: nothing behind it
            await until(lambda: protocol.calls.count("next callback") == 2)
            await _queued(transport, peer, b"reply2", fin=True)
            await until(lambda: "eof" in protocol.calls)
            assert protocol.calls[3:] == ["data reply1 fin=False", "next callback",
                                          "data reply2 fin=False", "next callback", "eof"]

    run(body())


def test_a_long_read_is_not_followed_up() -> None:
    """Reads of FIN_PROBE_BELOW or more are a stream's: no extra recv() for them."""
    big = b"b" * transport_module.FIN_PROBE_BELOW

    async def body() -> None:
        async with pair(FinWatch) as (transport, protocol, peer):
            await _queued(transport, peer, b"answer")
            await until(lambda: protocol.calls.count("next callback") == 1)
            await _queued(transport, peer, big, fin=True)
            await until(lambda: "eof" in protocol.calls)
            assert protocol.calls[3:] == ["data bbbbbbbb fin=False", "next callback", "eof"]
            assert bytes(protocol.data[6:]) == big

    run(body())


# ---------------------------------------------------------------- memory


class KeepsTransport(Recorder):
    """Holds its transport, as TunnelProtocol does (its .transport)."""

    def __init__(self) -> None:
        super().__init__(keep_open_on_eof=False)
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport


async def _one_connection(close_first: bool) -> weakref.ref:
    """One transport's whole life, closed by us or by the peer; a weak reference to its
    protocol, which holds the transport as TunnelProtocol does."""
    async with pair(KeepsTransport) as (transport, protocol, peer):
        gone = weakref.ref(protocol)
        if close_first:
            transport.close()
        else:
            peer.shutdown(socket.SHUT_WR)
        await protocol.lost
        await asyncio.sleep(0)
    del transport, protocol
    return gone


@pytest.mark.parametrize("close_first", [True, False], ids=["we close", "the peer closes"])
@pytest.mark.usefixtures("collector_off")
def test_a_finished_connection_is_freed_without_the_cycle_collector(close_first: bool) -> None:
    """The protocol holds its transport: if the transport kept holding the protocol after
    connection_lost(), every proxy connection (its flow and TCP state, behind the
    protocol) would wait for the cyclic collector, in whose older generations the
    engine's flows, alive through its young collections, piled up (RSS 40 -> 260 MiB
    over 200,000 connections in the bench lab)."""
    async def body() -> None:
        await _one_connection(close_first)  # warm: asyncio's first-use allocations
        gone = await _one_connection(close_first)
        assert gone() is None, "the protocol is only freed by the cyclic collector"

    run(body())


def test_finished_connections_leave_no_memory_behind() -> None:
    """Compiled, this class did not free BaseTransport's `_extra` slot: the dict that
    super().__init__() put there, 64 bytes lost per proxy connection."""
    async def body() -> None:
        for _ in range(50):
            await _one_connection(True)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(1000):
                await _one_connection(True)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        ours = [tracemalloc.Filter(True, transport_module.__file__),
                tracemalloc.Filter(True, asyncio.transports.__file__)]
        grown = sum(s.size_diff for s in after.filter_traces(ours).compare_to(
            before.filter_traces(ours), "filename"))
        assert grown < 1000 * 8, f"{grown} bytes kept by 1,000 finished connections"

    run(body())
