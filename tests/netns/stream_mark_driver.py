"""Run inside a namespace whose loopback has a 1,500-byte MTU (on the host's 64 KiB one
the kernel wakes a reader for any tail, see tcp_epollin_ready): SocketTransport against a
real TCP peer while SO_RCVLOWAT is up (tests/unit/transport_pair.py: the same pair as
the unit tests). Prints one JSON object of measurements."""

from __future__ import annotations

import asyncio
import json
import sys

from transport_pair import pair, read_mark, stream_until_marked, until

from proxyvpn.relay import transport as transport_module

DEFAULT_HOLD = transport_module.STREAM_HOLD  # before the scenarios set their own


async def scenario(hold: float, pause: bool) -> dict:
    """Stream until the mark is up, then send a 4-byte tail: how long until all is read."""
    transport_module.STREAM_HOLD = hold
    loop = asyncio.get_running_loop()
    async with pair() as (transport, sink, peer):
        sent = await stream_until_marked(transport, peer)
        marked = read_mark(transport)
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
        await until(lambda: len(sink.data) == sent + 4, timeout=10)  # raises if it never does
        return {"marked": marked, "held": held, "arrived": True,
                "waited": loop.time() - sent_at, "after_resume": loop.time() - resumed_at,
                "mark_after": read_mark(transport), "intact": bytes(sink.data[-4:]) == b"tail"}


async def main() -> None:
    print(json.dumps({
        "held_then_read": await scenario(0.3, pause=False),
        "default_hold": await scenario(DEFAULT_HOLD, pause=False),
        "paused_past_the_hold": await scenario(0.1, pause=True),
    }))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
