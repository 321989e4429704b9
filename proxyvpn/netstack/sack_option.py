"""The SACK option of an ACK from the app: the one TCP option parse() does not return.

parse() (C and Python alike) stays the per-packet fast path and reports only what
every segment needs; the SACK blocks matter only on ACKs of data we have in flight,
so the engine asks for them here, after parse() has validated the packet. Most such
ACKs carry no SACK option, which the header length alone shows, before any option
is read.
"""

from __future__ import annotations

import struct

from proxyvpn.netstack.wire import _IPV6_EXT_SKIP, VNET_HDR_LEN

__all__ = ["sack_edges"]

_SACK = 5  # RFC 2018 §3
_TS_SPACE = 12  # NOP NOP Timestamps: what an ACK's options hold without SACK
_EDGES = tuple(struct.Struct(f"!{n}I") for n in range(9))  # by the number of edges


def sack_edges(
    packet: bytes, payload_start: int, vnet: bool, timestamps: bool
) -> tuple[int, ...] | None:
    """The edges of the SACK option of ``packet`` (32-bit wire values, left and right in
    pairs; ``()`` without one), or None when the option is malformed (RFC 2018 §3: a
    length of 2 + 8n, 1 <= n <= 4).

    ``packet`` must be one that parse() accepted, ``payload_start`` what it returned;
    ``timestamps``: it had a Timestamps option (so the options need 12 more bytes to
    hold anything else).
    """
    ip = VNET_HDR_LEN if vnet else 0
    if packet[ip] >> 4 == 4:
        tcp = ip + (packet[ip] & 0x0F) * 4
    else:
        tcp = ip + 40
        nxt = packet[ip + 6]
        while nxt in _IPV6_EXT_SKIP:  # the extension headers parse() walks
            nxt = packet[tcp]
            tcp += (packet[tcp + 1] + 1) * 8
    end = payload_start
    if end - tcp <= 20 + (_TS_SPACE if timestamps else 0):
        return ()
    # parse() has checked every option's length against the header; the walk relies on
    # that only so far as never to loop or read past the options.
    i = tcp + 20
    while i + 1 < end and packet[i]:  # kind 0: End of Option List
        if packet[i] == 1:  # No-Operation
            i += 1
        elif packet[i] == _SACK:
            olen = packet[i + 1]
            if olen < 10 or (olen - 2) % 8 or i + olen > end:
                return None
            return _EDGES[(olen - 2) // 4].unpack_from(packet, i + 2)
        else:
            i += max(packet[i + 1], 2)
    return ()
