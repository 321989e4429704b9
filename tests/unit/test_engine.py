"""Engine: one packet whose handling fails costs that packet only.

The engine reads a SOCK_SEQPACKET socket standing in for the TUN (one read, one packet);
parse() drops malformed input by itself, so the failure here is injected: a bug in the
stack must not take the rest of the batch, or the transmit after it, with it."""

from __future__ import annotations

import asyncio
import gc
import itertools
import socket
from types import SimpleNamespace

import pytest

from bench import hotpath
from proxyvpn.aio import engine as engine_module
from proxyvpn.aio.engine import BIG_SEGMENTS
from proxyvpn.aio.flow import Flow
from proxyvpn.config import Config
from proxyvpn.netstack import wire
from proxyvpn.netstack.tcp import TcpConnection
from proxyvpn.relay.dial import ProxyEndpoint

SRC, DST = socket.inet_aton("10.0.0.2"), socket.inet_aton("10.9.9.9")
UNUSED_PROXY = ProxyEndpoint(scheme="http", host="proxy.invalid", port=3128, addresses=("192.0.2.1",))
"""No test here dials it: a flow's SYN is what would."""


def _engine_on_socket_pair() -> tuple[socket.socket, socket.socket, engine_module.Engine]:
    """An engine reading one end of a SOCK_SEQPACKET pair (call inside a running loop)."""
    ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    engine = engine_module.Engine(Config(proxy=None), UNUSED_PROXY, ours.fileno())
    return ours, tun_side, engine


def _written(tun_side: socket.socket, vnet: bool = False) -> list[tuple]:
    """Every packet the engine wrote, parsed."""
    tun_side.setblocking(False)
    out = []
    while True:
        try:
            out.append(wire.parse(tun_side.recv(1 << 17), True, vnet))
        except BlockingIOError:
            return out


def _segment(sport: int, flags: int) -> bytes:
    return wire.build(4, SRC, DST, sport, 443, 1000, 5000, flags, 65535)


def test_a_failing_packet_is_counted_and_the_batch_goes_on(caplog):
    async def body() -> None:
        ours, tun_side, engine = _engine_on_socket_pair()
        real = engine.wire.build

        def build(family, src, dst, sport, dport, *args, **kwargs):
            if dport == 1111:  # the RST for the packet from port 1111
                raise RuntimeError("a bug in the stack")
            return real(family, src, dst, sport, dport, *args, **kwargs)

        # The engine is compiled (its methods cannot be patched): the bug goes into the
        # packet API it calls while it handles the packet.
        engine.wire = SimpleNamespace(**{**vars(engine.wire), "build": build})
        for sport in (1111, 2222, 1111, 3333):  # ACKs of no flow: each gets a RST
            tun_side.send(_segment(sport, wire.ACK))
        engine._on_readable()
        resets = _written(tun_side)
        assert sorted(r[4] for r in resets) == [2222, 3333]  # RSTs to the healthy ones
        assert all(r[7] & wire.RST for r in resets)
        assert engine.stats["packet_errors"] == 2
        ours.close()
        tun_side.close()

    with caplog.at_level("ERROR", logger="proxyvpn.aio"):
        asyncio.run(body())
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1, "logged once, then only counted"


# ---------------------------------------------------------------- ACK coalescing

def _ack(sport: int = 40000, seq: int = 5000, ack: int = 100, flags: int = wire.ACK,
         payload: bytes = b"") -> tuple:
    return wire.parse(wire.build(4, SRC, DST, sport, 443, seq, ack, flags, 65535, payload))


@pytest.mark.parametrize("a, b, superseded", [
    (_ack(ack=100), _ack(ack=200), True),
    (_ack(ack=0xFFFFFFF0), _ack(ack=0x10), True),  # across the wrap
    (_ack(ack=100), _ack(ack=100, flags=wire.ACK | wire.PSH, payload=b"x"), False),  # same ACK
    (_ack(ack=100), _ack(ack=200, flags=wire.ACK | wire.PSH, payload=b"x"), True),  # data, more
    (_ack(ack=100), _ack(ack=100), False),  # a duplicate ACK counts (RFC 5681)
    (_ack(ack=200), _ack(ack=100), False),  # older
    (_ack(ack=100), _ack(ack=0x80000064), False),  # half the space ahead: not "more"
    (_ack(ack=100, flags=wire.ACK | wire.PSH, payload=b"x"), _ack(ack=200), False),  # a has data
    (_ack(ack=100, flags=wire.ACK | wire.FIN), _ack(ack=200), False),  # a has a FIN
    (_ack(ack=100), _ack(ack=200, flags=wire.RST | wire.ACK), False),
    (_ack(ack=100), _ack(ack=200, flags=wire.SYN | wire.ACK), False),
    (_ack(ack=100), _ack(ack=200, sport=40001), False),  # another flow
    (_ack(ack=100), _ack(ack=200, seq=5001), False),  # another receive point
    (_ack(ack=100), 3, False),  # b was dropped by parse()
])
def test_which_pure_acks_the_next_packet_supersedes(a, b, superseded):
    assert engine_module._superseded(a, b) is superseded


def _segments(lab: hotpath.Lab, nbytes: int) -> list[tuple[int, int]]:
    lab.flow.tunnel_data(bytes(nbytes))
    segs = [s for s in lab.drain() if s[1] > 0]
    assert len(segs) >= 3
    return segs


def _run_lab(body) -> None:
    async def main() -> None:
        lab = hotpath.Lab(pure=False)
        try:
            body(lab)
        finally:
            lab.close()
    asyncio.run(main())


@pytest.mark.parametrize("batched", [True, False])
def test_a_batch_of_acks_ends_where_acking_one_by_one_does(batched):
    """Only the last of a read batch's cumulative ACKs is processed, and the flow ends up
    where processing each would have left it: all acknowledged, the last window."""
    def body(lab: hotpath.Lab) -> None:
        segs = _segments(lab, 200_000)
        windows = [0xFFFF - i for i in range(len(segs))]
        for (seq, n), window in zip(segs, windows, strict=True):
            lab.app_send(b"", (seq + n) & 0xFFFFFFFF, window=window)
            if not batched:
                lab.engine._on_readable()
        lab.engine._on_readable()
        conn = lab.flow.conn
        assert conn.send_queued == 0 and conn.snd_una == conn.snd_max
        assert conn.snd_wnd == windows[-1] << 7
        assert conn.cwnd == 10 * conn.send_mss + sum(n for _, n in segs), \
            "slow start grows by every ACK the app sent, coalesced or not"
        assert lab.engine.stats["acks_coalesced"] == (len(segs) - 1 if batched else 0)
        assert lab.engine.stats["packets_in"] >= len(segs)  # skipped ones are counted in
    _run_lab(body)


def test_duplicate_acks_in_one_batch_still_start_fast_retransmit():
    def body(lab: hotpath.Lab) -> None:
        segs = _segments(lab, 200_000)
        first_end = (segs[0][0] + segs[0][1]) & 0xFFFFFFFF
        for _ in range(4):  # the ACK of segment 1, then three duplicates of it
            lab.app_send(b"", first_end)
        lab.engine._on_readable()
        assert lab.engine.stats["acks_coalesced"] == 0
        resent = [s for s in lab.drain() if s[1] > 0]
        assert resent and resent[0][0] == first_end, "segment 2 is sent again at once"
        assert lab.flow.conn.retransmits == 1
    _run_lab(body)


def test_in_fast_recovery_every_ack_is_processed():
    """RFC 6582: each partial ACK retransmits the next hole and deflates the window by
    itself, so none is coalesced."""
    def body(lab: hotpath.Lab) -> None:
        segs = _segments(lab, 300_000)
        ends = [(seq + n) & 0xFFFFFFFF for seq, n in segs]
        for _ in range(4):  # the ACK of segment 1, three duplicates: fast recovery
            lab.app_send(b"", ends[0])
        lab.engine._on_readable()
        lab.drain()
        lab.app_send(b"", ends[1])  # two partial ACKs in one batch
        lab.app_send(b"", ends[2])
        lab.engine._on_readable()
        assert lab.engine.stats["acks_coalesced"] == 0
        assert lab.flow.conn.retransmits == 2  # segment 2, then the hole after the batch
    _run_lab(body)


@pytest.mark.parametrize("payload", [b"", b"upload"])
def test_the_sack_blocks_of_an_ack_reach_the_flow(payload):
    """An ACK whose SACK option shows the app holding segments 3-5 (but not 2): segment 2
    is lost (RFC 6675 IsLost) and resent at once, no duplicate ACKs needed; on a pure
    ACK or on the app's own data alike."""
    def body(lab: hotpath.Lab) -> None:
        segs = _segments(lab, 400_000)
        ends = [(seq + n) & 0xFFFFFFFF for seq, n in segs]
        lab.app_send(b"", ends[0])
        lab.app_send(payload, ends[0], window=0xFFF0, sack=(segs[2][0], ends[4]))
        lab.engine._on_readable()
        resent = [s for s in lab.drain() if s[1] > 0]
        assert resent and resent[0][0] == segs[1][0]
        assert lab.flow.conn.retransmits == 1
        assert lab.engine.snapshot_stats()["retransmits"] == 1
        assert lab.engine.stats["acks_with_sack"] == 1
    _run_lab(body)


def test_a_malformed_sack_option_is_counted_and_its_ack_still_taken():
    def body(lab: hotpath.Lab) -> None:
        segs = _segments(lab, 400_000)
        ends = [(seq + n) & 0xFFFFFFFF for seq, n in segs]
        raw = bytearray(lab.wire.build(
            4, hotpath.APP, hotpath.DST, hotpath.APP_PORT, hotpath.DST_PORT, lab.app_seq,
            ends[0], wire.ACK, hotpath.WINDOW, tsval=lab.ts, tsecr=1,
            sack=(segs[2][0], ends[4]), gso_size=0))
        # Half a block: a SACK length of 6 (no 2 + 8n), the rest NOPs. The checksum is
        # partial (vnet), so it is not verified, and parse() takes the option list.
        i = raw.index(bytes((1, 1, 5, 10)))
        raw[i + 3] = 6
        raw[i + 8 : i + 12] = b"\x01" * 4
        lab.tun.send(bytes(raw))
        lab.engine._on_readable()
        assert not [k for k in lab.engine.stats if k.startswith("drop_")]
        conn = lab.flow.conn
        assert lab.engine.stats["bad_sack_options"] == 1
        assert conn.snd_una == (ends[0] - conn.iss) & 0xFFFFFFFF  # the ACK counted
        assert conn.retransmits == 0  # the blocks did not
    _run_lab(body)


def test_acks_of_no_flow_each_get_their_reset():
    async def body() -> None:
        ours, tun_side, engine = _engine_on_socket_pair()
        tun_side.send(wire.build(4, SRC, DST, 2222, 443, 1000, 5000, wire.ACK, 65535))
        tun_side.send(wire.build(4, SRC, DST, 2222, 443, 1000, 6000, wire.ACK, 65535))
        engine._on_readable()
        assert engine.stats["resets_sent"] == 2 and engine.stats["acks_coalesced"] == 0
        ours.close()
        tun_side.close()
    asyncio.run(body())


def test_a_packet_that_parse_fails_on_costs_that_packet_only(monkeypatch):
    async def body() -> None:
        ours, tun_side, engine = _engine_on_socket_pair()
        real = engine.wire

        class Wire:
            def __getattr__(self, name: str):
                return getattr(real, name)

            def parse(self, packet: bytes, verify_checksum: bool = True, vnet: bool = False):
                result = real.parse(packet, verify_checksum, vnet)
                if result[3] == 1111:
                    raise RuntimeError("a bug in parse")
                return result

        monkeypatch.setattr(engine, "wire", Wire())
        for sport in (1111, 2222, 3333):
            tun_side.send(_segment(sport, wire.ACK))
        engine._on_readable()
        resets = _written(tun_side)
        assert sorted(r[4] for r in resets) == [2222, 3333]
        assert engine.stats["packet_errors"] == 1
        ours.close()
        tun_side.close()
    asyncio.run(body())


# ---------------------------------------------------------------- the proxy's FIN


@pytest.mark.parametrize("with_the_data", [True, False])
def test_a_reply_that_came_with_the_proxys_fin_goes_out_in_one_segment(with_the_data):
    """tunnel_data(last=True): the FIN rides on the reply's segment, one TUN write;
    the FIN told apart (tunnel_eof) costs a second segment."""
    def body(lab: hotpath.Lab) -> None:
        reply = b"r" * 100
        lab.drain()
        if with_the_data:
            lab.flow.tunnel_data(reply, last=True)
        else:
            lab.flow.tunnel_data(reply)
            lab.flow.tunnel_eof()
            lab.engine._scheduled_transmit()
        packets = _written(lab.tun, vnet=True)
        flags = [p[7] for p in packets]
        payloads = [p[10] - p[9] for p in packets]
        if with_the_data:
            assert len(packets) == 1 and flags[0] & wire.FIN and payloads == [100]
        else:
            assert len(packets) == 2 and not flags[0] & wire.FIN and flags[1] & wire.FIN
            assert payloads == [100, 0]
        assert lab.flow.conn.state.name == "FIN_WAIT_1"
    _run_lab(body)


# ---------------------------------------------------------------- segments over 64 KiB

V6_SRC, V6_DST = (socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::2", "fd00::9"))


@pytest.mark.parametrize("family", [4, 6])
def test_a_refused_write_over_64_kib_ends_large_segments_and_the_batch_goes_on(caplog, family):
    """A kernel that refuses a GSO packet over 64 KiB (here a SOCK_SEQPACKET socket whose
    send buffer is too small for it: EMSGSIZE, a real refusal) costs that packet only:
    the packets around it are written, and no segment that large is made again, in
    either family (the skb the kernel could not allocate is the same)."""
    src, dst = (SRC, DST) if family == 4 else (V6_SRC, V6_DST)

    async def body() -> None:
        ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 100_000)  # the kernel doubles it
        tun_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        engine = engine_module.Engine(Config(proxy=None), UNUSED_PROXY, ours.fileno(),
                                      vnet=True, big_ipv4=True, big_ipv6=True)
        assert engine.segment_limit(4) == engine.segment_limit(6) == BIG_SEGMENTS
        # The largest plain packets of the family.
        small = [wire.build(family, dst, src, 443, 40000, 1, 1, wire.ACK, 100,
                            b"s" * (0xFFFF - 20 - (20 if family == 4 else 0)), gso_size=1448)
                 for _ in range(2)]
        big = wire.build(family, dst, src, 443, 40000, 1, 1, wire.ACK, 100, b"b" * 250_000,
                         gso_size=1448)
        engine._write([small[0], (big[:100], big[100:]), small[1]])
        got = []
        while True:
            try:
                got.append(tun_side.recv(1 << 19))
            except BlockingIOError:
                break
            tun_side.setblocking(False)
        assert got == small
        assert not engine.big_ipv4 and not engine.big_ipv6
        assert engine.segment_limit(4) == engine.segment_limit(6) == 1
        assert (engine.stats["tun_big_refused"], engine.stats["tun_write_errors"]) == (1, 1)
        engine._write([big])  # refused again: counted, nothing more to switch off
        assert (engine.stats["tun_big_refused"], engine.stats["tun_write_errors"]) == (1, 2)
        ours.close()
        tun_side.close()

    with caplog.at_level("WARNING", logger="proxyvpn.aio"):
        asyncio.run(body())
    assert [r.getMessage() for r in caplog.records] == [
        f"the kernel refused a {250_050 if family == 4 else 250_078}-byte TUN write: "
        "segments of at most 64 KiB from now on"]  # IPv6: 20 more header, 8 Hop-by-Hop


def test_a_write_error_that_is_no_refusal_of_size_keeps_large_segments():
    """EIO, EBADF and the like are the device going, not a packet too large: the batch is
    dropped and counted once, as before, and large segments stay on."""
    async def body() -> None:
        ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # room for the big one
        engine = engine_module.Engine(Config(proxy=None), UNUSED_PROXY, ours.fileno(),
                                      vnet=True, big_ipv4=True)
        tun_side.close()  # the reader is gone: EPIPE (a real error, not about size)
        big = wire.build(4, DST, SRC, 443, 40000, 1, 1, wire.ACK, 100, b"b" * 250_000,
                         gso_size=1448)
        small = wire.build(4, DST, SRC, 443, 40000, 1, 1, wire.ACK, 100, b"s", gso_size=1448)
        engine._write([big, small, small])
        assert engine.big_ipv4
        assert (engine.stats["tun_write_errors"], engine.stats["tun_big_refused"]) == (1, 0)
        ours.close()

    asyncio.run(body())


def test_a_refused_plain_ipv6_packet_of_64_kib_is_no_refusal_of_large_segments():
    """IPv6 does not count its 40-byte header in the length field, so its largest plain
    packet is 65,585 bytes with the vnet header: refused, it is a write error (the batch
    dropped, counted once), not a reason to end large segments."""
    async def body() -> None:
        ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 20_000)  # too small for it
        engine = engine_module.Engine(Config(proxy=None), UNUSED_PROXY, ours.fileno(),
                                      vnet=True, big_ipv4=True, big_ipv6=True)
        plain = wire.build(6, V6_DST, V6_SRC, 443, 40000, 1, 1, wire.ACK, 100,
                           b"p" * (0xFFFF - 20), gso_size=1448)
        assert len(plain) == 10 + 40 + 0xFFFF
        engine._write([plain])
        assert (engine.stats["tun_write_errors"], engine.stats["tun_big_refused"]) == (1, 0)
        assert engine.segment_limit(4) == engine.segment_limit(6) == BIG_SEGMENTS
        ours.close()
        tun_side.close()

    asyncio.run(body())


def test_each_family_gets_large_segments_where_its_kernel_takes_them():
    """New flows of a family get BIG_SEGMENTS where the TUN said that family takes them,
    and only with the vnet header (the GSO packet is described in it)."""
    async def body() -> None:
        ours, tun_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for vnet, big4, big6 in itertools.product((True, False), repeat=3):
            engine = engine_module.Engine(Config(proxy=None), UNUSED_PROXY, ours.fileno(),
                                          vnet=vnet, big_ipv4=big4, big_ipv6=big6)
            assert (engine.segment_limit(4), engine.segment_limit(6)) == (
                BIG_SEGMENTS if vnet and big4 else 1, BIG_SEGMENTS if vnet and big6 else 1)
        ours.close()
        tun_side.close()

    asyncio.run(body())


# ---------------------------------------------------------------- TIME-WAIT


def _app_segment(lab: hotpath.Lab, flags: int, ack: int, seq: int | None = None) -> None:
    """One bare segment from the app into the "TUN" (at its next sequence number)."""
    lab.ts += 1
    lab.tun.send(lab.wire.build(4, hotpath.APP, hotpath.DST, hotpath.APP_PORT, hotpath.DST_PORT,
                                lab.app_seq if seq is None else seq, ack, flags, hotpath.WINDOW,
                                tsval=lab.ts, tsecr=1, gso_size=0))


def _established_flow(engine: engine_module.Engine, port: int) -> Flow:
    """A second flow, made ESTABLISHED by hand (as hotpath.Lab makes its own)."""
    now = engine._loop.time()
    conn = TcpConnection(engine.params, iss=7, irs=hotpath.APP_ISN, peer_window=hotpath.WINDOW,
                         peer_mss=engine.params.mss, peer_wscale=7, now=now)
    flow = Flow(engine, (hotpath.APP, port, hotpath.DST, hotpath.DST_PORT), 4, conn, "10.9.9.9",
                hotpath.DST_PORT)
    engine.flows[flow.key] = flow
    flow.attach(hotpath.Sink())  # type: ignore[arg-type]
    conn.accept(now)
    conn.segments_to_send(now)  # the SYN-ACK
    conn.receive(hotpath.APP_ISN + 1, 8, wire.ACK, hotpath.WINDOW, b"", now)
    assert conn.state.name == "ESTABLISHED"
    return flow


def _into_time_wait(lab: hotpath.Lab) -> tuple:
    """The proxy's reply and FIN, then the app's FIN: our end of the flow in TIME-WAIT.
    Returns the packet that acknowledged the app's FIN."""
    lab.drain()
    lab.flow.tunnel_data(b"r" * 100, last=True)
    (reply,) = _written(lab.tun, vnet=True)
    assert reply[7] & wire.FIN
    _app_segment(lab, wire.ACK | wire.FIN, (reply[5] + 100 + 1) & 0xFFFFFFFF)
    lab.engine._on_readable()
    (ack,) = _written(lab.tun, vnet=True)
    return ack


@pytest.mark.usefixtures("collector_off")
def test_a_flow_in_time_wait_is_let_go_and_its_record_answers():
    """A server that closes first leaves our end in TIME-WAIT for 2 s. The engine keeps
    only the record: the flow and its TCP state are freed at once (by reference counting:
    no --max-flows slot, no 2 s of their memory), and the app's FIN sent again (our ACK
    was lost) still gets the same ACK."""
    def body(lab: hotpath.Lab) -> None:
        engine, key = lab.engine, lab.flow.key
        # Another flow with data in flight, whose retransmission timer comes first: the
        # one going into TIME-WAIT then has a timer entry below the top of the heap.
        other = _established_flow(engine, hotpath.APP_PORT + 1)
        other.tunnel_data(b"x" * 100)
        _written(lab.tun, vnet=True)
        ack = _into_time_wait(lab)
        assert ack[7] == wire.ACK and ack[6] == (lab.app_seq + 1) & 0xFFFFFFFF
        stats = engine.snapshot_stats()
        assert (stats["flows_active"], stats["flows_time_wait"], stats["flows_closed"]) == (1, 1, 1)
        lab.flow = lab.sink.flow = None  # the test's own references
        alive = [type(o) for o in gc.get_objects() if type(o) in (Flow, TcpConnection)]
        assert alive.count(Flow) == alive.count(TcpConnection) == 1, alive  # the other's
        _app_segment(lab, wire.ACK | wire.FIN, ack[5])  # the FIN again
        engine._on_readable()
        (again,) = _written(lab.tun, vnet=True)
        assert again[5:8] == ack[5:8] and again[14] >= ack[14]  # seq, ack, flags; TSval
        assert engine.snapshot_stats()["flows_time_wait"] == 1
        engine._time_wait[key].deadline = 0.0  # the wait is over
        engine._on_timer()
        assert engine.snapshot_stats()["flows_time_wait"] == 0
        _app_segment(lab, wire.ACK | wire.FIN, ack[5])  # now a segment of no connection
        engine._on_readable()
        (rst,) = _written(lab.tun, vnet=True)
        assert rst[7] & wire.RST
    _run_lab(body)


def test_an_exact_reset_ends_time_wait():
    def body(lab: hotpath.Lab) -> None:
        ack = _into_time_wait(lab)
        _app_segment(lab, wire.RST, 0, seq=ack[6])
        lab.engine._on_readable()
        assert _written(lab.tun, vnet=True) == []  # a RST is never answered
        assert lab.engine.snapshot_stats()["flows_time_wait"] == 0
    _run_lab(body)
