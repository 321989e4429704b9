"""sack_edges(): the SACK option of an ACK, read after parse() has accepted the packet.

Packets come from dpkt (an independent encoder) and from build() (what the app's
kernel sends looks like what we send: NOP NOP Timestamps, NOP NOP SACK)."""

from __future__ import annotations

import struct

import pytest
from test_wire import ACK, V4_DST, V4_SRC, V6_DST, V6_SRC, dpkt_tcp, ext_hdr, v4, v6

from proxyvpn.netstack import wire
from proxyvpn.netstack.sack_option import sack_edges

TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9)


def sack_opt(*edges: int, length: int | None = None) -> bytes:
    """NOP NOP SACK with these edges; ``length``: a wrong length byte to write instead."""
    n = 2 + 4 * len(edges) if length is None else length
    return bytes((1, 1, 5, n)) + struct.pack(f"!{len(edges)}I", *edges)


def edges_of(packet: bytes, vnet: bool = False) -> tuple[int, ...] | None:
    parsed = wire.parse(packet, vnet=vnet)
    assert isinstance(parsed, tuple), f"parse() dropped the packet: {parsed}"
    return sack_edges(packet, parsed[9], vnet, parsed[14] >= 0)


EDGES = (100, 200, 0xFFFFFF00, 5)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("family", [4, 6])
def test_blocks_beside_timestamps_as_build_writes_them(family: int, n: int) -> None:
    src, dst = (V4_SRC, V4_DST) if family == 4 else (V6_SRC, V6_DST)
    edges = (EDGES * 2)[: 2 * n]
    assert edges_of(wire.build(family, src, dst, 1, 2, 3, 4, ACK, 5, tsval=6, tsecr=7,
                               sack=edges)) == edges


def test_four_blocks_without_timestamps_and_with_a_vnet_header() -> None:
    edges = (1, 2, 3, 4, 5, 6, 7, 8)
    packet = wire.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, sack=edges, gso_size=0)
    assert edges_of(packet, vnet=True) == edges


@pytest.mark.parametrize(
    "opts",
    [
        b"",  # no options at all
        TS,  # timestamps only: the header length says so without reading
        b"\x01\x01\x04\x02" + TS,  # longer than timestamps, but no SACK among them
        b"\x00\x00\x00\x00" + sack_opt(1, 2)[:-4] + b"\x00\x00\x00\x00",  # after EOL: none
    ],
)
def test_no_sack_option_gives_no_edges(opts: bytes) -> None:
    assert edges_of(v4(dpkt_tcp(flags=ACK, opts=opts))) == ()


def test_sack_before_timestamps_and_behind_an_ipv6_extension_header() -> None:
    opts = sack_opt(10, 20) + TS
    packet = v6(dpkt_tcp(flags=ACK, opts=opts), ext=ext_hdr(6, 1), nxt=0)
    assert edges_of(packet) == (10, 20)


def test_ipv4_options_move_the_tcp_header() -> None:
    packet = v4(dpkt_tcp(flags=ACK, opts=TS + sack_opt(10, 20)), hl=6,
                opts=b"\x01\x01\x01\x00")
    assert edges_of(packet) == (10, 20)


@pytest.mark.parametrize(
    "opts",
    [
        sack_opt(1, 2, length=11) + b"\x01",  # not 2 + 8n
        sack_opt(1, 2, length=6) + b"\x01\x01\x01\x01",  # half a block
        sack_opt(length=2),  # no block at all
    ],
)
def test_a_malformed_sack_option_is_none(opts: bytes) -> None:
    packet = v4(dpkt_tcp(flags=ACK, opts=opts + bytes(-len(opts) % 4)))
    assert edges_of(packet) is None
