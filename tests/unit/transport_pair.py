"""One SocketTransport on a real loopback TCP connection, and helpers around its read
mark: shared by test_transport.py and tests/netns/stream_mark_driver.py (which runs the
same pair where the kernel really holds a tail below the mark)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxyvpn.relay.transport import SocketTransport


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open_on_eof: bool = True) -> None:
        self.keep_open_on_eof = keep_open_on_eof
        self.data = bytearray()
        self.calls: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.got_data = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.set_result(exc)


@asynccontextmanager
async def pair(protocol_factory=Recorder) -> AsyncIterator[tuple[SocketTransport, Recorder, socket.socket]]:
    """Our transport on one end of a loopback TCP connection, a blocking-free peer socket on the other."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    peer.setblocking(False)
    protocol = protocol_factory()
    transport = SocketTransport(asyncio.get_running_loop(), ours, protocol)
    try:
        yield transport, protocol, peer
    finally:
        transport.abort()
        peer.close()


def read_mark(transport: SocketTransport) -> int:
    return transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def stream_until_marked(transport: SocketTransport, peer: socket.socket) -> int:
    """Send bulk until the transport has made a streaming-sized read; bytes sent."""
    loop = asyncio.get_running_loop()
    sent = 0
    while read_mark(transport) != transport.read_size:
        assert sent < 256 << 20, "the mark never went up"
        await loop.sock_sendall(peer, b"s" * (4 << 20))
        sent += 4 << 20
        await asyncio.sleep(0.001)
    return sent
