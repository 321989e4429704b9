"""Table-driven tests of the packet fast path, run against both implementations.

Packets under test are built with dpkt (an independent encoder), so a bug shared by
wire.py and fastpath.c cannot hide behind its own output. Every test runs for the
pure-Python reference and, when built, for the C extension.
"""

from __future__ import annotations

import array
import collections
import errno
import importlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from types import ModuleType

import dpkt
import pytest

import proxyvpn
from proxyvpn.netstack import wire

try:
    from proxyvpn import _fastpath
except ImportError:  # pragma: no cover - CI builds the extension
    _fastpath = None

IMPLS = [
    pytest.param(wire, id="python"),
    pytest.param(
        _fastpath,
        id="c",
        marks=pytest.mark.skipif(
            _fastpath is None,
            reason="C extension proxyvpn._fastpath not built (python setup.py build_ext --inplace)",
        ),
    ),
]


@pytest.fixture(params=IMPLS)
def m(request: pytest.FixtureRequest) -> ModuleType:
    """The implementation under test (wire or _fastpath)."""
    return request.param


V4_SRC = bytes([10, 7, 0, 2])
V4_DST = bytes([93, 184, 216, 34])
V6_SRC = bytes.fromhex("fd000000000000000000000000000002")
V6_DST = bytes.fromhex("2606280002200001024818931c5c3e2f")

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


# ----------------------------------------------------------------- dpkt builders


def dpkt_tcp(
    sport: int = 40000,
    dport: int = 443,
    seq: int = 1000,
    ack: int = 0,
    flags: int = SYN,
    win: int = 64240,
    opts: bytes = b"",
    data: bytes = b"",
) -> dpkt.tcp.TCP:
    """A dpkt TCP segment; the data offset follows the (4-byte padded) options."""
    assert len(opts) % 4 == 0
    return dpkt.tcp.TCP(
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        win=win,
        off=5 + len(opts) // 4,
        opts=opts,
        data=data,
    )


def v4(tcp: dpkt.tcp.TCP | bytes, src: bytes = V4_SRC, dst: bytes = V4_DST, **kw: object) -> bytes:
    """IPv4 packet around ``tcp``; dpkt fills length and both checksums (sum=0)."""
    ip = dpkt.ip.IP(src=src, dst=dst, p=kw.pop("p", 6), ttl=64, data=tcp, **kw)
    return bytes(ip)


def v6(
    tcp: dpkt.tcp.TCP | bytes,
    src: bytes = V6_SRC,
    dst: bytes = V6_DST,
    ext: bytes = b"",
    nxt: int = 6,
) -> bytes:
    """IPv6 packet; ``ext`` is raw extension-header bytes and ``nxt`` the first type.

    The TCP checksum is computed by dpkt's helpers over the RFC 8200 §8.1 pseudo-header.
    """
    if isinstance(tcp, dpkt.tcp.TCP):
        tcp.sum = 0
        seg = bytes(tcp)
        s = dpkt.in_cksum_add(0, struct.pack(">16s16sxBH", src, dst, 6, len(seg)))
        tcp.sum = dpkt.in_cksum_done(dpkt.in_cksum_add(s, seg))
    body = ext + bytes(tcp)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(body), nxt, 64, src, dst)
    return hdr + body


def ext_hdr(nxt: int, length_units: int = 0) -> bytes:
    """A hop-by-hop/routing/dest-options header: 8*(units+1) bytes, PadN-filled."""
    size = 8 * (length_units + 1)
    return bytes([nxt, length_units, 1, size - 4]) + bytes(size - 4)


def fix_ip_sum(pkt: bytes) -> bytes:
    """Recompute the IPv4 header checksum of a hand-mutated packet (dpkt.in_cksum)."""
    b = bytearray(pkt)
    hlen = (b[0] & 0x0F) * 4
    b[10:12] = b"\x00\x00"
    b[10:12] = struct.pack("!H", dpkt.in_cksum(bytes(b[:hlen])))
    return bytes(b)


def fix_tcp_sum(pkt: bytes, tcp_off: int) -> bytes:
    """Recompute the TCP checksum of a hand-mutated packet (dpkt's one's-complement)."""
    b = bytearray(pkt)
    if b[0] >> 4 == 4:
        end = struct.unpack_from("!H", b, 2)[0]
        src, dst, fmt = bytes(b[12:16]), bytes(b[16:20]), ">4s4sxBH"
    else:
        end = 40 + struct.unpack_from("!H", b, 4)[0]
        src, dst, fmt = bytes(b[8:24]), bytes(b[24:40]), ">16s16sxBH"
    b[tcp_off + 16 : tcp_off + 18] = b"\x00\x00"
    seg = bytes(b[tcp_off:end])
    s = dpkt.in_cksum_add(0, struct.pack(fmt, src, dst, 6, len(seg)))
    b[tcp_off + 16 : tcp_off + 18] = struct.pack(
        "!H", dpkt.in_cksum_done(dpkt.in_cksum_add(s, seg))
    )
    return bytes(b)


def mutate(pkt: bytes, offset: int, value: bytes) -> bytes:
    """Replace bytes at ``offset``."""
    return pkt[:offset] + value + pkt[offset + len(value) :]


SYN_OPTS = bytes.fromhex("020405b40402080a000000010000000001030307")


# ----------------------------------------------------------------- constants


def test_constants(m: ModuleType) -> None:
    assert (m.FIN, m.SYN, m.RST, m.PSH, m.ACK, m.URG, m.ECE, m.CWR) == (
        FIN,
        SYN,
        RST,
        PSH,
        ACK,
        URG,
        ECE,
        CWR,
    )
    assert m.DROP_REASONS[0] == "ok"
    codes = {
        name: getattr(m, "DROP_" + name.upper()) for name in m.DROP_REASONS[1:]
    }  # every reason has a constant whose value indexes back to its name
    assert sorted(codes.values()) == list(range(1, len(m.DROP_REASONS)))
    for name, code in codes.items():
        assert m.DROP_REASONS[code] == name
    assert m.DROP_REASONS == wire.DROP_REASONS
    assert m.READ_BATCH_MAX_BYTES == wire.READ_BATCH_MAX_BYTES


# ----------------------------------------------------------------- checksum


@pytest.mark.parametrize(
    ("data", "initial", "expected"),
    [
        # RFC 1071 §3 worked example: words 0001 f203 f4f5 f6f7 sum to ddf2.
        (bytes.fromhex("0001f203f4f5f6f7"), 0, 0xFFFF - 0xDDF2),
        (b"", 0, 0xFFFF),  # nothing summed: ~0
        (b"\xff\xff", 0, 0x0000),
        (b"\x01", 0, 0xFEFF),  # odd byte padded as the high byte (RFC 1071 §4.1)
        (b"\x00\x01\x02", 0, 0xFFFF - 0x0201),
        (b"", 0x1234, 0xEDCB),
        (b"", 0x10000, 0xFFFE),  # carries fold back in
        (b"", 2**64 - 1, 0x0000),
        (b"\x12\x34", 0xEDCB, 0x0000),
        (bytes(1000), 0, 0xFFFF),
        (b"\xff" * 65535, 0, 0xFFFF - 0xFF00),
    ],
)
def test_checksum_vectors(m: ModuleType, data: bytes, initial: int, expected: int) -> None:
    assert m.checksum(data, initial) == expected


def test_checksum_matches_dpkt_and_verifies(m: ModuleType) -> None:
    for n in (2, 20, 21, 1499, 1500, 4096, 65535):
        data = os.urandom(n)
        assert m.checksum(data) == dpkt.in_cksum(data)
        if n % 2 == 0:
            # Storing the checksum makes the whole sum to zero (the receiver's test).
            assert m.checksum(data + m.checksum(data).to_bytes(2, "big")) == 0


def test_checksum_buffer_types(m: ModuleType) -> None:
    data = bytes(range(256)) * 3
    expected = m.checksum(data)
    assert m.checksum(bytearray(data)) == expected
    assert m.checksum(memoryview(b"xx" + data)[2:]) == expected
    assert m.checksum(array.array("B", data)) == expected
    assert m.checksum(array.array("H", data)) == expected  # raw bytes, not items
    with pytest.raises(BufferError):
        m.checksum(memoryview(data)[::2])  # not contiguous
    with pytest.raises(TypeError):
        m.checksum("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("initial", "exc"), [(-1, ValueError), (2**64, ValueError), (1.5, TypeError)]
)
def test_checksum_bad_initial(m: ModuleType, initial: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        m.checksum(b"ab", initial)


# ----------------------------------------------------------------- parse: valid


VALID = [
    pytest.param(
        v4(dpkt_tcp(flags=SYN, opts=SYN_OPTS)),
        (4, V4_SRC, V4_DST, 40000, 443, 1000, 0, SYN, 64240, 1460, 7, True, b""),
        id="v4-syn-linux-options",
    ),
    pytest.param(
        v4(
            dpkt_tcp(
                seq=2**32 - 1, ack=123456789, flags=ACK | PSH, win=502, data=b"GET / HTTP/1.1\r\n"
            )
        ),
        (
            4,
            V4_SRC,
            V4_DST,
            40000,
            443,
            2**32 - 1,
            123456789,
            ACK | PSH,
            502,
            0,
            -1,
            False,
            b"GET / HTTP/1.1\r\n",
        ),
        id="v4-data-no-options",
    ),
    pytest.param(
        v4(dpkt_tcp(flags=0xFF, win=0, data=b"x")),
        (4, V4_SRC, V4_DST, 40000, 443, 1000, 0, 0xFF, 0, 0, -1, False, b"x"),
        id="v4-all-flags",
    ),
    pytest.param(
        v4(dpkt_tcp(flags=ACK, data=b"odd"), hl=6, opts=b"\x01\x01\x01\x00"),
        (4, V4_SRC, V4_DST, 40000, 443, 1000, 0, ACK, 64240, 0, -1, False, b"odd"),
        id="v4-ip-options-ihl6",
    ),
    pytest.param(
        v6(dpkt_tcp(flags=SYN | ECE | CWR, opts=SYN_OPTS)),
        (6, V6_SRC, V6_DST, 40000, 443, 1000, 0, SYN | ECE | CWR, 64240, 1460, 7, True, b""),
        id="v6-syn",
    ),
    pytest.param(
        v6(dpkt_tcp(flags=ACK | FIN, data=bytes(range(256)) * 8)),
        (
            6,
            V6_SRC,
            V6_DST,
            40000,
            443,
            1000,
            0,
            ACK | FIN,
            64240,
            0,
            -1,
            False,
            bytes(range(256)) * 8,
        ),
        id="v6-data",
    ),
    pytest.param(
        v6(dpkt_tcp(flags=ACK, data=b"ext"), ext=ext_hdr(60, 1) + ext_hdr(43) + ext_hdr(6), nxt=0),
        (6, V6_SRC, V6_DST, 40000, 443, 1000, 0, ACK, 64240, 0, -1, False, b"ext"),
        id="v6-hop-by-hop-dstopts-routing",
    ),
]


@pytest.mark.parametrize(("pkt", "want"), VALID)
def test_parse_valid(m: ModuleType, pkt: bytes, want: tuple) -> None:
    *fields, payload = want
    res = m.parse(pkt)
    assert isinstance(res, tuple), wire.DROP_REASONS[res]
    (family, src, dst, sport, dport, seq, ack, flags, window, start, end, mss, wscale, sack,
     tsval, tsecr) = res
    # The entries with an MSS are the SYN_OPTS ones, whose Timestamps are TSval 1, TSecr 0.
    ts = (1, 0) if fields[9] else (-1, 0)
    assert [family, src, dst, sport, dport, seq, ack, flags, window, mss, wscale, sack] == fields
    assert (tsval, tsecr) == ts
    assert type(sack) is bool and type(src) is bytes
    assert pkt[start:end] == payload
    assert end == len(pkt)


def test_parse_ignores_bytes_after_ip_length(m: ModuleType) -> None:
    for pkt in (v4(dpkt_tcp(flags=ACK, data=b"abc")), v6(dpkt_tcp(flags=ACK, data=b"abc"))):
        res = m.parse(pkt + b"\x00trailer-from-the-link")
        assert isinstance(res, tuple)
        assert res[10] == len(pkt) and pkt[res[9] : res[10]] == b"abc"


def test_parse_accepts_buffer_types(m: ModuleType) -> None:
    pkt = v4(dpkt_tcp(flags=ACK, data=b"abc"))
    expected = m.parse(pkt)
    assert m.parse(bytearray(pkt)) == expected
    assert m.parse(memoryview(b"pad" + pkt)[3:]) == expected
    with pytest.raises(TypeError):
        m.parse("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("opts", "mss", "wscale", "sack", "ts"),
    [
        (b"", 0, -1, False, (-1, 0)),
        (bytes.fromhex("020405b4"), 1460, -1, False, (-1, 0)),
        (bytes.fromhex("01030300"), 0, 0, False, (-1, 0)),  # shift 0 is present, not absent
        (bytes.fromhex("010303ff"), 0, 255, False, (-1, 0)),  # raw value, not clamped to 14
        (bytes.fromhex("01010402"), 0, -1, True, (-1, 0)),
        (bytes.fromhex("0204ffff010303010204002a"), 42, 1, False, (-1, 0)),  # last MSS wins
        (bytes.fromhex("000204ffff000000"), 0, -1, False, (-1, 0)),  # nothing after EOL counts
        (bytes.fromhex("00ff0000"), 0, -1, False, (-1, 0)),  # garbage after EOL ignored
        (bytes.fromhex("080a000000010000000201011e06000000000402"), 0, -1, True, (1, 2)),
        (bytes.fromhex("fe04abcd020405b4"), 1460, -1, False, (-1, 0)),  # unknown kind skipped
        (bytes.fromhex("02040000"), 0, -1, False, (-1, 0)),  # MSS 0 reads as absent
        # Timestamps (RFC 7323 §3.2): full 32-bit values, TSval 0 is present, last one wins.
        (bytes.fromhex("0101080affffffff80000001"), 0, -1, False, (2**32 - 1, 2**31 + 1)),
        (bytes.fromhex("0101080a0000000000000000"), 0, -1, False, (0, 0)),
        (bytes.fromhex("080a000000010000000201010101080a0000000300000004"), 0, -1, False,
         (3, 4)),
    ],
)
def test_parse_options(
    m: ModuleType, opts: bytes, mss: int, wscale: int, sack: bool, ts: tuple[int, int]
) -> None:
    opts += bytes(-len(opts) % 4)  # pad with EOL to the 32-bit data offset
    for pkt in (v4(dpkt_tcp(opts=opts)), v6(dpkt_tcp(opts=opts))):
        res = m.parse(pkt)
        assert isinstance(res, tuple), wire.DROP_REASONS[res]
        assert res[11:] == (mss, wscale, sack, *ts)
        assert res[9] == (40 if pkt[0] >> 4 == 4 else 60) + len(opts)


# ----------------------------------------------------------------- parse: drops

_V4 = v4(dpkt_tcp(flags=ACK, data=b"hello"))
_V6 = v6(dpkt_tcp(flags=ACK, data=b"hello"))


def _v4_opts(opts: bytes) -> bytes:
    return v4(dpkt_tcp(opts=opts))


DROPS = [
    # TRUNCATED: the buffer ends before a fixed header.
    ("truncated", b"", "empty"),
    ("truncated", _V4[:19], "v4-under-20"),
    ("truncated", fix_ip_sum(mutate(_V4, 0, b"\x46"))[:22], "v4-shorter-than-ihl"),
    ("truncated", _V6[:39], "v6-under-40"),
    ("truncated", fix_ip_sum(mutate(_V4, 2, struct.pack("!H", 39))), "v4-tcp-under-20"),
    ("truncated", mutate(_V6, 4, struct.pack("!H", 19)), "v6-tcp-under-20"),
    # BAD_VERSION
    ("bad_version", b"\x55" + _V4[1:], "version-5"),
    ("bad_version", b"\x05" + _V4[1:], "version-0"),
    ("truncated", b"\x60" + bytes(10), "v6-version-then-short"),  # version is read first
    # BAD_IP_HEADER: lengths that lie.
    ("bad_ip_header", fix_ip_sum(mutate(_V4, 0, b"\x44")), "v4-ihl-4"),
    ("bad_ip_header", fix_ip_sum(mutate(_V4, 2, struct.pack("!H", 19))), "v4-total-under-header"),
    (
        "bad_ip_header",
        fix_ip_sum(mutate(_V4, 2, struct.pack("!H", len(_V4) + 1))),
        "v4-total-past-buffer",
    ),
    ("bad_ip_header", mutate(_V6, 4, struct.pack("!H", len(_V6) - 39)), "v6-payload-past-buffer"),
    ("bad_ip_header", v6(b"\x06\x00", nxt=0), "v6-ext-header-past-payload"),
    ("bad_ip_header", v6(b"", nxt=60), "v6-ext-header-no-room"),
    ("bad_ip_header", v6(b"\x06", nxt=43), "v6-ext-header-length-byte-missing"),
    # FRAGMENT
    ("fragment", v4(dpkt_tcp(flags=ACK), mf=1), "v4-more-fragments"),
    ("fragment", v4(b"\x00" * 24, offset=3), "v4-offset"),
    (
        "fragment",
        v6(dpkt_tcp(flags=ACK), ext=bytes([6, 0, 0, 1, 0, 0, 0, 7]), nxt=44),
        "v6-frag-hdr",
    ),
    ("fragment", v6(b"", ext=ext_hdr(44), nxt=0), "v6-frag-after-hop-by-hop"),
    # NOT_TCP
    ("not_tcp", v4(dpkt.udp.UDP(sport=1, dport=53, data=b"q"), p=17), "v4-udp"),
    ("not_tcp", v6(bytes(8), nxt=58), "v6-icmp"),
    ("not_tcp", v6(b"", nxt=59), "v6-no-next-header"),
    ("not_tcp", v6(bytes(24), ext=ext_hdr(17), nxt=60), "v6-udp-after-dstopts"),
    # BAD_IP_CHECKSUM
    ("bad_ip_checksum", mutate(_V4, 8, b"\x3f"), "v4-ttl-changed"),
    # BAD_TCP_HEADER
    ("bad_tcp_header", fix_tcp_sum(mutate(_V4, 32, b"\x40"), 20), "v4-doff-4"),
    ("bad_tcp_header", mutate(_V4, 32, b"\x70"), "v4-doff-past-payload"),
    ("bad_tcp_header", mutate(_V6, 52, b"\x00"), "v6-doff-0"),
    # BAD_TCP_CHECKSUM
    ("bad_tcp_checksum", mutate(_V4, len(_V4) - 1, b"O"), "v4-payload-flipped"),
    ("bad_tcp_checksum", mutate(_V6, len(_V6) - 1, b"O"), "v6-payload-flipped"),
    ("bad_tcp_checksum", mutate(_V6, 8, b"\xfe"), "v6-src-changed-pseudo-header"),
    # BAD_OPTIONS (RFC 9293 §3.2 lengths)
    ("bad_options", _v4_opts(bytes.fromhex("02010000")), "len-1"),
    ("bad_options", _v4_opts(bytes.fromhex("08000000")), "len-0"),
    ("bad_options", _v4_opts(bytes.fromhex("0108ffff")), "runs-past-header"),
    ("bad_options", _v4_opts(bytes.fromhex("01020405")), "mss-one-byte-past-header"),
    ("bad_options", _v4_opts(bytes.fromhex("01010103")), "wscale-no-room-for-length"),
    ("bad_options", _v4_opts(bytes.fromhex("01010108")), "kind-without-length"),
    ("bad_options", _v4_opts(bytes.fromhex("02030500")), "mss-len-3"),
    ("bad_options", _v4_opts(bytes.fromhex("020505b400000000")), "mss-len-5"),
    ("bad_options", _v4_opts(bytes.fromhex("03040700")), "wscale-len-4"),
    ("bad_options", _v4_opts(bytes.fromhex("04030000")), "sackok-len-3"),
    ("bad_options", _v4_opts(bytes.fromhex("080900000001000000020000")), "timestamps-len-9"),
    ("bad_options", _v4_opts(bytes.fromhex("080b00000001000000020000")), "timestamps-len-11"),
    ("bad_options", _v4_opts(bytes.fromhex("0101080a00000001")), "timestamps-past-header"),
    # BAD_ADDRESS
    ("bad_address", v4(dpkt_tcp(), src=bytes([224, 0, 0, 1])), "v4-src-multicast"),
    ("bad_address", v4(dpkt_tcp(), dst=bytes([239, 255, 255, 250])), "v4-dst-multicast"),
    ("bad_address", v4(dpkt_tcp(), dst=b"\xff\xff\xff\xff"), "v4-dst-broadcast"),
    ("bad_address", v4(dpkt_tcp(), src=bytes(4)), "v4-src-unspecified"),
    (
        "bad_address",
        v6(dpkt_tcp(), dst=bytes.fromhex("ff020000000000000000000000000001")),
        "v6-dst-multicast",
    ),
    ("bad_address", v6(dpkt_tcp(), src=bytes(16)), "v6-src-unspecified"),
]


@pytest.mark.parametrize(("reason", "pkt"), [pytest.param(r, p, id=i) for r, p, i in DROPS])
def test_parse_drop_reasons(m: ModuleType, reason: str, pkt: bytes) -> None:
    assert m.parse(pkt) == getattr(m, "DROP_" + reason.upper())


def test_every_drop_reason_is_covered() -> None:
    assert {r for r, _, _ in DROPS} == set(wire.DROP_REASONS[1:])


def test_verify_checksum_false_skips_both_checksums(m: ModuleType) -> None:
    bad_ip = mutate(_V4, 8, b"\x3f")
    bad_tcp = mutate(_V6, len(_V6) - 1, b"O")
    assert m.parse(bad_ip, False)[:9] == m.parse(_V4)[:9]
    assert m.parse(bad_tcp, verify_checksum=False)[5:] == m.parse(_V6)[5:]
    # Structure is still checked without checksums.
    assert m.parse(mutate(_V4, 32, b"\x70"), False) == m.DROP_BAD_TCP_HEADER


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        # The documented order: the first failing check decides.
        (mutate(v4(dpkt_tcp(), src=bytes(4)), 8, b"\x01"), "bad_ip_checksum"),  # before address
        (v4(dpkt.udp.UDP(), p=17, mf=1), "fragment"),  # before protocol
        (v4(b"", src=bytes(4), p=17), "not_tcp"),  # before address
        (mutate(v4(dpkt_tcp(opts=bytes.fromhex("02030000"))), 20, b"\x99"), "bad_tcp_checksum"),
        (v6(dpkt_tcp(), dst=b"\xff" * 16, ext=bytes([6, 0, 0, 1, 0, 0, 0, 7]), nxt=44), "fragment"),
    ],
)
def test_parse_check_order(m: ModuleType, pkt: bytes, reason: str) -> None:
    assert m.parse(pkt) == getattr(m, "DROP_" + reason.upper())


# ----------------------------------------------------------------- build


def _check_sums_with_dpkt(pkt: bytes) -> dpkt.Packet:
    """Parse with dpkt and assert dpkt recomputes exactly the checksums we wrote."""
    ip = dpkt.ip.IP(pkt) if pkt[0] >> 4 == 4 else dpkt.ip6.IP6(pkt)
    tcp = ip.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    ours_tcp = tcp.sum
    tcp.sum = 0
    if isinstance(ip, dpkt.ip.IP):
        ours_ip = ip.sum
        ip.sum = 0
        assert bytes(ip) == pkt  # dpkt refilled both sums identically
        assert ip.sum == ours_ip
    else:
        assert bytes(ip) == pkt
    assert tcp.sum == ours_tcp
    return ip


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("mss", "wscale", "sack", "ts", "opts"),
    [
        (0, -1, False, (-1, 0), ""),
        (1460, -1, False, (-1, 0), "020405b4"),
        (0, -1, True, (-1, 0), "01010402"),
        (0, 0, False, (-1, 0), "01030300"),
        (65495, 14, True, (-1, 0), "0204ffd7010104020103030e"),
        (536, 7, False, (-1, 0), "0204021801030307"),
        (0, -1, False, (0, 0), "0101080a0000000000000000"),
        (0, -1, False, (2**32 - 1, 0x01020304), "0101080affffffff01020304"),
        # A SYN-ACK with everything, as the stack sends it: 24 bytes, no padding.
        (65483, 7, True, (5, 6), "0204ffcb010104020101080a000000050000000601030307"),
    ],
)
def test_build_fields_and_checksums(
    m: ModuleType, family: int, mss: int, wscale: int, sack: bool, ts: tuple[int, int], opts: str
) -> None:
    src, dst = (V4_SRC, V4_DST) if family == 4 else (V6_SRC, V6_DST)
    payload = b"payload bytes, odd length"
    pkt = m.build(
        family, src, dst, 40000, 443, 2**32 - 1, 77, SYN | ACK, 29200, payload, mss, wscale, sack,
        *ts,
    )
    assert type(pkt) is bytes
    ip = _check_sums_with_dpkt(pkt)
    tcp = ip.data
    if family == 4:
        assert (ip.v, ip.hl, ip.tos, ip.id, ip.df, ip.mf, ip.offset, ip.ttl, ip.p) == (
            4, 5, 0, 0, 1, 0, 0, 64, 6
        )  # fmt: skip
        assert ip.len == len(pkt)
    else:
        assert (ip.v, ip.fc, ip.flow, ip.hlim, ip.nxt, ip.plen) == (6, 0, 0, 64, 6, len(pkt) - 40)
    assert (ip.src, ip.dst) == (src, dst)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.win, tcp.urp) == (
        40000, 443, 2**32 - 1, 77, SYN | ACK, 29200, 0
    )  # fmt: skip
    assert bytes(tcp.opts) == bytes.fromhex(opts)
    assert tcp.off == 5 + len(opts) // 8
    assert tcp.data == payload
    # And it round-trips through our own parser.
    res = m.parse(pkt)
    assert isinstance(res, tuple)
    assert res[11:] == (mss, wscale, sack, *ts)


def test_build_sizes_at_the_limit(m: ModuleType) -> None:
    big4 = m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, bytes(65535 - 40))
    assert len(big4) == 65535 and m.parse(big4)[10] == 65535
    big6 = m.build(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK, 5, os.urandom(65535 - 20))
    assert len(big6) == 65535 + 40
    _check_sums_with_dpkt(big6)
    with pytest.raises(ValueError):
        m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, bytes(65535 - 39))
    with pytest.raises(ValueError):
        m.build(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK, 5, bytes(65535 - 19))
    with pytest.raises(ValueError):  # options count against the limit too
        m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, SYN, 5, bytes(65535 - 40), mss=1460)


_GOOD = dict(family=4, src=V4_SRC, dst=V4_DST, sport=1, dport=2, seq=3, ack=4, flags=ACK, window=5)
BAD_BUILD = [
    ({"family": 5}, ValueError),
    ({"family": "4"}, TypeError),
    ({"src": V6_SRC}, ValueError),
    ({"family": 6, "src": V6_SRC}, ValueError),  # dst still 4 bytes
    ({"dst": b"\x01\x02\x03"}, ValueError),
    ({"src": "10.0.0.1"}, TypeError),
    ({"sport": 65536}, ValueError),
    ({"dport": -1}, ValueError),
    ({"sport": 80.0}, TypeError),
    ({"seq": 2**32}, ValueError),
    ({"ack": -1}, ValueError),
    ({"seq": 2**100}, ValueError),
    ({"flags": 256}, ValueError),
    ({"window": 65536}, ValueError),
    ({"payload": 7}, TypeError),
    ({"mss": 65536}, ValueError),
    ({"mss": -1}, ValueError),
    ({"wscale": 15}, ValueError),  # RFC 7323 §2.3: at most 14
    ({"wscale": -2}, ValueError),
    ({"tsval": -2}, ValueError),  # -1 is "no option"
    ({"tsval": 2**32}, ValueError),
    ({"tsecr": -1}, ValueError),
    ({"tsecr": 2**32}, ValueError),
    ({"tsval": 1.0}, TypeError),
    ({"sack": [1, 2]}, TypeError),  # a tuple, as Segment carries it
    ({"sack": (1,)}, ValueError),  # edges come in pairs
    ({"sack": (1, 2) * 5}, ValueError),  # RFC 2018 §3: at most four blocks
    ({"sack": (1, 2**32)}, ValueError),
    ({"sack": (1, -1)}, ValueError),
    ({"sack": (1, 2.0)}, TypeError),
    # Four blocks fit beside nothing else; with timestamps (12 bytes) only three do.
    ({"sack": (1, 2) * 4, "tsval": 0}, ValueError),
]


@pytest.mark.parametrize(("change", "exc"), BAD_BUILD)
def test_build_rejects_bad_arguments(m: ModuleType, change: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        m.build(**{**_GOOD, **change})


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("ts", "sack", "opts"),
    [
        ((-1, 0), (1, 2), "0101050a0000000100000002"),
        # A duplicate ACK as the stack sends it: timestamps, then three blocks (40 bytes).
        ((7, 8), (0xFFFFFFF0, 0x10, 3, 4, 2**32 - 2, 2**32 - 1),
         "0101080a00000007000000080101051afffffff00000001000000003000000"
         "04fffffffeffffffff"),
        # Without timestamps, four blocks (36 bytes).
        ((-1, 0), (1, 2, 3, 4, 5, 6, 7, 8),
         "010105220000000100000002000000030000000400000005000000060000000700000008"),
    ],
)
def test_build_sack_blocks(
    m: ModuleType, family: int, ts: tuple[int, int], sack: tuple[int, ...], opts: str
) -> None:
    """RFC 2018 §3: kind 5, length 2 + 8 per block, 32-bit left and right edges."""
    src, dst = (V4_SRC, V4_DST) if family == 4 else (V6_SRC, V6_DST)
    pkt = m.build(family, src, dst, 1, 2, 3, 4, ACK, 5, b"", tsval=ts[0], tsecr=ts[1], sack=sack)
    assert isinstance(pkt, bytes)
    tcp = _check_sums_with_dpkt(pkt).data
    assert bytes(tcp.opts) == bytes.fromhex(opts)
    edges = [v for k, v in dpkt.tcp.parse_opts(tcp.opts) if k == dpkt.tcp.TCP_OPT_SACK]
    assert edges == [struct.pack(f"!{len(sack)}I", *sack)]
    # Our parser takes the app's SACK blocks as options it skips.
    res = m.parse(pkt)
    assert isinstance(res, tuple) and res[14:] == (ts if ts[0] >= 0 else (-1, 0))


def test_build_keyword_and_default_arguments(m: ModuleType) -> None:
    positional = m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, b"", 0, -1, False, -1, 0)
    assert m.build(**_GOOD) == positional
    assert m.build(*_GOOD.values(), tsecr=99) == positional  # TSecr alone adds nothing
    assert m.build(*_GOOD.values(), sack_permitted=0) == positional
    with pytest.raises(TypeError):
        m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK)  # window missing
    with pytest.raises(TypeError):
        m.build(**_GOOD, bogus=1)
    with pytest.raises(TypeError):
        m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, family=4)


# ----------------------------------------------------------------- build_many


@pytest.mark.parametrize("family", [4, 6])
def test_build_many_segments(m: ModuleType, family: int) -> None:
    src, dst = (V4_SRC, V4_DST) if family == 4 else (V6_SRC, V6_DST)
    payload = os.urandom(10_000)
    seq0 = 2**32 - 3000  # the sequence space wraps inside the burst
    pkts = m.build_many(
        family, src, dst, 443, 40000, seq0, 99, ACK | PSH | FIN, 1000, payload, 1460
    )
    assert len(pkts) == 7  # ceil(10000 / 1460)
    joined = b""
    for i, pkt in enumerate(pkts):
        ip = _check_sums_with_dpkt(pkt)
        tcp = ip.data
        assert tcp.seq == (seq0 + 1460 * i) % 2**32
        assert (tcp.sport, tcp.dport, tcp.ack, tcp.win, tcp.off, tcp.opts) == (
            443,
            40000,
            99,
            1000,
            5,
            b"",
        )
        assert tcp.flags == (ACK | PSH | FIN if i == 6 else ACK)
        assert len(tcp.data) == (10_000 - 6 * 1460 if i == 6 else 1460)
        joined += tcp.data
    assert joined == payload


def test_build_many_edges(m: ModuleType) -> None:
    (only,) = m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK | FIN, 5, b"", 1460)
    assert only == m.build(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK | FIN, 5)
    exact = m.build_many(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK | PSH, 5, b"abcdef", 3)
    assert exact == [
        m.build(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK, 5, b"abc"),
        m.build(6, V6_SRC, V6_DST, 1, 2, 6, 4, ACK | PSH, 5, b"def"),
    ]
    assert m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, bytearray(b"x" * 5), 1) == [
        m.build(4, V4_SRC, V4_DST, 1, 2, 3 + i, 4, ACK, 5, b"x") for i in range(5)
    ]
    # An mss beyond the IP length limit only matters when a segment would use it.
    assert len(m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, b"y" * 100, 65535)) == 1
    with pytest.raises(ValueError):
        m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, bytes(65496), 65535)
    with pytest.raises(ValueError):  # the IPv6 payload length caps a segment at 65515
        m.build_many(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK, 5, bytes(65516), 65535)
    big = m.build_many(6, V6_SRC, V6_DST, 1, 2, 3, 4, ACK, 5, bytes(65516), 65515)
    assert [len(p) for p in big] == [65535 + 40, 40 + 20 + 1]
    for mss in (0, -5, 65536):
        with pytest.raises(ValueError):
            m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, b"x", mss)
    with pytest.raises(TypeError):
        m.build_many(4, V4_SRC, V4_DST, 1, 2, 3, 4, ACK, 5, b"x")  # mss is required


# ----------------------------------------------------------------- batch I/O


@pytest.fixture
def dgram_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Non-blocking AF_UNIX datagram pair: one packet per read/write, like a TUN."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_batch_roundtrip_preserves_boundaries(m: ModuleType, dgram_pair: tuple) -> None:
    a, b = dgram_pair
    pkts = [b"one", bytearray(b"two-two"), memoryview(b"__three__")[2:-2], b"", b"x" * 3000]
    assert m.write_batch(a.fileno(), pkts) == 5
    # The empty datagram reads as 0 bytes, which read_batch treats as the end of the
    # batch (EOF), so it comes back in two batches around it.
    assert m.read_batch(b.fileno(), 64, 4096) == [b"one", b"two-two", b"three"]
    assert m.read_batch(b.fileno(), 64, 4096) == [b"x" * 3000]
    assert m.read_batch(b.fileno(), 64, 4096) == []  # EAGAIN -> empty list


def test_write_batch_gathers_tuple_parts_into_one_packet(m: ModuleType, dgram_pair: tuple) -> None:
    a, b = dgram_pair
    payload = memoryview(b"..payload..")[2:-2]
    pkts = [(b"hdr", payload), b"plain", (b"a", b"", bytearray(b"c"), b"d")]
    assert m.write_batch(a.fileno(), pkts) == 3
    assert m.read_batch(b.fileno(), 64, 4096) == [b"hdrpayload", b"plain", b"acd"]
    for bad in ((), (b"1", b"2", b"3", b"4", b"5")):
        with pytest.raises(ValueError, match="parts"):
            m.write_batch(a.fileno(), [b"never", bad])
    with pytest.raises(TypeError):
        m.write_batch(a.fileno(), [(b"never", "not a buffer")])
    with pytest.raises(TypeError):  # only a plain tuple is gathered, in both twins
        m.write_batch(a.fileno(), [collections.namedtuple("Parts", "h p")(b"ne", b"ver")])
    assert m.read_batch(b.fileno(), 64, 4096) == []  # nothing of a rejected batch went out


def test_read_batch_respects_max_packets_and_bufsize(m: ModuleType, dgram_pair: tuple) -> None:
    a, b = dgram_pair
    for i in range(5):
        a.send(bytes([i]) * 100)
    assert m.read_batch(b.fileno(), 2, 100) == [b"\x00" * 100, b"\x01" * 100]
    assert m.read_batch(b.fileno(), 1, 10) == [b"\x02" * 10]  # kernel truncates to bufsize
    assert m.read_batch(b.fileno(), 10, 1000) == [b"\x03" * 100, b"\x04" * 100]


def test_write_batch_stops_at_eagain(m: ModuleType, dgram_pair: tuple) -> None:
    a, b = dgram_pair
    pkts = [i.to_bytes(4, "big") * 256 for i in range(2000)]
    n = m.write_batch(a.fileno(), pkts)
    assert 0 < n < len(pkts)  # the peer's receive queue filled up
    got: list[bytes] = []
    while batch := m.read_batch(b.fileno(), 64, 2048):
        got += batch
    assert got == pkts[:n]  # in order, nothing torn, nothing lost
    assert m.write_batch(a.fileno(), []) == 0


def test_write_batch_error_reports_count(m: ModuleType, dgram_pair: tuple) -> None:
    a, _ = dgram_pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    too_big = bytes(a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + 1)
    with pytest.raises(OSError) as info:
        m.write_batch(a.fileno(), [b"a", b"b", too_big, b"never"])
    assert info.value.errno == errno.EMSGSIZE
    assert info.value.packets_written == 2


def test_write_batch_gathers_buffers_first(m: ModuleType, dgram_pair: tuple) -> None:
    a, b = dgram_pair
    with pytest.raises(TypeError):
        m.write_batch(a.fileno(), [b"ok", "not a buffer"])
    assert m.read_batch(b.fileno(), 8, 64) == []  # nothing was written
    with pytest.raises(TypeError):
        m.write_batch(a.fileno(), 5)


def test_batch_io_errors(m: ModuleType) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            m.read_batch(w, 4, 64)  # the write end cannot be read
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError) as info:
            m.write_batch(r, [b"x"])
        assert info.value.errno == errno.EBADF
        assert info.value.packets_written == 0
        os.close(w)
        w = -1
        assert m.read_batch(r, 4, 64) == []  # EOF ends the batch, no fake packets
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((-1, 1, 1), ValueError),
        ((0, 0, 100), ValueError),
        ((0, 1, 0), ValueError),
        ((0, 1024, 1024 * 1024), ValueError),  # over READ_BATCH_MAX_BYTES
        ((0, 1.0, 100), TypeError),
    ],
)
def test_read_batch_rejects_bad_arguments(m: ModuleType, args: tuple, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        m.read_batch(*args)


# ----------------------------------------------------------------- selector


@pytest.fixture
def reload_fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """proxyvpn.netstack.fast, reloaded under the test's environment, restored after."""
    import proxyvpn.netstack.fast as fast

    yield fast
    monkeypatch.undo()
    importlib.reload(fast)


def test_fast_pure_env_selects_python(
    reload_fast: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXYVPN_PURE", "1")
    fast = importlib.reload(reload_fast)
    assert fast.IMPL == "python"
    assert fast.parse is wire.parse and fast.build_many is wire.build_many
    assert fast.DROP_BAD_OPTIONS == wire.DROP_BAD_OPTIONS


def test_fast_falls_back_with_warning(
    reload_fast: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PROXYVPN_PURE", raising=False)
    # Make `from proxyvpn import _fastpath` fail as if the extension were never built.
    monkeypatch.setitem(sys.modules, "proxyvpn._fastpath", None)
    monkeypatch.delattr(proxyvpn, "_fastpath", raising=False)
    with caplog.at_level(logging.WARNING, logger="proxyvpn.netstack"):
        fast = importlib.reload(reload_fast)
    assert fast.IMPL == "python" and fast.checksum is wire.checksum
    assert any(
        "not built" in r.getMessage() for r in caplog.records if r.name == "proxyvpn.netstack"
    )


@pytest.mark.skipif(_fastpath is None, reason="C extension proxyvpn._fastpath not built")
def test_fast_prefers_c(reload_fast: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYVPN_PURE", raising=False)
    fast = importlib.reload(reload_fast)
    assert fast.IMPL == "c"
    assert fast.parse is _fastpath.parse and fast.write_batch is _fastpath.write_batch
    exported = {n for n in fast.__all__ if n not in ("IMPL", "select")}
    assert all(getattr(fast, n) == getattr(_fastpath, n) for n in exported)
    assert exported <= set(dir(wire))


def test_fast_select_object(reload_fast: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYVPN_PURE", raising=False)
    fast = importlib.reload(reload_fast)
    pure = fast.select(pure=True)
    assert pure.IMPL == "python" and pure.parse is wire.parse
    assert pure.DROP_REASONS is wire.DROP_REASONS and pure.SYN == wire.SYN
    chosen = fast.select()
    assert chosen.IMPL == fast.IMPL and chosen.build_many is fast.build_many
    assert {n for n in fast.__all__ if n != "select"} == set(vars(chosen))
