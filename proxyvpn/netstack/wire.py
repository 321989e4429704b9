"""Per-packet wire format: the pure-Python reference twin of the C fast path.

Every public name here exists with the same signature, the same results and the same
exception types in the C module ``proxyvpn._fastpath`` (``native/fastpath.c``);
``tests/unit/test_fastpath_agree.py`` proves they agree byte for byte. Import the
selected implementation from :mod:`proxyvpn.netstack.fast`, not from here.

Parsing is the trust boundary (design rule 7): :func:`parse` turns untrusted bytes from
the TUN device into a validated tuple or a drop-reason code, never an exception.

parse() checks, in this order (the first failing check decides the code):

1. empty buffer -> TRUNCATED; version nibble not 4 or 6 -> BAD_VERSION.
2. IPv4 (RFC 791): buffer < 20 -> TRUNCATED; IHL < 5 -> BAD_IP_HEADER; buffer < IHL*4
   -> TRUNCATED; total length < IHL*4 or > buffer -> BAD_IP_HEADER; header checksum
   (if verifying) -> BAD_IP_CHECKSUM; MF set or offset != 0 -> FRAGMENT; protocol != 6
   -> NOT_TCP; bad source/destination -> BAD_ADDRESS.
   IPv6 (RFC 8200): buffer < 40 -> TRUNCATED; 40 + payload length > buffer ->
   BAD_IP_HEADER; walk hop-by-hop (0), routing (43), destination options (60); an
   extension header running past the payload -> BAD_IP_HEADER; fragment header (44)
   -> FRAGMENT; anything else but TCP (6) -> NOT_TCP; bad address -> BAD_ADDRESS.
3. TCP (RFC 9293 §3.1): fewer than 20 bytes of IP payload -> TRUNCATED; data offset
   < 5 or past the IP payload -> BAD_TCP_HEADER; checksum over pseudo-header + segment
   (if verifying) -> BAD_TCP_CHECKSUM; malformed options -> BAD_OPTIONS.

Bytes after the IPv4 total length / IPv6 payload length are ignored (RFC 791 §3.1:
the total length, not the link, delimits the datagram).
"""

from __future__ import annotations

import errno as _errno
import operator
import os
import struct
from collections.abc import Iterable

__all__ = [
    "ACK",
    "CWR",
    "DROP_BAD_ADDRESS",
    "DROP_BAD_IP_CHECKSUM",
    "DROP_BAD_IP_HEADER",
    "DROP_BAD_OPTIONS",
    "DROP_BAD_TCP_CHECKSUM",
    "DROP_BAD_TCP_HEADER",
    "DROP_BAD_VERSION",
    "DROP_FRAGMENT",
    "DROP_NOT_TCP",
    "DROP_REASONS",
    "DROP_TRUNCATED",
    "ECE",
    "FIN",
    "PSH",
    "READ_BATCH_MAX_BYTES",
    "VNET_HDR_LEN",
    "RST",
    "SYN",
    "URG",
    "build",
    "build_many",
    "checksum",
    "parse",
    "read_batch",
    "write_batch",
]

# TCP header flag bits (RFC 9293 §3.1; ECE/CWR from RFC 3168 §6.1).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

# Drop reasons returned by parse(); 0 is never returned (it would read as "ok").
DROP_TRUNCATED = 1
DROP_BAD_VERSION = 2
DROP_BAD_IP_HEADER = 3
DROP_FRAGMENT = 4
DROP_NOT_TCP = 5
DROP_BAD_IP_CHECKSUM = 6
DROP_BAD_TCP_HEADER = 7
DROP_BAD_TCP_CHECKSUM = 8
DROP_BAD_OPTIONS = 9
DROP_BAD_ADDRESS = 10

#: code -> name, for logs and counters; index 0 is unused ("ok").
DROP_REASONS: tuple[str, ...] = (
    "ok",
    "truncated",
    "bad_version",
    "bad_ip_header",
    "fragment",
    "not_tcp",
    "bad_ip_checksum",
    "bad_tcp_header",
    "bad_tcp_checksum",
    "bad_options",
    "bad_address",
)

#: read_batch() refuses max_packets * bufsize above this (it is one allocation in C).
READ_BATCH_MAX_BYTES = 64 * 1024 * 1024

VNET_HDR_LEN = 10
"""sizeof(struct virtio_net_hdr): the prefix of every packet on an IFF_VNET_HDR TUN."""
_VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
_VNET_F_NEEDS_CSUM = 1
_VNET_F_DATA_VALID = 2
_VNET_GSO_TCPV4 = 1
_VNET_GSO_TCPV6 = 4

_PROTO_TCP = 6
_IPV6_EXT_SKIP = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_TTL = 64
_IPV4_DF = 0x4000
_MAX_IP_LEN = 0xFFFF
BIG_IP_LEN_MAX = 524_280
"""Longest GSO packet build() makes, headers included: the kernel's GSO_MAX_SIZE
(8 * 65535). Past its 16-bit length field (BIG TCP) an IPv4 packet's length field is 0
and the skb's length counts (Linux 6.3+); an IPv6 one's is 0 too and a Hop-by-Hop header
with a Jumbo Payload option (RFC 2675) holds the length, as the kernel's own GRO built
them until Linux 7.0."""
_JUMBO_HBH_LEN = 8  # next header, length 0, option 0xC2, length 4, 32-bit length
_IPV6_TLV_JUMBO = 0xC2
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

_V4_ZERO = b"\x00" * 4
_V4_BCAST = b"\xff" * 4
_V6_ZERO = b"\x00" * 16

_TCP_HDR = struct.Struct("!HHIIBBHHH")
_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HDR = struct.Struct("!IHBB16s16s")
_JUMBO_HBH = struct.Struct("!BBBBI")  # next header, length 0, option 0xC2, 4, the length
_TS_VALUES = struct.Struct("!II")
_MAX_OPTIONS = 40
"""RFC 9293 §3.1: the data offset leaves at most 40 bytes for options."""
_MAX_SACK_BLOCKS = 4

ParseResult = tuple[
    int, bytes, bytes, int, int, int, int, int, int, int, int, int, int, bool, int, int
]


# --------------------------------------------------------------------------- helpers


def _view(obj: object) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (like PyBUF_SIMPLE in C)."""
    mv = memoryview(obj)  # type: ignore[arg-type]  # TypeError for non-buffers, as in C
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _int(value: object, lo: int, hi: int, name: str) -> int:
    """operator.index() plus a range check: TypeError for non-ints, ValueError outside."""
    v = operator.index(value)  # type: ignore[arg-type]
    if not lo <= v <= hi:
        raise ValueError(f"{name} out of range [{lo}, {hi}]: {v}")
    return v


def _fold(total: int) -> int:
    """Complemented one's-complement fold of a non-negative sum (RFC 1071 §2).

    Folding end-around carries preserves the value modulo 0xffff and never turns a
    non-zero sum into zero, so the folded sum is ``(total - 1) % 0xffff + 1`` for any
    non-zero total and 0 only for an all-zero input; complementing gives the checksum.
    """
    if total == 0:
        return 0xFFFF
    return 0xFFFF - ((total - 1) % 0xFFFF + 1)


def _sum_bytes(mv: memoryview | bytes) -> int:
    """A number congruent (mod 0xffff) to the 16-bit big-endian word sum of ``mv``.

    65536 == 1 (mod 65535), so the big-endian integer value of the data is congruent to
    the sum of its 16-bit words; one big-int conversion beats a Python loop by ~100x.
    It is zero exactly when every byte is zero, which keeps _fold()'s zero case exact.
    """
    total = int.from_bytes(mv, "big")
    if len(mv) & 1:
        total <<= 8  # RFC 1071 §4.1: an odd trailing byte is padded with a zero byte
    return total


def _pseudo_sum(src: bytes, dst: bytes, tcp_len: int) -> int:
    """A number congruent to the TCP pseudo-header word sum (RFC 9293 §3.1, RFC 8200 §8.1).

    Both layouts reduce to src + dst + protocol + upper-layer length, because the zero
    bytes contribute nothing; a length over 16 bits (a GSO packet, whose segments
    the kernel sums anew) adds as a 32-bit one, as in the kernel's csum_tcpudp_magic(). Like
    _sum_bytes() it is a congruent big int, for _fold(), not a valid checksum() initial.
    """
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + _PROTO_TCP + tcp_len


def _bad_v4(addr: bytes) -> bool:
    """Multicast (224/4, RFC 5771), limited broadcast, or unspecified (RFC 1122 §3.2.1.3)."""
    return (addr[0] & 0xF0) == 0xE0 or addr in (_V4_BCAST, _V4_ZERO)


def _bad_v6(addr: bytes) -> bool:
    """Multicast (ff00::/8, RFC 4291 §2.7) or unspecified (::, RFC 4291 §2.5.2)."""
    return addr[0] == 0xFF or addr == _V6_ZERO


# --------------------------------------------------------------------------- checksum


def checksum(data: object, initial: int = 0) -> int:
    """RFC 1071 internet checksum of ``data`` plus a partial sum ``initial``.

    ``initial`` is a non-negative word sum (e.g. of a pseudo-header), 0 <= initial < 2**64;
    it need not be folded. The result is already complemented: storing it in the
    checksum field makes the checksum of the whole come out 0.
    """
    mv = _view(data)
    init = operator.index(initial)  # type: ignore[call-overload]
    if not 0 <= init <= _U64:
        raise ValueError(f"initial out of range [0, 2**64): {init}")
    return _fold(_sum_bytes(mv) + init)


# --------------------------------------------------------------------------- parse


def parse(packet: object, verify_checksum: bool = True, vnet: bool = False) -> ParseResult | int:
    """Validate one raw IPv4/IPv6 TCP packet.

    Returns ``(family, src, dst, sport, dport, seq, ack, flags, window, payload_start,
    payload_end, mss, wscale, sack_permitted, tsval, tsecr)`` or a positive ``DROP_*``
    code. Never raises for any bytes; TypeError/BufferError only for a non-buffer
    argument. ``tsval`` is -1 (and ``tsecr`` 0) without a Timestamps option.

    ``vnet``: the packet starts with a virtio_net_hdr (IFF_VNET_HDR TUN); the offsets
    stay relative to the whole buffer. Its NEEDS_CSUM / DATA_VALID flags mean the local
    kernel vouches for the TCP checksum (it holds only the pseudo-header sum), so it is
    not verified.
    """
    buf = _view(packet)
    verify = bool(verify_checksum)
    if vnet:
        if len(buf) < VNET_HDR_LEN:
            return DROP_TRUNCATED
        if buf[0] & (_VNET_F_NEEDS_CSUM | _VNET_F_DATA_VALID):
            verify = False
        result = _parse_ip(buf[VNET_HDR_LEN:], verify)
        if isinstance(result, int):
            return result
        return (*result[:9], result[9] + VNET_HDR_LEN, result[10] + VNET_HDR_LEN,
                *result[11:])  # type: ignore[return-value]
    return _parse_ip(buf, verify)


def _parse_ip(buf: memoryview, verify: bool) -> ParseResult | int:
    """parse() of a bare IP packet."""
    n = len(buf)
    if n < 1:
        return DROP_TRUNCATED
    version = buf[0] >> 4
    if version == 4:
        if n < 20:
            return DROP_TRUNCATED
        ihl = buf[0] & 0x0F
        if ihl < 5:
            return DROP_BAD_IP_HEADER
        hlen = ihl * 4
        if n < hlen:
            return DROP_TRUNCATED
        end = (buf[2] << 8) | buf[3]
        if end < hlen or end > n:
            return DROP_BAD_IP_HEADER
        if verify and _fold(_sum_bytes(buf[:hlen])) != 0:
            return DROP_BAD_IP_CHECKSUM
        if ((buf[6] << 8) | buf[7]) & 0x3FFF:  # MF bit or fragment offset (RFC 791 §3.2)
            return DROP_FRAGMENT
        if buf[9] != _PROTO_TCP:
            return DROP_NOT_TCP
        src = bytes(buf[12:16])
        dst = bytes(buf[16:20])
        if _bad_v4(src) or _bad_v4(dst):
            return DROP_BAD_ADDRESS
        family = 4
        off = hlen
    elif version == 6:
        if n < 40:
            return DROP_TRUNCATED
        end = 40 + ((buf[4] << 8) | buf[5])
        if end > n:
            return DROP_BAD_IP_HEADER
        nxt = buf[6]
        off = 40
        # RFC 8200 §4: extension headers chain through Next Header; each of these three
        # has an 8-octet length unit excluding the first 8 octets.
        while nxt in _IPV6_EXT_SKIP:
            if off + 2 > end:
                return DROP_BAD_IP_HEADER
            ext_len = (buf[off + 1] + 1) * 8
            if off + ext_len > end:
                return DROP_BAD_IP_HEADER
            nxt = buf[off]
            off += ext_len
        if nxt == _IPV6_FRAGMENT:
            return DROP_FRAGMENT
        if nxt != _PROTO_TCP:
            return DROP_NOT_TCP
        src = bytes(buf[8:24])
        dst = bytes(buf[24:40])
        if _bad_v6(src) or _bad_v6(dst):
            return DROP_BAD_ADDRESS
        family = 6
    else:
        return DROP_BAD_VERSION

    tcp_len = end - off
    if tcp_len < 20:
        return DROP_TRUNCATED
    sport, dport, seq, ack, doff_byte, flags, window, _csum, _urg = _TCP_HDR.unpack_from(buf, off)
    thl = (doff_byte >> 4) * 4
    if thl < 20 or thl > tcp_len:
        return DROP_BAD_TCP_HEADER
    if verify and _fold(_sum_bytes(buf[off:end]) + _pseudo_sum(src, dst, tcp_len)) != 0:
        return DROP_BAD_TCP_CHECKSUM

    # Options (RFC 9293 §3.2): kinds 0 and 1 are single octets, every other kind has a
    # length octet counting kind and length. A later duplicate overrides an earlier one.
    mss = 0
    wscale = -1
    sack = False
    tsval = -1
    tsecr = 0
    i = off + 20
    oend = off + thl
    while i < oend:
        kind = buf[i]
        if kind == 0:  # End of Option List
            break
        if kind == 1:  # No-Operation
            i += 1
            continue
        if i + 1 >= oend:
            return DROP_BAD_OPTIONS
        olen = buf[i + 1]
        if olen < 2 or i + olen > oend:
            return DROP_BAD_OPTIONS
        if kind == 2:  # MSS, RFC 9293 §3.7.1
            if olen != 4:
                return DROP_BAD_OPTIONS
            mss = (buf[i + 2] << 8) | buf[i + 3]
        elif kind == 3:  # Window Scale, RFC 7323 §2.2
            if olen != 3:
                return DROP_BAD_OPTIONS
            wscale = buf[i + 2]
        elif kind == 4:  # SACK-Permitted, RFC 2018 §2
            if olen != 2:
                return DROP_BAD_OPTIONS
            sack = True
        elif kind == 8:  # Timestamps, RFC 7323 §3.2
            if olen != 10:
                return DROP_BAD_OPTIONS
            tsval, tsecr = _TS_VALUES.unpack_from(buf, i + 2)
        i += olen

    return (
        family,
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        off + thl,
        end,
        mss,
        wscale,
        sack,
        tsval,
        tsecr,
    )


# --------------------------------------------------------------------------- build


def _addresses(family: object, src: object, dst: object) -> tuple[int, bytes, bytes]:
    """Validate family and the two packed addresses (in that order, as the C code does)."""
    fam = _int(family, -(2**63), 2**63 - 1, "family")
    if fam not in (4, 6):
        raise ValueError(f"family must be 4 or 6: {fam}")
    alen = 4 if fam == 4 else 16
    s = _view(src)
    if len(s) != alen:
        raise ValueError(f"src must be {alen} bytes for IPv{fam}")
    d = _view(dst)
    if len(d) != alen:
        raise ValueError(f"dst must be {alen} bytes for IPv{fam}")
    return fam, bytes(s), bytes(d)


def _tcp_options(mss: int, wscale: int, sack: bool, tsval: int, tsecr: int,
                 blocks: tuple[int, ...] = ()) -> bytes:
    """TCP option bytes for build(), in this exact order and layout.

    Each group is 4-byte aligned, so the options never need trailing padding: MSS
    ``02 04 hi lo`` (if mss > 0), SACK-permitted ``01 01 04 02`` (NOP NOP kind 4, if
    sack_permitted), Timestamps ``01 01 08 0a tsval tsecr`` (NOP NOP kind 8, if
    tsval >= 0; RFC 7323 Appendix A's layout), SACK ``01 01 05 len`` and the blocks'
    edges (NOP NOP kind 5, RFC 2018 §3, if any), window scale ``01 03 03 shift`` (NOP
    kind 3, if wscale >= 0).
    """
    opts = b""
    if mss > 0:
        opts += bytes((2, 4, mss >> 8, mss & 0xFF))
    if sack:
        opts += b"\x01\x01\x04\x02"
    if tsval >= 0:
        opts += b"\x01\x01\x08\x0a" + _TS_VALUES.pack(tsval, tsecr)
    if blocks:
        opts += bytes((1, 1, 5, 2 + 4 * len(blocks))) + struct.pack(f"!{len(blocks)}I", *blocks)
    if wscale >= 0:
        opts += bytes((1, 3, 3, wscale))
    if len(opts) > _MAX_OPTIONS:
        raise ValueError("TCP options longer than 40 bytes")
    return opts


def _sack_blocks(sack: object) -> tuple[int, ...]:
    """Validate build()'s ``sack``: a tuple of 32-bit block edges, left and right in
    pairs, at most four blocks (RFC 2018 §3: what 40 bytes of options can hold)."""
    if type(sack) is not tuple:
        raise TypeError(f"sack must be a tuple, not {type(sack).__name__}")
    if len(sack) % 2 or len(sack) > 2 * _MAX_SACK_BLOCKS:
        raise ValueError("sack must hold 0 to 4 (left, right) pairs")
    for edge in sack:
        _int(edge, 0, _U32, "sack edge")
    return sack


def _max_tcp_len(family: int) -> int:
    """Largest TCP segment (header + payload) the IP length field can describe."""
    return _MAX_IP_LEN - 20 if family == 4 else _MAX_IP_LEN


def _emit(
    family: int,
    src: bytes,
    dst: bytes,
    ports: bytes,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    opts: bytes,
    payload: memoryview,
    gso_size: int = -1,
) -> bytes:
    """Assemble one validated packet with both checksums filled in (the TCP one partial,
    after a virtio_net_hdr, when gso_size >= 0)."""
    thl = 20 + len(opts)
    tcp_len = thl + len(payload)
    jumbo = family == 6 and tcp_len > _MAX_IP_LEN  # only a GSO packet gets here
    ip_hlen = 20 if family == 4 else 40 + (_JUMBO_HBH_LEN if jumbo else 0)
    pkt = bytearray(ip_hlen + tcp_len)
    if family == 4:
        total = ip_hlen + tcp_len
        _IPV4_HDR.pack_into(pkt, 0, 0x45, 0, total if total <= _MAX_IP_LEN else 0, 0,
                            _IPV4_DF, _TTL, 6, 0, src, dst)
        pkt[10:12] = _fold(_sum_bytes(memoryview(pkt)[:20])).to_bytes(2, "big")
    elif jumbo:  # next header 0: the Hop-by-Hop header, its option at 4n+2 (RFC 2675 §2)
        _IPV6_HDR.pack_into(pkt, 0, 6 << 28, 0, 0, _TTL, src, dst)
        _JUMBO_HBH.pack_into(pkt, 40, _PROTO_TCP, 0, _IPV6_TLV_JUMBO, 4, _JUMBO_HBH_LEN + tcp_len)
    else:
        _IPV6_HDR.pack_into(pkt, 0, 6 << 28, tcp_len, _PROTO_TCP, _TTL, src, dst)
    pkt[ip_hlen : ip_hlen + 4] = ports
    struct.pack_into("!IIBBH", pkt, ip_hlen + 4, seq, ack, (thl // 4) << 4, flags, window)
    pkt[ip_hlen + 20 : ip_hlen + thl] = opts
    pkt[ip_hlen + thl :] = payload
    if gso_size >= 0:
        # Partial checksum (CHECKSUM_PARTIAL): the folded pseudo-header sum, which is
        # never 0 (the protocol number is in it), hence 0xFFFF minus its complement.
        partial = 0xFFFF - _fold(_pseudo_sum(src, dst, tcp_len))
        pkt[ip_hlen + 16 : ip_hlen + 18] = partial.to_bytes(2, "big")
        gso = 0 < gso_size < len(payload)
        gso_type = (_VNET_GSO_TCPV4 if family == 4 else _VNET_GSO_TCPV6) if gso else 0
        return _VNET_HDR.pack(_VNET_F_NEEDS_CSUM, gso_type, ip_hlen + thl,
                              gso_size if gso else 0, ip_hlen, 16) + pkt
    csum = _fold(_sum_bytes(memoryview(pkt)[ip_hlen:]) + _pseudo_sum(src, dst, tcp_len))
    pkt[ip_hlen + 16 : ip_hlen + 18] = csum.to_bytes(2, "big")
    return bytes(pkt)


def build(
    family: int,
    src: object,
    dst: object,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: object = b"",
    mss: int = 0,
    wscale: int = -1,
    sack_permitted: bool = False,
    tsval: int = -1,
    tsecr: int = 0,
    sack: tuple[int, ...] = (),
    gso_size: int = -1,
    split: bool = False,
) -> bytes | tuple[bytes, object]:
    """One complete IP+TCP packet with correct checksums.

    IPv4: IHL 5, TOS 0, ID 0, DF, TTL 64. IPv6: class 0, flow label 0, hop limit 64.
    Options as in _tcp_options(); urgent pointer 0. ValueError for out-of-range
    fields (wscale must be -1..14, RFC 7323 §2.3; tsval -1 means no Timestamps
    option; ``sack``: the SACK blocks' edges as 32-bit wire values, (left, right)
    pairs, at most four, and all options together at most 40 bytes), TypeError for
    wrong types.

    ``gso_size >= 0``: for an IFF_VNET_HDR TUN. The packet gets a virtio_net_hdr
    prefix and a partial TCP checksum (NEEDS_CSUM: the kernel takes CHECKSUM_PARTIAL
    as verified for local delivery and completes it if the packet is forwarded), and a
    payload longer than ``gso_size`` (> 0, the app's MSS) is marked TCP GSO. A GSO
    packet may be up to BIG_IP_LEN_MAX bytes long: past the 16-bit length field its
    length field is 0, and an IPv6 one carries a Hop-by-Hop Jumbo Payload option.

    ``split`` (with ``gso_size >= 0`` and a payload, where the checksum is partial and
    never reads the payload): ``(headers, payload)`` -- the payload object itself,
    not copied -- for :func:`write_batch` to send with one writev().
    """
    fam, s, d = _addresses(family, src, dst)
    sp = _int(sport, 0, 0xFFFF, "sport")
    dp = _int(dport, 0, 0xFFFF, "dport")
    sq = _int(seq, 0, _U32, "seq")
    ak = _int(ack, 0, _U32, "ack")
    fl = _int(flags, 0, 0xFF, "flags")
    win = _int(window, 0, 0xFFFF, "window")
    pl = _view(payload)
    ms = _int(mss, 0, 0xFFFF, "mss")
    ws = _int(wscale, -1, 14, "wscale")
    sackok = bool(sack_permitted)
    tsv = _int(tsval, -1, _U32, "tsval")
    tse = _int(tsecr, 0, _U32, "tsecr")
    blocks = _sack_blocks(sack)
    gso = _int(gso_size, -1, 0xFFFF, "gso_size")
    want_split = bool(split)  # here, where the C version evaluates it
    opts = _tcp_options(ms, ws, sackok, tsv, tse, blocks)
    # Only a GSO packet (longer than one gso_size segment) may pass the length field.
    big_room = BIG_IP_LEN_MAX - (20 if fam == 4 else 40 + _JUMBO_HBH_LEN)
    if 20 + len(opts) + len(pl) > (big_room if 0 < gso < len(pl) else _max_tcp_len(fam)):
        raise ValueError("payload too long for the IP length field")
    pkt = _emit(fam, s, d, struct.pack("!HH", sp, dp), sq, ak, fl, win, opts, pl, gso)
    if want_split and gso >= 0 and len(pl):
        return pkt[: len(pkt) - len(pl)], payload
    return pkt


def build_many(
    family: int,
    src: object,
    dst: object,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: object,
    mss: int,
) -> list[bytes]:
    """Split ``payload`` into ceil(len/mss) segments (one if empty), no TCP options.

    Sequence numbers advance by each segment's length (mod 2**32, RFC 9293 §3.4). PSH
    and FIN belong to the end of the data, so only the last segment carries them; the
    others get ``flags & ~(PSH|FIN)``. mss must be 1..65535 and the largest segment
    must fit the IP length field.
    """
    fam, s, d = _addresses(family, src, dst)
    sp = _int(sport, 0, 0xFFFF, "sport")
    dp = _int(dport, 0, 0xFFFF, "dport")
    sq = _int(seq, 0, _U32, "seq")
    ak = _int(ack, 0, _U32, "ack")
    fl = _int(flags, 0, 0xFF, "flags")
    win = _int(window, 0, 0xFFFF, "window")
    pl = _view(payload)
    ms = _int(mss, 1, 0xFFFF, "mss")
    total = len(pl)
    if 20 + min(ms, total) > _max_tcp_len(fam):
        raise ValueError("mss too large for the IP length field")
    ports = struct.pack("!HH", sp, dp)
    if total == 0:
        return [_emit(fam, s, d, ports, sq, ak, fl, win, b"", pl)]
    mid_flags = fl & ~(PSH | FIN)
    out = []
    for start in range(0, total, ms):
        chunk = pl[start : start + ms]
        last = start + ms >= total
        out.append(
            _emit(
                fam,
                s,
                d,
                ports,
                (sq + start) & _U32,
                ak,
                fl if last else mid_flags,
                win,
                b"",
                chunk,
            )
        )
    return out


# --------------------------------------------------------------------------- batch I/O


def strip_vnet(packet: bytes) -> bytes:
    """The bare IP packet behind a virtio_net_hdr, its NEEDS_CSUM checksum completed as
    the kernel would (RFC 1071 sum from csum_start, stored at csum_offset). For --pcap
    only, so it has no C twin."""
    if len(packet) < VNET_HDR_LEN:
        return packet
    flags, _, _, _, start, offset = _VNET_HDR.unpack_from(packet)
    ip = bytearray(packet[VNET_HDR_LEN:])
    if flags & _VNET_F_NEEDS_CSUM and start + offset + 2 <= len(ip):
        ip[start + offset : start + offset + 2] = checksum(ip[start:]).to_bytes(2, "big")
    return bytes(ip)


def _batch_args(fd: object, max_packets: object, bufsize: object) -> tuple[int, int, int]:
    """Validate read_batch arguments exactly as the C version does."""
    f = _int(fd, 0, 2**31 - 1, "fd")
    mp = _int(max_packets, 1, 2**31 - 1, "max_packets")
    bs = _int(bufsize, 1, 2**31 - 1, "bufsize")
    if mp * bs > READ_BATCH_MAX_BYTES:
        raise ValueError("max_packets * bufsize exceeds READ_BATCH_MAX_BYTES")
    return f, mp, bs


def read_batch(fd: int, max_packets: int, bufsize: int) -> list[bytes]:
    """Read up to ``max_packets`` packets (one read() each) from a non-blocking fd.

    EAGAIN ends the batch (possibly empty); so does a 0-byte read (EOF: a TUN never
    gives one, and looping on it would only fabricate empty packets). EINTR is retried
    (PEP 475). Any other error raises OSError, unless packets were already read: then
    they are returned and the next call meets the error again. A packet longer than
    ``bufsize`` is truncated by the kernel, so pass at least the MTU.
    """
    f, mp, bs = _batch_args(fd, max_packets, bufsize)
    out: list[bytes] = []
    while len(out) < mp:
        try:
            data = os.read(f, bs)
        except BlockingIOError:
            break
        except OSError:
            if out:
                break
            raise
        if not data:
            break
        out.append(data)
    return out


_WRITE_MAX_PARTS = 4
"""Most buffers in one gathered packet (headers + payload, with room to spare)."""


def write_batch(fd: int, packets: Iterable[object]) -> int:
    """Write each packet with one write() -- or one writev() for a tuple of buffers, the
    parts of one packet (``build(split=True)``); return how many were written.

    Buffers are gathered before any write, so a non-buffer item raises TypeError with
    nothing written. EAGAIN and ENOBUFS (a full TUN/socket queue: back-pressure, not
    failure) end the batch early. Other errors raise OSError carrying the count
    already written as ``packets_written``. Packet fds write all or nothing, so any
    non-negative return counts as one packet written.
    """
    f = _int(fd, 0, 2**31 - 1, "fd")
    items = list(packets)
    for p in items:  # every count first, every buffer next: the C twin's order
        if type(p) is tuple and not 1 <= len(p) <= _WRITE_MAX_PARTS:
            raise ValueError(f"a packet has 1..{_WRITE_MAX_PARTS} parts, got {len(p)}")
    views = [[_view(part) for part in p] if type(p) is tuple else _view(p) for p in items]
    written = 0
    for v in views:
        try:
            os.writev(f, v) if isinstance(v, list) else os.write(f, v)
        except OSError as exc:
            if exc.errno in (_errno.EAGAIN, _errno.ENOBUFS):
                break
            exc.packets_written = written  # type: ignore[attr-defined]
            raise
        written += 1
    return written
