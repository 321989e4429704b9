"""Property tests: the C fast path and the pure-Python reference agree byte for byte.

DESIGN.md promises one fast path and one reference path that cannot drift apart.
Each property feeds the same input to ``proxyvpn._fastpath`` and to
``proxyvpn.netstack.wire`` and demands identical results - the same bytes, the same
tuple, the same drop code, or the same exception type. Parse inputs include valid
packets, their truncations and bit flips, header fields overwritten with random
values, and arbitrary bytes: parse() must never raise on any of them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyvpn.netstack import wire

try:
    from proxyvpn import _fastpath as C
except ImportError:  # pragma: no cover - CI builds the extension
    C = None

pytestmark = pytest.mark.skipif(
    C is None,
    reason="C extension proxyvpn._fastpath is not built "
    "(run: python setup.py build_ext --inplace); nothing to compare against",
)

P = wire

# Moderate example counts: the whole file should run in a few seconds.
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", result) or ("raise", exception type), so results and errors compare alike."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the type is the thing compared
        return ("raise", type(exc))


def same(name: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Call ``name`` in both implementations, assert identical outcomes, return it."""
    c = outcome(getattr(C, name), *args, **kwargs)
    p = outcome(getattr(P, name), *args, **kwargs)
    assert c == p, f"{name}: C gave {c!r}, Python gave {p!r}"
    return c


# ----------------------------------------------------------------- strategies

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=1500) | st.binary(min_size=1500, max_size=9000)


def addresses(alen: int) -> st.SearchStrategy[bytes]:
    """Random addresses, biased towards the ones parse() must reject or accept at the
    edges (unspecified, broadcast, multicast and its neighbours)."""
    if alen == 4:
        special = [
            bytes(4),
            b"\xff" * 4,
            b"\xe0\x00\x00\x01",
            b"\xef\xff\xff\xff",
            b"\xdf\xff\xff\xff",
            b"\xf0\x00\x00\x00",
            b"\xff\xff\xff\xfe",
        ]
    else:
        special = [
            bytes(16),
            bytes(15) + b"\x01",
            b"\xff\x02" + bytes(13) + b"\x01",
            b"\xfe\x80" + bytes(14),
            b"\xff" * 16,
        ]
    return st.sampled_from(special) | st.binary(min_size=alen, max_size=alen)


@st.composite
def flows(draw: st.DrawFn) -> dict[str, Any]:
    """Valid leading build() arguments for either family."""
    family = draw(st.sampled_from([4, 6]))
    alen = 4 if family == 4 else 16
    return {
        "family": family,
        "src": draw(addresses(alen)),
        "dst": draw(addresses(alen)),
        "sport": draw(u16),
        "dport": draw(u16),
        "seq": draw(u32),
        "ack": draw(u32),
        "flags": draw(st.integers(0, 0xFF)),
        "window": draw(u16),
    }


@st.composite
def built_packets(draw: st.DrawFn) -> bytes:
    """A valid packet from the reference builder, sometimes with IPv6 extension
    headers spliced in (and the lengths fixed) so the header walk gets exercised."""
    flow = draw(flows())
    pkt = P.build(
        **flow,
        payload=draw(st.binary(max_size=300)),
        mss=draw(st.sampled_from([0, 536, 1460, 65535])),
        wscale=draw(st.integers(-1, 14)),
        sack_permitted=draw(st.booleans()),
        tsval=draw(st.just(-1) | u32),
        tsecr=draw(u32),
    )
    if flow["family"] == 6 and draw(st.booleans()):
        exts = b""
        nxt = 6
        for kind in reversed(draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=3))):
            units = draw(st.integers(0, 2))
            exts = (
                bytes([nxt, units])
                + draw(st.binary(min_size=units * 8 + 6, max_size=units * 8 + 6))
                + exts
            )
            nxt = kind
        body = exts + pkt[40:]
        pkt = pkt[:4] + struct.pack("!HB", len(body), nxt) + pkt[7:40] + body
    return pkt


@st.composite
def mangled_packets(draw: st.DrawFn) -> bytes:
    """A valid packet, then some of: truncation, bit flips, a field overwritten with a
    random value (lengths, IHL, data offset, protocol, options), trailing bytes."""
    pkt = bytearray(draw(built_packets()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "poke", "poke_hdr", "append"]))
        if op == "truncate":
            del pkt[draw(st.integers(0, len(pkt))) :]
        elif op == "append":
            pkt += draw(st.binary(min_size=1, max_size=40))
        elif pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            if op == "flip":
                pkt[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "poke":
                pkt[i] = draw(st.integers(0, 255))
            else:
                # Header bytes that steer the parser: version/IHL, lengths, fragment
                # bits, protocol/next header, TCP data offset, first option bytes.
                j = draw(
                    st.sampled_from(
                        [0, 2, 3, 4, 5, 6, 7, 9, 20, 32, 33, 40, 41, 42, 52, 53, 60, 61, 62]
                    )
                )
                if j < len(pkt):
                    pkt[j] = draw(st.integers(0, 255))
    return bytes(pkt)


@st.composite
def option_packets(draw: st.DrawFn) -> bytes:
    """A valid packet whose TCP options are random bytes (biased to the kinds and
    lengths the parser interprets), with the data offset and checksum fixed up."""
    flow = draw(flows())
    base = P.build(**flow, payload=draw(st.binary(max_size=8)))
    ip_hlen = 20 if flow["family"] == 4 else 40
    small = st.sampled_from([0, 1, 2, 3, 4, 5, 8, 10, 0xFF]) | st.integers(0, 255)
    opts = bytes(draw(st.lists(small, max_size=40)))
    opts += bytes(-len(opts) % 4)
    tcp = bytearray(base[ip_hlen:])
    tcp[12] = (5 + len(opts) // 4) << 4
    tcp[16:18] = b"\x00\x00"
    tcp[20:20] = opts
    ip = bytearray(base[:ip_hlen])
    if flow["family"] == 4:
        ip[2:4] = struct.pack("!H", ip_hlen + len(tcp))
        ip[10:12] = b"\x00\x00"
        ip[10:12] = struct.pack("!H", P.checksum(ip))
        pseudo = flow["src"] + flow["dst"] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        ip[4:6] = struct.pack("!H", len(tcp))
        pseudo = flow["src"] + flow["dst"] + struct.pack("!IxxxB", len(tcp), 6)
    tcp[16:18] = struct.pack("!H", P.checksum(pseudo + tcp))
    return bytes(ip + tcp)


# ----------------------------------------------------------------- checksum


@FAST
@given(data=st.binary(max_size=2100), initial=st.integers(0, 2**64 - 1), skip=st.integers(0, 7))
def test_checksum_agrees(data: bytes, initial: int, skip: int) -> None:
    # Slicing a memoryview moves the start off 8-byte alignment: the C loads must not care.
    view = memoryview(data)[min(skip, len(data)) :]
    same("checksum", data, initial)
    same("checksum", view)
    same("checksum", bytearray(view), initial=initial & 0xFFFF)


@FAST
@given(
    fill=st.sampled_from([0x00, 0xFF, 0x80, 0x01]),
    n=st.integers(0, 200) | st.sampled_from([31, 32, 33, 63, 64, 65, 65535, 65536]),
    initial=st.sampled_from([0, 1, 0xFFFF, 0x10000, 2**32 - 1, 2**64 - 1]),
)
def test_checksum_agrees_on_carry_heavy_data(fill: int, n: int, initial: int) -> None:
    # Runs of 0x00/0xff are where one's-complement zero (0x0000 vs 0xffff) and carry
    # folding go wrong first.
    same("checksum", bytes([fill]) * n, initial)


@SLOW
@given(initial=st.integers(-(2**70), 2**70) | st.floats() | st.none() | st.text(max_size=2))
def test_checksum_errors_agree(initial: Any) -> None:
    same("checksum", b"\x01\x02", initial)


# ----------------------------------------------------------------- build / build_many


@FAST
@given(
    flow=flows(),
    payload=payloads,
    mss=u16,
    wscale=st.integers(-1, 14),
    sack=st.booleans(),
    tsval=st.just(-1) | u32,
    tsecr=u32,
    blocks=st.lists(u32, max_size=4).map(lambda v: tuple(v + v[::-1])),
)
def test_build_agrees(
    flow: dict, payload: bytes, mss: int, wscale: int, sack: bool, tsval: int, tsecr: int,
    blocks: tuple[int, ...],
) -> None:
    kind, pkt = same("build", **flow, payload=payload, mss=mss, wscale=wscale, sack_permitted=sack,
                     tsval=tsval, tsecr=tsecr, sack=blocks)
    optlen = ((mss > 0) + sack + (wscale >= 0)) * 4 + (12 if tsval >= 0 else 0)
    optlen += 4 * len(blocks) + 4 if blocks else 0
    assert kind == ("raise" if optlen > 40 else "ok")
    if kind == "raise":
        return
    # Both parsers read back what was built (addresses permitting), identically.
    res = same("parse", pkt)[1]
    if isinstance(res, tuple):
        assert res[:9] == tuple(flow.values())
        assert pkt[res[9] : res[10]] == payload
        assert res[11:] == (mss, wscale, sack, tsval, tsecr if tsval >= 0 else 0)
    else:
        assert res == P.DROP_BAD_ADDRESS


@SLOW
@given(
    field=st.sampled_from(
        [
            "family",
            "src",
            "dst",
            "sport",
            "dport",
            "seq",
            "ack",
            "flags",
            "window",
            "payload",
            "mss",
            "wscale",
            "tsval",
            "tsecr",
            "sack",
        ]
    ),
    value=st.integers(-(2**66), 2**66)
    | st.sampled_from([-1, 0, 4, 6, 14, 15, 65535, 65536, 2**32])
    | st.binary(max_size=20)
    | st.floats(allow_nan=False)
    | st.text(max_size=4)
    | st.none()
    | st.lists(st.integers(-1, 2**32) | st.floats(), max_size=10).map(tuple),
    flow=flows(),
)
def test_build_errors_agree(field: str, value: Any, flow: dict) -> None:
    same("build", **{**flow, field: value})
    if field not in ("wscale", "tsval", "tsecr", "sack"):
        same("build_many", **{**flow, "payload": b"abc", "mss": 2, field: value})


@SLOW
@given(
    flow=flows(),
    payload=payloads | st.binary(min_size=60000, max_size=70000),
    mss=st.integers(1, 2000) | st.sampled_from([1, 536, 1460, 65495, 65515, 65535]),
)
def test_build_many_agrees(flow: dict, payload: bytes, mss: int) -> None:
    kind, pkts = same("build_many", **flow, payload=payload, mss=mss)
    if kind == "raise":
        return
    # The segments reassemble to the payload, each one parses the same in both.
    data = b""
    for pkt in pkts:
        res = same("parse", pkt)[1]
        if isinstance(res, int):
            assert res == P.DROP_BAD_ADDRESS
            return
        data += pkt[res[9] : res[10]]
    assert data == payload


@SLOW
@given(mss=st.integers(-(2**40), 2**40), flow=flows(), payload=st.binary(max_size=100))
def test_build_many_mss_errors_agree(mss: int, flow: dict, payload: bytes) -> None:
    same("build_many", **flow, payload=payload, mss=mss)


# ----------------------------------------------------------------- parse


@FAST
@given(pkt=built_packets(), verify=st.booleans())
def test_parse_agrees_on_valid(pkt: bytes, verify: bool) -> None:
    same("parse", pkt, verify)


@FAST
@given(pkt=option_packets(), verify=st.booleans())
def test_parse_agrees_on_random_options(pkt: bytes, verify: bool) -> None:
    kind, res = same("parse", pkt, verify)
    assert kind == "ok"
    assert isinstance(res, tuple) or res in (P.DROP_BAD_OPTIONS, P.DROP_BAD_ADDRESS)


@FAST
@given(pkt=mangled_packets(), verify=st.booleans())
def test_parse_agrees_on_mangled(pkt: bytes, verify: bool) -> None:
    kind, _ = same("parse", pkt, verify_checksum=verify)
    assert kind == "ok"  # never an exception


@FAST
@given(
    data=st.binary(max_size=120)
    | st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6F]), st.binary(max_size=120)).map(
        lambda t: bytes([t[0]]) + t[1]
    ),
    verify=st.booleans(),
)
def test_parse_agrees_on_random_bytes(data: bytes, verify: bool) -> None:
    kind, res = same("parse", data, verify)
    assert kind == "ok" and (isinstance(res, tuple) or 1 <= res < len(P.DROP_REASONS))


# ----------------------------------------------------------------- batch I/O


@SLOW
@given(
    packets=st.lists(st.binary(min_size=1, max_size=3000), max_size=12),
    max_packets=st.integers(1, 16),
)
def test_batch_io_agrees(packets: list[bytes], max_packets: int) -> None:
    """Writing with one implementation and reading with the other is the same as
    either alone: same counts, same boundaries, same bytes."""
    results = []
    for writer, reader in ((C, P), (P, C), (C, C), (P, P)):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with a, b:
            a.setblocking(False)
            b.setblocking(False)
            written = writer.write_batch(a.fileno(), packets)
            batches = []
            while batch := reader.read_batch(b.fileno(), max_packets, 4096):
                assert len(batch) <= max_packets
                batches.append(batch)
            results.append((written, batches))
    assert all(r == results[0] for r in results)
    assert results[0][0] == len(packets)
    assert [p for batch in results[0][1] for p in batch] == packets


# ----------------------------------------------------------------- offloaded TUN (vnet)

VNET = struct.Struct("=BBHHHH")


def _complete(ip: bytes, start: int, offset: int) -> bytes:
    """What the kernel does with CHECKSUM_PARTIAL: sum from csum_start, store at offset."""
    out = bytearray(ip)
    out[start + offset : start + offset + 2] = P.checksum(out[start:]).to_bytes(2, "big")
    return bytes(out)


@FAST
@given(flow=flows(), payload=st.binary(max_size=3000), gso_size=st.integers(-1, 2000))
def test_build_vnet_agrees_and_completes_to_a_valid_packet(flow: dict, payload: bytes,
                                                           gso_size: int) -> None:
    import dpkt

    kind, pkt = same("build", **flow, payload=payload, gso_size=gso_size)
    assert kind == "ok"
    if gso_size < 0:
        assert pkt == C.build(**flow, payload=payload)
        return
    flags, gso_type, hdr_len, gso, start, offset = VNET.unpack_from(pkt)
    ip_hlen = 20 if flow["family"] == 4 else 40
    assert (flags, hdr_len, start, offset) == (1, ip_hlen + 20, ip_hlen, 16)
    if 0 < gso_size < len(payload):
        assert (gso_type, gso) == ((1 if flow["family"] == 4 else 4), gso_size)
    else:
        assert (gso_type, gso) == (0, 0)
    # The partial checksum, completed as the kernel would, is the full one dpkt computes.
    full = _complete(pkt[P.VNET_HDR_LEN:], start, offset)
    assert full == C.build(**flow, payload=payload)
    ip = (dpkt.ip.IP if flow["family"] == 4 else dpkt.ip6.IP6)(full)
    ip.data.sum = 0  # dpkt recomputes zeroed checksums when serialising
    if flow["family"] == 4:
        ip.sum = 0
    assert bytes(ip) == full
    # Parsing it back (as read from a vnet TUN) agrees, with offsets into the whole buffer.
    res = same("parse", pkt, vnet=True)[1]
    if isinstance(res, tuple):
        assert pkt[res[9] : res[10]] == payload
        assert res[:9] == tuple(flow.values())



@FAST
@given(flow=flows(), payload=st.binary(max_size=3000), gso_size=st.integers(-1, 2000))
def test_build_split_agrees_and_joins_to_the_whole_packet(flow: dict, payload: bytes,
                                                         gso_size: int) -> None:
    kind, got = same("build", **flow, payload=payload, gso_size=gso_size, split=True)
    assert kind == "ok"
    whole = C.build(**flow, payload=payload, gso_size=gso_size)
    if gso_size < 0 or not payload:
        assert got == whole  # a full checksum reads the payload: no split
        return
    headers, body = got
    assert body is payload  # the caller's object, not a copy
    assert headers + body == whole

@FAST
@given(pkt=built_packets(), hdr=st.binary(min_size=10, max_size=10), verify=st.booleans())
def test_parse_vnet_agrees(pkt: bytes, hdr: bytes, verify: bool) -> None:
    plain = same("parse", pkt, verify)[1]
    kind, res = same("parse", hdr + pkt, verify, True)
    assert kind == "ok"
    if isinstance(plain, tuple):
        assert res == (*plain[:9], plain[9] + 10, plain[10] + 10, *plain[11:])


@FAST
@given(pkt=mangled_packets(), hdr=st.binary(min_size=10, max_size=10))
def test_parse_vnet_trusts_the_kernel_only_for_the_tcp_checksum(pkt: bytes, hdr: bytes) -> None:
    kind, res = same("parse", hdr + pkt, vnet=True)
    assert kind == "ok"
    # NEEDS_CSUM / DATA_VALID: the kernel vouches for the TCP checksum; else verified.
    plain = same("parse", pkt, not hdr[0] & 3)[1]
    if isinstance(plain, tuple):
        assert res == (*plain[:9], plain[9] + 10, plain[10] + 10, *plain[11:])
    else:
        assert res == plain


@FAST
@given(data=st.binary(max_size=12))
def test_parse_vnet_short_buffers_are_dropped(data: bytes) -> None:
    kind, res = same("parse", data, vnet=True)
    assert kind == "ok" and (isinstance(res, int) or len(data) >= 10)
    if len(data) < 10:
        assert res == P.DROP_TRUNCATED


def test_build_checks_split_before_the_options_in_both() -> None:
    """The same exception from both for a call that is wrong twice over."""

    class Unanswerable:
        def __bool__(self) -> bool:
            raise RuntimeError("no truth value")

    kind, exc = same("build", 4, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 1, 2, 3, 4, 0x10, 5,
                     tsval=0, sack=(1, 2) * 4, split=Unanswerable())
    assert (kind, exc) == ("raise", RuntimeError)


V4_SRC, V4_DST = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.9.9.9")
V6_SRC, V6_DST = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(
    socket.AF_INET6, "fd00::9")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("gso_size", [-1, 0, 1448])
@pytest.mark.parametrize("over", [0, 1, 200_000, "cap", "past the cap"])
def test_build_past_the_ip_length_field_agrees(family: int, gso_size: int,
                                               over: int | str) -> None:
    """Beyond the 16-bit length field only a GSO packet may go (BIG TCP), up to
    BIG_IP_LEN_MAX bytes with its headers: IPv4 with 0 in its length field, IPv6 with 0
    there and a Hop-by-Hop Jumbo Payload option (RFC 2675) holding the length. Anything
    else is refused by both builders alike."""
    assert C.BIG_IP_LEN_MAX == P.BIG_IP_LEN_MAX == 8 * 0xFFFF
    src, dst = (V4_SRC, V4_DST) if family == 4 else (V6_SRC, V6_DST)
    # over=0: the longest packet the length field describes (IPv4 counts its header in
    # it, IPv6 does not); the cap: BIG_IP_LEN_MAX with IPv6's 8-byte Hop-by-Hop header.
    cap = P.BIG_IP_LEN_MAX - 0xFFFF - (0 if family == 4 else 48)
    extra = {"cap": cap, "past the cap": cap + 1}.get(over, over)
    assert isinstance(extra, int)
    paylen = 0xFFFF - 20 - (20 if family == 4 else 0) + extra
    payload = bytes(range(256)) * (paylen // 256) + bytes(paylen % 256)
    kind, pkt = same("build", family, src, dst, 40000, 443, 7, 9, 0x18, 512, payload,
                     gso_size=gso_size)
    if extra and not (gso_size > 0 and extra <= cap):
        assert kind == "raise"
        return
    assert kind == "ok"
    ip = pkt[P.VNET_HDR_LEN:] if gso_size >= 0 else pkt
    length_field = struct.unpack_from("!H", ip, 2 if family == 4 else 4)[0]
    if not extra:
        assert length_field == 0xFFFF  # the longest either describes
        return
    ip_hlen = 20 if family == 4 else 48
    tcp_len = paylen + 20
    assert length_field == 0 and len(ip) == ip_hlen + tcp_len <= P.BIG_IP_LEN_MAX
    if family == 6:  # next header 0, then the Hop-by-Hop header: TCP next, 8 bytes long,
        # the Jumbo Payload option at 4n+2 with the length after the IPv6 header
        assert ip[6] == 0
        assert ip[40:48] == bytes([6, 0, 0xC2, 4]) + struct.pack("!I", 8 + tcp_len)
    flags, gso_type, hdr_len, gso, start, offset = VNET.unpack_from(pkt)
    assert (flags, gso_type, hdr_len, gso, start, offset) == (
        1, 1 if family == 4 else 4, ip_hlen + 20, gso_size, ip_hlen, 16)
    # Completed as the kernel would, it is the sum over the pseudo-header with the
    # 32-bit TCP length (csum_tcpudp_magic(), csum_ipv6_magic()) and the whole segment.
    full = _complete(ip, start, offset)
    tcp = bytearray(full[ip_hlen:])
    assert len(tcp) == tcp_len
    tcp[16:18] = b"\0\0"
    pseudo = src + dst + b"\x00\x06" + struct.pack("!I", tcp_len)
    assert struct.unpack_from("!H", full, ip_hlen + 16)[0] == P.checksum(pseudo + tcp)
