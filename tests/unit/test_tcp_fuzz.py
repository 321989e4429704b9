"""Fuzzing the TCP state machine with arbitrary segments, calls and timer firings.

Whatever the app sends, the connection must never raise, must stay in a valid
state, keep its memory bounds, report Closed exactly once, and never deliver or
send a byte that is not the right byte of its stream. To check the last point the
app's "stream" is a fixed pattern indexed by position, so any payload the fuzzer
builds for any sequence number is consistent with every other.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from proxyvpn.netstack.events import Closed, DataReceived, PeerClosed
from proxyvpn.netstack.seq import SEQ_MASK, seq_unwrap
from proxyvpn.netstack.tcp import (
    _SEND_STATES,
    ACK,
    FIN,
    RST,
    SYN,
    TcpConnection,
    TcpParams,
    TcpState,
)

_PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(256 * 1024))


def app_bytes(p: int, n: int) -> bytes:
    """The app's stream at positions p..p+n (1 = first byte); periodic, any p."""
    out = bytearray()
    while n > 0:
        off = p % len(_PATTERN)
        chunk = _PATTERN[off : off + n]
        out += chunk
        p += len(chunk)
        n -= len(chunk)
    return bytes(out)


class Harness:
    """A connection plus everything needed to check it after each step."""

    def __init__(
        self,
        params: TcpParams,
        iss: int,
        irs: int,
        window: int,
        mss: int,
        wscale: int,
        tsval: int = -1,
        sack: bool = False,
    ) -> None:
        self.params = params
        self.sack = sack
        self.sacks = 0
        self.dsacks = 0
        """SACK options checked, and D-SACK blocks among them."""
        self.blocks_in = 0
        """SACK blocks of ours that the fuzzer's ACKs carried."""
        self.now = 1000.0
        self.ts = tsval >= 0
        self.app_tsvals = {tsval}
        """Every TSval the app sent: the only values a TSecr of ours may echo."""
        self.conn = TcpConnection(
            params,
            iss=iss,
            irs=irs,
            peer_window=window,
            peer_mss=mss,
            peer_wscale=wscale,
            peer_sack_permitted=sack,
            now=self.now,
            peer_tsval=tsval,
        )
        self.delivered = bytearray()
        self.closed_events = 0
        self.peer_closed = False
        self.ours = bytearray()  # everything send() accepted, position 1 onwards
        self.smss = self.conn.send_mss

    # -- inputs
    def segment(
        self, seq: int, ack: int, flags: int, window: int, n: int, tsval: int = -1, tsecr: int = 0,
        sack: tuple[int, ...] = (),
    ) -> None:
        c = self.conn
        p = seq_unwrap(seq, c.rcv_nxt, c.irs) + (1 if flags & SYN else 0)
        self.app_tsvals.add(tsval)
        self.blocks_in += len(sack) // 2
        c.receive(seq, ack, flags, window, memoryview(app_bytes(p, n)), self.now, tsval, tsecr,
                  sack)
        self.drain()

    def near(
        self, dseq: int, dack: int, flags: int, window: int, n: int, tsval: int = -1,
        tsecr: int = 0, sack: tuple[int, ...] = (),
    ) -> None:
        """A segment at RCV.NXT + dseq acknowledging SND.UNA + dack; ``sack``: block
        edges as offsets from SND.UNA too."""
        c = self.conn
        seq = (c.irs + c.rcv_nxt + dseq) & SEQ_MASK
        ack = (c.iss + c.snd_una + dack) & SEQ_MASK
        edges = tuple((c.iss + c.snd_una + e) & SEQ_MASK for e in sack)
        self.segment(seq, ack, flags, window, n, tsval, tsecr, edges)

    def send(self, n: int) -> None:
        start = len(self.ours)
        data = bytes((start + i) * 7 & 0xFF for i in range(n))
        took = self.conn.send(data)
        assert 0 <= took <= n
        self.ours += data[:took]

    def tick(self, dt: float) -> None:
        self.now += dt
        t = self.conn.next_timer()
        if t is not None and t <= self.now:
            self.conn.handle_timer(self.now)
        self.drain()

    def flush(self) -> None:
        c = self.conn
        for s in c.segments_to_send(self.now):
            seq, ack, flags, window, payload, mss, wscale, sack_ok, tsval, tsecr, sack = s
            assert 0 <= seq <= SEQ_MASK and 0 <= ack <= SEQ_MASK
            assert 0 <= window <= 0xFFFF
            assert flags & ~(FIN | SYN | RST | 0x08 | ACK) == 0
            assert sack_ok == bool(flags & SYN and self.sack)
            if sack:
                assert self.sack and flags == ACK and not payload
                self.check_sack(sack)
            # RFC 7323 §3.2: once negotiated, on every non-RST segment; never otherwise.
            if self.ts and not flags & RST:
                assert 0 <= tsval <= SEQ_MASK and tsecr in self.app_tsvals
            else:
                assert (tsval, tsecr) == (-1, 0)
            if flags & SYN:
                assert flags == SYN | ACK and seq == c.iss and not payload
                assert mss == self.params.mss
            else:
                assert (mss, wscale) == (0, -1)
            if flags & RST:
                assert not payload
                continue
            assert len(payload) <= self.smss
            if payload:
                p = (seq - c.iss) & SEQ_MASK
                assert bytes(payload) == bytes(self.ours[p - 1 : p - 1 + len(payload)])
        # Liveness: whatever is outstanding is covered by the retransmission timer or,
        # against a closed window, by the persist timer (never only the idle timeout).
        if c.state in _SEND_STATES and c.snd_max > c.snd_una:
            assert c._rtx_deadline is not None or c._persist_deadline is not None, c
        self.drain()

    def held_runs(self) -> list[tuple[int, int]]:
        """The held pieces merged into maximal ranges."""
        c = self.conn
        runs: list[tuple[int, int]] = []
        for start, data in zip(c._ooo_starts, c._ooo_data, strict=True):
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + len(data))
            else:
                runs.append((start, start + len(data)))
        return runs

    def check_sack(self, edges: tuple[int, ...]) -> None:
        """RFC 2018 §4 / RFC 2883: every block is a held range as a whole (one ending at a
        held FIN covers the FIN too), except that the first may be a D-SACK block: data
        already delivered, or inside the block after it. No range twice, except as the
        D-SACK pair; 3 blocks at most beside timestamps, else 4."""
        c = self.conn
        self.sacks += 1
        assert len(edges) % 2 == 0 and 2 <= len(edges) <= (6 if self.ts else 8)
        blocks = [((edges[i] - c.irs) & SEQ_MASK, (edges[i + 1] - c.irs) & SEQ_MASK)
                  for i in range(0, len(edges), 2)]
        fin = c._ooo_fin
        runs = [(lo, hi + 1 if hi == fin else hi) for lo, hi in self.held_runs()]
        first, *rest = blocks
        assert first[0] < first[1]
        if first not in runs or rest[:1] == [first]:  # D-SACK
            assert first[0] >= 1 and (
                first[1] <= c.rcv_nxt or (rest and rest[0][0] <= first[0] < first[1] <= rest[0][1])
            ), (first, rest, c.rcv_nxt)
            self.dsacks += 1
        else:
            rest = blocks
        assert len(set(rest)) == len(rest)
        for block in rest:
            assert block in runs, (block, runs)

    def drain(self) -> None:
        while (e := self.conn.next_event()) is not None:
            assert self.closed_events == 0, f"event {e} after Closed"
            if isinstance(e, DataReceived):
                assert e.data
                assert not self.peer_closed, "data after the app's FIN"
                self.delivered += e.data
            elif isinstance(e, PeerClosed):
                assert not self.peer_closed
                self.peer_closed = True
            elif isinstance(e, Closed):
                self.closed_events += 1

    # -- the properties
    def check(self) -> None:
        c = self.conn
        p = self.params
        assert isinstance(c.state, TcpState)
        assert c.send_queued <= p.snd_buf
        assert 0 <= c.ooo_bytes <= p.max_ooo_bytes  # type: ignore[operator]
        # White-box: held pieces sorted, disjoint, all beyond RCV.NXT, bytes counted.
        starts, datas = c._ooo_starts, c._ooo_data
        assert sum(map(len, datas)) == c.ooo_bytes
        for i, (s, d) in enumerate(zip(starts, datas, strict=True)):
            assert d and s > c.rcv_nxt
            assert d == app_bytes(s, len(d))
            if i + 1 < len(starts):
                assert s + len(d) <= starts[i + 1]
        if self.sack:  # the SACK runs are the pieces merged
            assert list(zip(c._run_lo, c._run_hi, strict=True)) == self.held_runs()
        # The sender's scoreboard: disjoint ranges (touching ones merged) of what we sent,
        # above SND.UNA, bounded.
        sb = list(zip(c._sb_lo, c._sb_hi, strict=True))
        assert len(sb) <= 256
        for i, (lo, hi) in enumerate(sb):
            assert c.snd_una < lo < hi <= c.snd_max, (sb, c)
            if i + 1 < len(sb):
                assert hi < sb[i + 1][0], sb
        if not self.sack:
            assert not sb
        # The log of resent holes (lost-resend detection): ascending, unacknowledged.
        ends = c._rtx_ends
        assert len(ends) == len(c._rtx_marks) <= 512
        assert all(c.snd_una < e for e in ends) and ends == sorted(set(ends)), (ends, c)
        if c._ooo_fin >= 0:  # a FIN seen out of order bounds everything held
            assert c._ooo_fin > c.rcv_nxt
            assert not starts or starts[-1] + len(datas[-1]) <= c._ooo_fin
        assert c.snd_una <= c.snd_nxt <= c.snd_max
        assert bytes(self.delivered) == app_bytes(1, len(self.delivered))
        assert c.bytes_in == len(self.delivered)
        assert self.closed_events <= 1
        if c.state is TcpState.CLOSED:
            assert self.closed_events == 1
            assert c.next_timer() is None
            assert c.send_queued == 0 and c.ooo_bytes == 0
        else:
            assert c.next_timer() is not None


u32 = st.integers(0, SEQ_MASK)
flag_sets = st.sampled_from(
    [ACK, ACK, ACK, ACK | FIN, ACK | 0x08, RST, RST | ACK, SYN, SYN | ACK, FIN, 0, SYN | FIN | RST]
) | st.integers(0, 0x3F)
small_window = st.integers(0, 0xFFFF)


class TcpFuzz(RuleBasedStateMachine):
    """Arbitrary interleavings of segments and API calls."""

    h: Harness

    @initialize(
        mss=st.sampled_from([1, 100, 536, 1460]),
        rcv_buf=st.sampled_from([1, 1000, 5000, 70000]),
        snd_buf=st.sampled_from([1, 3000, 20000]),
        max_ooo=st.sampled_from([None, 0, 700]),
        wscale=st.sampled_from([-1, 0, 3, 14, 15]),
        peer_mss=st.sampled_from([0, 1, 200, 1460]),
        window=small_window,
        iss=u32,
        irs=u32,
        accept=st.booleans(),
        tsval=st.just(-1) | u32,
        sack=st.booleans(),
    )
    def setup(
        self,
        mss: int,
        rcv_buf: int,
        snd_buf: int,
        max_ooo: int | None,
        wscale: int,
        peer_mss: int,
        window: int,
        iss: int,
        irs: int,
        accept: bool,
        tsval: int,
        sack: bool,
    ) -> None:
        params = TcpParams(
            mss=mss,
            rcv_buf=rcv_buf,
            snd_buf=snd_buf,
            max_ooo_bytes=max_ooo,
            max_retransmits=4,
            syn_ack_retries=2,
            idle_timeout=300.0,
            time_wait=1.0,
            persist_max=20.0,
        )
        self.h = Harness(params, iss, irs, window, peer_mss, wscale, tsval, sack)
        if accept:
            self.h.conn.accept(self.h.now)
            self.h.flush()

    @rule(
        dseq=st.integers(-3000, 80000) | st.sampled_from([0, 0, 0, -1, 1]),
        dack=st.integers(-3000, 5000) | st.sampled_from([0, 0, 1]),
        flags=flag_sets,
        window=small_window,
        n=st.integers(0, 3000) | st.sampled_from([0, 0, 1]),
        tsval=st.just(-1) | u32,
        tsecr=u32,
        sack=st.lists(st.integers(-3000, 40000), max_size=8).map(tuple),
    )
    def segment_near(
        self, dseq: int, dack: int, flags: int, window: int, n: int, tsval: int, tsecr: int,
        sack: tuple[int, ...],
    ) -> None:
        self.h.near(dseq, dack, flags, window, n, tsval, tsecr, sack)

    @rule(
        seq=u32, ack=u32, flags=flag_sets, window=small_window, n=st.integers(0, 2000),
        tsval=st.just(-1) | u32, tsecr=u32,
    )
    def segment_anywhere(
        self, seq: int, ack: int, flags: int, window: int, n: int, tsval: int, tsecr: int
    ) -> None:
        self.h.segment(seq, ack, flags, window, n, tsval, tsecr)

    @rule(window=small_window, dack=st.integers(0, 20000))
    def ack_our_data(self, window: int, dack: int) -> None:
        c = self.h.conn
        ack_to = min(c.snd_una + dack, c.snd_max)
        self.h.near(0, ack_to - c.snd_una, ACK, window, 0)

    @rule(n=st.integers(0, 30000))
    def send(self, n: int) -> None:
        self.h.send(n)

    @rule(n=st.integers(-5, 200000))
    def receive_space(self, n: int) -> None:
        self.h.conn.set_receive_space(n)

    @rule(dt=st.sampled_from([0.0, 0.01, 0.2, 1.0, 5.0, 60.0, 400.0]))
    def tick(self, dt: float) -> None:
        self.h.tick(dt)

    @rule()
    def flush(self) -> None:
        self.h.flush()

    @precondition(lambda self: self.h.conn.state is TcpState.LISTEN)
    @rule(ok=st.booleans())
    def decide(self, ok: bool) -> None:
        if ok:
            self.h.conn.accept(self.h.now)
        else:
            self.h.conn.refuse(self.h.now)
        self.h.drain()

    @rule()
    def close(self) -> None:
        self.h.conn.close(self.h.now)
        self.h.drain()

    @precondition(lambda self: random.random() < 0.1)
    @rule()
    def abort(self) -> None:
        self.h.conn.abort(self.h.now)
        self.h.drain()

    @invariant()
    def valid(self) -> None:
        if hasattr(self, "h"):
            self.h.check()


TestTcpFuzz = TcpFuzz.TestCase
TestTcpFuzz.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _random_session(rng: random.Random, seen: dict[str, int] | None = None) -> int:
    """One connection under up to a few hundred random operations, seeded.

    Returns how many operations ran before the connection closed; ``seen`` counts the
    SACK and D-SACK options it checked.
    """
    params = TcpParams(
        mss=rng.choice([1, 50, 1000]),
        rcv_buf=rng.choice([100, 3000, 100_000]),
        snd_buf=rng.choice([10, 5000]),
        max_ooo_bytes=rng.choice([None, 0, 2000]),
        max_retransmits=3,
        idle_timeout=50.0,
        time_wait=0.5,
        persist_max=5.0,
    )
    h = Harness(
        params,
        rng.getrandbits(32),
        rng.getrandbits(32),
        rng.randrange(0x10000),
        rng.choice([0, 100, 1460]),
        rng.choice([-1, 0, 7]),
        rng.choice([-1, rng.getrandbits(32)]),
        rng.random() < 0.5,
    )
    h.conn.accept(h.now)
    h.flush()
    # Complete the handshake most of the time so the synchronized states get covered.
    if rng.random() < 0.8:
        h.near(0, 1, ACK, rng.randrange(0x10000), 0)
    ops = 300
    for i in range(300):
        op = rng.random()
        c = h.conn
        if op < 0.45:
            # A plausible segment: near the edges, mostly ACK, some FIN/RST/SYN.
            flags = rng.choice([ACK] * 30 + [ACK | FIN] * 3 + [RST, SYN, ACK | RST, 0])
            dseq = rng.choice([0, 0, rng.randrange(-2000, 8000)])
            dack = rng.choice([0, c.snd_max - c.snd_una, rng.randrange(-100, 3000)])
            h.near(dseq, dack, flags, rng.randrange(0x10000), rng.choice([0, rng.randrange(3000)]),
                   rng.choice([-1, rng.getrandbits(32)]), rng.getrandbits(32),
                   _blocks(rng, c.snd_max - c.snd_una))
        elif op < 0.5:
            h.segment(
                rng.getrandbits(32),
                rng.getrandbits(32),
                rng.getrandbits(6),
                rng.randrange(0x10000),
                rng.randrange(500),
            )
        elif op < 0.65:
            h.send(rng.randrange(6000))
        elif op < 0.72:
            c.set_receive_space(rng.randrange(-10, 200_000))
        elif op < 0.85:
            h.flush()
        elif op < 0.97:
            h.tick(rng.choice([0.05, 0.3, 2.0, 20.0]))
        elif op < 0.99:
            c.close(h.now)
            h.drain()
        else:
            c.abort(h.now)
            h.drain()
        h.check()
        if seen is not None:
            seen["sack"] = seen.get("sack", 0) + h.sacks
            seen["dsack"] = seen.get("dsack", 0) + h.dsacks
            seen["blocks_in"] = seen.get("blocks_in", 0) + h.blocks_in
            h.sacks = h.dsacks = h.blocks_in = 0
        if c.state is TcpState.CLOSED:
            ops = i
            break
    if seen is not None:
        seen["sack_rtx"] = seen.get("sack_rtx", 0) + h.conn.sack_retransmits
    return ops


def _blocks(rng: random.Random, outstanding: int) -> tuple[int, ...]:
    """SACK edges for an ACK, as offsets from SND.UNA: none mostly; else 1-4 blocks,
    usually inside what is outstanding (plausible holes), sometimes anywhere."""
    if rng.random() < 0.6 or outstanding <= 1:
        return ()
    edges: list[int] = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.85:
            left = rng.randrange(1, outstanding)
            right = rng.randint(left + 1, outstanding)
        else:
            left, right = rng.randrange(-5000, 70000), rng.randrange(-5000, 70000)
        edges += (left, right)
    return tuple(edges)


def test_random_sessions_never_break_invariants() -> None:
    seen: dict[str, int] = {}
    ops = sum(_random_session(random.Random(seed), seen) for seed in range(400))
    assert ops > 400 * 25  # the sessions lived long enough to mean something
    assert seen["sack"] >= 20 and seen["dsack"] >= 5, seen  # the SACK checks ran (seeded: 37, 20)
    # ... and so did SACK recovery: blocks taken, holes resent (seeded: 1,955 and 17).
    assert seen["blocks_in"] >= 500 and seen["sack_rtx"] >= 10, seen
