"""Engine: one packet whose handling fails costs that packet only.

The engine reads a SOCK_SEQPACKET socket standing in for the TUN (one read, one packet);
parse() drops malformed input by itself, so the failure here is injected: a bug in the
stack must not take the rest of the batch, or the transmit after it, with it."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from proxyvpn.aio import engine as engine_module
from proxyvpn.config import Config
from proxyvpn.netstack import wire

SRC, DST = socket.inet_aton("10.0.0.2"), socket.inet_aton("10.9.9.9")


def _segment(sport: int, flags: int) -> bytes:
    return wire.build(4, SRC, DST, sport, 443, 1000, 5000, flags, 65535)


def test_a_failing_packet_is_counted_and_the_batch_goes_on(monkeypatch, caplog):
    async def body() -> None:
        ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        engine = engine_module.Engine(Config(proxy=None), SimpleNamespace(credentials=None),
                                      ours.fileno())
        real = engine._on_packet

        def on_packet(packet: bytes, now: float) -> None:
            if wire.parse(packet)[3] == 1111:
                raise RuntimeError("a bug in the stack")
            real(packet, now)

        monkeypatch.setattr(engine, "_on_packet", on_packet)
        for sport in (1111, 2222, 1111, 3333):  # ACKs of no flow: each gets a RST
            tun_side.send(_segment(sport, wire.ACK))
        engine._on_readable()
        tun_side.setblocking(False)
        resets = []
        while True:
            try:
                resets.append(wire.parse(tun_side.recv(65536)))
            except BlockingIOError:
                break
        assert sorted(r[4] for r in resets) == [2222, 3333]  # RSTs to the healthy ones
        assert all(r[7] & wire.RST for r in resets)
        assert engine.stats["packet_errors"] == 2
        ours.close()
        tun_side.close()

    with caplog.at_level("ERROR", logger="proxyvpn.aio"):
        asyncio.run(body())
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1, "logged once, then only counted"
