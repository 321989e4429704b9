"""Run inside a namespace whose loopback has a 1,500-byte MTU (on the host's 64 KiB one
the kernel wakes a reader for any tail, see tcp_epollin_ready): SocketTransport against a
real TCP peer while SO_RCVLOWAT is up. Prints one JSON object of measurements."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

from proxyvpn.relay import transport as transport_module
from proxyvpn.relay.transport import SocketTransport


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return True


def mark(transport: SocketTransport) -> int:
    return transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def until(predicate, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def scenario(hold: float, pause: bool) -> dict:
    """Stream until the mark is up, then send a 4-byte tail: how long until all is read."""
    transport_module.STREAM_HOLD = hold
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    peer.setblocking(False)
    sink = Sink()
    transport = SocketTransport(loop, ours, sink)
    sent = 0
    try:
        while mark(transport) != transport.read_size and sent < 256 << 20:
            await loop.sock_sendall(peer, b"s" * (4 << 20))
            sent += 4 << 20
            await asyncio.sleep(0.001)
        marked = mark(transport)
        if pause:
            transport.pause_reading()
        # Right behind the stream: what is left of it plus the tail ends below the mark.
        await loop.sock_sendall(peer, b"tail")
        sent_at = loop.time()
        await asyncio.sleep(hold / 3)
        held = len(sink.data) < sent + 4
        resumed_at = sent_at
        if pause:
            await asyncio.sleep(hold)  # the hold runs out while nothing is read
            transport.resume_reading()
            resumed_at = loop.time()
        arrived = await until(lambda: len(sink.data) == sent + 4, 10)
        waited, after_resume = loop.time() - sent_at, loop.time() - resumed_at
        # What the hold released may still have been a stream's worth (the mark comes
        # down, not off): with nothing more, the next hold drops it.
        dropped = await until(lambda: mark(transport) == 1, 3 * hold + 1)
        return {"marked": marked, "held": held, "arrived": arrived, "waited": waited,
                "after_resume": after_resume, "dropped": dropped,
                "intact": bytes(sink.data[-4:]) == b"tail"}
    finally:
        transport.abort()
        peer.close()


async def slower_stream(hold: float) -> dict:
    """Stream fast until the mark is up, then at 40 KB every 10 ms: a hold's worth (the
    hold is 50 ms) between STREAM_READ and the read size. How the mark follows."""
    transport_module.STREAM_HOLD = hold
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    peer.setblocking(False)
    sink = Sink()
    transport = SocketTransport(loop, ours, sink)
    sent = 0
    marks = []
    try:
        while mark(transport) != transport.read_size and sent < 256 << 20:
            await loop.sock_sendall(peer, b"s" * (4 << 20))
            sent += 4 << 20
            await asyncio.sleep(0.001)
        for _ in range(100):  # one second
            await loop.sock_sendall(peer, b"w" * 40_000)
            sent += 40_000
            await asyncio.sleep(0.01)
            marks.append(mark(transport))
        arrived = await until(lambda: len(sink.data) == sent, 10)
        dropped = await until(lambda: mark(transport) == 1, 3 * hold + 1)
        later = marks[len(marks) // 4:]  # once it has settled
        return {"arrived": arrived, "dropped": dropped,
                "lowered": any(1 < m < transport.read_size for m in later),
                "up": sum(m > 1 for m in later) / len(later), "marks": sorted(set(marks))}
    finally:
        transport.abort()
        peer.close()


async def main() -> None:
    print(json.dumps({
        "held_then_read": await scenario(0.3, pause=False),
        "default_hold": await scenario(transport_module.STREAM_HOLD, pause=False),
        "paused_past_the_hold": await scenario(0.1, pause=True),
        "slower_stream": await slower_stream(0.05),
    }))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
