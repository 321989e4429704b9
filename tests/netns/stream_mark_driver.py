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
        return {"marked": marked, "held": held, "arrived": arrived,
                "waited": loop.time() - sent_at, "after_resume": loop.time() - resumed_at,
                "mark_after": mark(transport), "intact": bytes(sink.data[-4:]) == b"tail"}
    finally:
        transport.abort()
        peer.close()


async def main() -> None:
    print(json.dumps({
        "held_then_read": await scenario(0.3, pause=False),
        "default_hold": await scenario(transport_module.STREAM_HOLD, pause=False),
        "paused_past_the_hold": await scenario(0.1, pause=True),
    }))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
