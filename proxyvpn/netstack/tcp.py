"""Sans-IO TCP state machine for the passive side of one captured connection.

The peer is always the local Linux kernel (the app's socket) on the other side of
the TUN device. The engine feeds parsed segments in with :meth:`TcpConnection.receive`
and takes segments out with :meth:`TcpConnection.segments_to_send`; time is passed
in, never read, so every behaviour is testable without a kernel (aioquic, smoltcp).

What is implemented, by RFC:

- RFC 9293 §3.10 segment arrival processing, in its order: acceptability test,
  RST, SYN, ACK (SND.UNA / SND.WND with SND.WL1 / SND.WL2), text, FIN; every state
  from LISTEN (with the app's SYN pending while the proxy is dialled) to TIME-WAIT.
- RFC 5961: exact-match RST, challenge ACKs for in-window RSTs and for SYNs in
  synchronized states, the ACK acceptability range.
- RFC 7323 §2 window scaling and §3-4 timestamps (each only when the app offered
  it): every non-RST segment carries TSval/TSecr, TS.Recent follows the §4.3 rules,
  and an ACK's TSecr gives an RTT sample where Karn's algorithm has none (after a
  retransmission), so a loss episode does not leave either side's RTO backed off. The
  app's kernel needs our timestamps for the same reason: without them, an RTO on its
  side is followed by ever-doubling timeouts under sustained loss. No PAWS (§5): the
  peer is a local kernel, where no old duplicate survives a sequence-number wrap.
- RFC 2018 SACK as the receiver, when the app's SYN offered it: every pure ACK sent
  while out-of-order data is held reports it (the block of the latest arrival first,
  then the most recently reported ones), and RFC 2883 D-SACK reports a duplicate
  segment, so the app's kernel repairs several holes per round trip (RFC 6675,
  RACK-TLP) and detects its spurious retransmissions instead of backing off.
- RFC 6675 SACK-based loss recovery as the sender, with SACK on: the app's blocks on
  our data fill a scoreboard; recovery starts when it shows SND.UNA's segment lost
  (IsLost) or on the third duplicate ACK, and then every hole it shows lost is
  retransmitted, as far as the pipe estimate allows, instead of one per round trip.
  What the app holds never counts as in flight, so the first two duplicates each let
  a new segment go (as RFC 3042's limited transmit), and the go-back-N after a timeout
  skips it (RFC 6675 §5.1); after a second timeout in a row the blocks are forgotten,
  in case the app dropped what it held (reneging, RFC 2018 §8). A resend of the segment
  at SND.UNA counts as lost once the app SACKs data sent after it (RACK's inference,
  RFC 8985 §6.2, without its time window), so it goes again instead of waiting for
  the RTO; and SND.UNA's segment counts as lost, too few blocks for IsLost
  notwithstanding (a small window, the last segments), once data sent after it has
  been SACKed for a reordering window of SRTT/4 (RACK's idea; its per-segment clock
  and adaptive window are not implemented).
- RFC 6298 retransmission timer (SRTT/RTTVAR, Karn's algorithm, exponential
  back-off), RFC 5681 slow start / congestion avoidance with an initial window of
  10 segments (RFC 6928), fast retransmit on three duplicate ACKs with RFC 6582
  NewReno recovery (partial ACKs retransmit the next hole) when SACK is off.
- RFC 9293 §3.8.6.1 / RFC 1122 §4.2.2.17 zero-window probing with a backed-off
  persist timer; RFC 1122 §4.2.3.3/§4.2.3.4 silly window syndrome avoidance.

Sequence numbers are kept unwrapped: send-side positions count from ISS (the SYN is
position 0, the first data byte position 1), receive-side positions from IRS. They
are plain growing integers, so comparisons on the hot path are ordinary ``<``; the
32-bit wire values are produced only when a segment is built.
"""

from __future__ import annotations

import enum
import logging
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from proxyvpn.netstack.events import (
    Closed,
    ConnectionReset,
    DataReceived,
    Established,
    PeerClosed,
    SendSpaceAvailable,
    TcpEvent,
    TimedOut,
)
from proxyvpn.netstack.sendbuf import SendBuffer
from proxyvpn.netstack.seq import SEQ_HALF, SEQ_MASK, SEQ_MOD, seq_diff
from proxyvpn.netstack.wire import ACK, FIN, PSH, RST, SYN, URG

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "TS_OPTION_LEN",
    "Segment",
    "TcpConnection",
    "TcpParams",
    "TcpState",
    "reset_for",
]

log = logging.getLogger("proxyvpn.netstack")

_DEFAULT_MSS = 536
"""RFC 9293 §3.7.1: the send MSS to assume when the SYN carried no MSS option."""

_MAX_WSCALE = 14
"""RFC 7323 §2.3: larger shifts are treated as 14."""

_DUPTHRESH = 3
"""RFC 5681 §3.2: duplicate ACKs that trigger fast retransmit."""

_MAX_DUPACKS_PER_CALL = 16
"""Bound on the immediate duplicate ACKs queued between two segments_to_send calls."""

_MAX_OOO_SEGMENTS = 4096
"""Bound on the number of out-of-order pieces, whatever their size (memory overhead)."""

_MAX_SACK_RECENT = 4
"""Out-of-order arrivals remembered for the SACK option (at most 4 blocks fit)."""

_REO_WND_DEFAULT = 0.01
"""RACK's reordering window before any RTT sample (then SRTT/4)."""

_MAX_SACKED_RANGES = 256
"""Bound on the sender's scoreboard (disjoint SACKed ranges); beyond it the highest is
forgotten, which can only cost a needless retransmission."""

_MAX_CTL = 8
"""Bound on queued control RSTs (answers to bad ACKs in SYN-RECEIVED)."""

_CLOCK_GRANULARITY = 0.001
"""G in RFC 6298 §2: the engine's timers are event-loop timers, about 1 ms."""

TS_OPTION_LEN = 12
"""NOP NOP + the 10-byte Timestamps option: what each segment's payload gives up."""

_TS_HZ = 1000
"""Our timestamp clock ticks per second (RFC 7323 §5.4: 1 ms to 1 s per tick)."""


@dataclass(frozen=True, slots=True)
class TcpParams:
    """Tunables shared by all connections of an engine."""

    mss: int = 65495
    """Our MSS, sent on the SYN-ACK: a 65535-byte TUN MTU minus 40 bytes of headers."""
    rcv_buf: int = 4 * 1024 * 1024
    """Largest receive window we ever offer (bytes)."""
    snd_buf: int = 4 * 1024 * 1024
    """Most bytes queued towards the app, unsent plus unacknowledged."""
    wscale: int = 7
    """Our window shift; only used if the app offered window scaling (RFC 7323 §2)."""
    rto_initial: float = 1.0
    """RTO before any RTT sample (RFC 6298 §2.1), also the first SYN-ACK timeout."""
    rto_min: float = 0.2
    """Lower bound of the RTO; 0.2 s like Linux rather than RFC 6298's 1 s."""
    rto_max: float = 60.0
    """Upper bound of the backed-off RTO and persist interval (RFC 6298 §2.5)."""
    max_retransmits: int = 10
    """Consecutive RTO expiries tolerated before aborting with TimedOut and a RST."""
    syn_ack_retries: int = 5
    """SYN-ACK retransmissions before giving up on the handshake."""
    idle_timeout: float = 7200.0
    """Abort (RST) after this long without any segment from the app."""
    time_wait: float = 2.0
    """TIME-WAIT duration; short because the peer is the local kernel, not a WAN."""
    max_ooo_bytes: int | None = None
    """Bound on out-of-order bytes held for reassembly; None means ``rcv_buf``."""
    persist_max: float = 60.0
    """Give up zero-window probing after the app has not ACKed for this long."""
    sack: bool = True
    """Accept SACK (RFC 2018) when the app's SYN offers it: our ACKs then report the
    out-of-order data we hold, and the app's blocks on our data drive our loss recovery
    (RFC 6675)."""

    def __post_init__(self) -> None:
        """Validate, and resolve ``max_ooo_bytes`` to its default."""
        if self.max_ooo_bytes is None:
            object.__setattr__(self, "max_ooo_bytes", self.rcv_buf)
        if not 1 <= self.mss <= 0xFFFF:
            raise ValueError(f"mss must be in 1..65535, got {self.mss}")
        if not 0 <= self.wscale <= _MAX_WSCALE:
            raise ValueError(f"wscale must be in 0..14, got {self.wscale}")
        if self.rcv_buf < 1 or self.snd_buf < 1:
            raise ValueError("rcv_buf and snd_buf must be positive")
        if self.max_ooo_bytes is not None and self.max_ooo_bytes < 0:
            raise ValueError("max_ooo_bytes must not be negative")
        if not 0 < self.rto_min <= self.rto_initial <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_initial <= rto_max")
        if self.max_retransmits < 0 or self.syn_ack_retries < 0:
            raise ValueError("retry counts must not be negative")


class TcpState(enum.Enum):
    """Connection states, named as in RFC 9293 §3.3.2."""

    LISTEN = "LISTEN"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"


class Segment(NamedTuple):
    """One segment for the engine to put in a packet.

    A plain tuple underneath, unpackable as
    ``(seq, ack, flags, window, payload, mss, wscale, sack_permitted, tsval, tsecr, sack)``,
    the order of :func:`proxyvpn.netstack.wire.build`'s arguments.
    """

    seq: int
    """Sequence number (32-bit wire value)."""
    ack: int
    """Acknowledgment number (32-bit wire value); 0 when ACK is not set."""
    flags: int
    """Flag bits (FIN, SYN, RST, PSH, ACK)."""
    window: int
    """Window field, already right-shifted by our scale; at most 65535."""
    payload: bytes | memoryview
    """Segment text."""
    mss: int = 0
    """MSS option to include (SYN-ACK only), else 0."""
    wscale: int = -1
    """Window scale option to include (SYN-ACK only), else -1."""
    sack_permitted: bool = False
    """SACK-permitted option (SYN-ACK only, when the app's SYN offered it)."""
    tsval: int = -1
    """Timestamps option TSval (RFC 7323 §3), or -1 for no option."""
    tsecr: int = 0
    """Timestamps option TSecr: the TS.Recent echoed back."""
    sack: tuple[int, ...] = ()
    """SACK blocks (RFC 2018 §3, pure ACKs only): 32-bit wire edges, left and right in
    pairs, a D-SACK block (RFC 2883) first."""


_LISTEN = TcpState.LISTEN
_SYN_RECEIVED = TcpState.SYN_RECEIVED
_ESTABLISHED = TcpState.ESTABLISHED
_FIN_WAIT_1 = TcpState.FIN_WAIT_1
_FIN_WAIT_2 = TcpState.FIN_WAIT_2
_CLOSE_WAIT = TcpState.CLOSE_WAIT
_CLOSING = TcpState.CLOSING
_LAST_ACK = TcpState.LAST_ACK
_TIME_WAIT = TcpState.TIME_WAIT
_CLOSED = TcpState.CLOSED

# Tuples, not sets: set membership hashes the state, and Enum.__hash__ is a Python
# function (23 calls per connection in a cProfile of the cps bench); `in` on a tuple
# tests identity first, in C.
_RECV_TEXT_STATES = (_ESTABLISHED, _FIN_WAIT_1, _FIN_WAIT_2)
"""States that accept segment text and a FIN (RFC 9293 §3.10.7.4, seventh/eighth)."""

_SEND_STATES = (_ESTABLISHED, _CLOSE_WAIT, _FIN_WAIT_1, _CLOSING, _LAST_ACK)
"""States where data or our FIN may still be (re)transmitted."""

_QUEUE_STATES = (_LISTEN, _SYN_RECEIVED, _ESTABLISHED, _CLOSE_WAIT)
"""States where send() accepts data (before close())."""


def _range_add(los: list[int], his: list[int], lo: int, hi: int) -> None:
    """Merge [lo, hi) into the ascending disjoint ranges ``los``/``his``, joining any it
    touches or overlaps."""
    i = bisect_left(his, lo)  # the first range ending at or after lo
    j = bisect_right(los, hi)  # past the last range starting at or before hi
    if i < j:
        if los[i] < lo:
            lo = los[i]
        if his[j - 1] > hi:
            hi = his[j - 1]
    los[i:j] = [lo]
    his[i:j] = [hi]


def _drop_through(keys: list[int], values: list[int], a: int) -> None:
    """Drop the entries of the ascending ``keys`` (and of ``values`` beside them) that
    are at or below ``a``."""
    j = bisect_right(keys, a)
    if j:
        del keys[:j]
        del values[:j]


def reset_for(seq: int, ack: int, flags: int, payload_len: int) -> tuple[int, int, int] | None:
    """Answer a segment that matches no connection (RFC 9293 §3.10.7.1).

    Returns ``(seq, ack, flags)`` of the RST to send, or None for an incoming RST,
    which must never be answered (it would start a RST war).
    """
    if flags & RST:
        return None
    if flags & ACK:
        # <SEQ=SEG.ACK><CTL=RST>: the sender accepts it because it is exactly
        # what it expects next.
        return ack & SEQ_MASK, 0, RST
    seg_len = payload_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
    return 0, (seq + seg_len) & SEQ_MASK, RST | ACK


def _acceptable(off: int, seg_len: int, wnd: int) -> bool:
    """RFC 9293 §3.10.7.4's acceptability test, for a segment ``off`` bytes past RCV.NXT
    and a window of ``wnd``, with two Linux-like allowances: a segment at exactly RCV.NXT
    is taken even into a zero window (its ACK and a bare FIN are processed, its text is
    not), and a pure ACK may sit at the right edge (the app filled our window and some of
    its segments are in flight)."""
    if seg_len == 0:
        return 0 <= off <= wnd
    return off == 0 or (off < wnd and off + seg_len > 0)


def _ts_at(now: float, offset: int) -> int:
    """Our TSval at ``now``: a millisecond clock from a per-connection offset."""
    return (int(now * _TS_HZ) + offset) & SEQ_MASK


TW_DROP = 0
"""TimeWait.receive(): nothing to answer."""
TW_ACK = 1
"""TimeWait.receive(): answer with :meth:`TimeWait.ack`."""
TW_OVER = 2
"""TimeWait.receive(): the wait is over (an exact RST, or a new incarnation's SYN)."""


class TimeWait:
    """What a connection in TIME-WAIT still needs: a few numbers, not a TcpConnection.

    RFC 9293 §3.10.7.4 asks little of TIME-WAIT: re-acknowledge the app's retransmitted
    FIN (our last ACK was lost) and restart the wait, answer what is out of window with an
    ACK, end at an exact RST, and give way to a new incarnation's SYN (RFC 6191). Linux
    keeps such connections as small inet_timewait_socks for the same reason: a server
    closing first holds one per connection for the whole wait, ~7,000 at 3,500
    connections/s for our 2 s. The engine keeps this record alone and lets the flow, its
    TcpConnection and its tunnel go; a TcpConnection in TIME-WAIT answers through it too,
    so there is one implementation of the state.
    """

    __slots__ = ("irs", "rcv_nxt", "wnd", "seq", "window", "ts_offset", "ts_recent", "sack_ok",
                 "deadline", "_dsack")

    def __init__(self, *, irs: int, rcv_nxt: int, wnd: int, seq: int, window: int,
                 ts_offset: int, ts_recent: int, sack_ok: bool, deadline: float) -> None:
        self.irs = irs
        self.rcv_nxt = rcv_nxt
        """Relative to irs, as TcpConnection.rcv_nxt: past the app's FIN."""
        self.wnd = wnd
        """Bytes of receive window beyond rcv_nxt that we last advertised."""
        self.seq = seq
        """Our sequence number for the ACKs (wire value: past our acknowledged FIN)."""
        self.window = window
        """The window field of our ACKs."""
        self.ts_offset = ts_offset
        """Our TSval clock's offset; -1 if the connection has no timestamps."""
        self.ts_recent = ts_recent
        self.sack_ok = sack_ok
        self.deadline = deadline
        """When the wait is over (moves on a retransmitted FIN)."""
        self._dsack: tuple[int, ...] = ()

    def receive(self, seq: int, flags: int, plen: int, now: float, time_wait: float) -> int:
        """One segment from the app: TW_DROP, TW_ACK or TW_OVER."""
        off = seq_diff(seq, self.irs + self.rcv_nxt)
        wnd = self.wnd
        # RST first (RFC 5961 §3.2): only an exact match ends the wait; one in the
        # window earns a challenge ACK.
        if flags & RST:
            if off == 0:
                return TW_OVER
            return TW_ACK if 0 < off < wnd else TW_DROP
        if flags & SYN:
            # A new incarnation of the 4-tuple (beyond what this one used) ends the wait;
            # anything else gets the challenge ACK of RFC 5961 §4.
            return TW_OVER if not flags & ACK and off > 0 else TW_ACK
        fin = 1 if flags & FIN else 0
        seg_len = plen + fin
        if _acceptable(off, seg_len, wnd):
            return TW_DROP  # nothing the app may still send is in order: only a FIN again
        if plen and off < 0 and self.sack_ok and self.rcv_nxt + off >= 1:
            # Text we already have: reported as a D-SACK (RFC 2883 §4.1.1).
            lo = self.irs + self.rcv_nxt + off
            self._dsack = (lo & SEQ_MASK, (lo + seg_len) & SEQ_MASK)
        if fin:
            # A retransmitted FIN: our last ACK was lost. Restart the wait (§3.10.7.4).
            self.deadline = now + time_wait
        return TW_ACK

    def ack(self, now: float) -> Segment:
        """The ACK to send now (with a pending D-SACK block, once)."""
        if self.ts_offset >= 0:
            tsval = _ts_at(now, self.ts_offset)
            tsecr = self.ts_recent
        else:
            tsval = -1
            tsecr = 0
        sack, self._dsack = self._dsack, ()
        return Segment(self.seq, (self.irs + self.rcv_nxt) & SEQ_MASK, ACK, self.window, b"",
                       0, -1, False, tsval, tsecr, sack)


class TcpConnection:
    """The TCP state machine of one connection, passive side.

    Created by the engine when the app's SYN arrives; stays in LISTEN with that SYN
    pending (nothing is sent) until :meth:`accept` or :meth:`refuse`.
    """

    __slots__ = (
        "params",
        "iss",
        "irs",
        "peer_mss",
        "peer_sack_permitted",
        "bytes_in",
        "bytes_out",
        "retransmits",
        "probes",
        "sack_retransmits",
        "snd_una",
        "snd_nxt",
        "snd_max",
        "snd_wnd",
        "snd_wl1",
        "snd_wl2",
        "rcv_nxt",
        "_state",
        "_wscale_ok",
        "_ts_ok",
        "_ts_offset",
        "_ts_recent",
        "_last_ack_sent",
        "_snd_shift",
        "_rcv_shift",
        "_smss",
        "_seg_max",
        "_max_snd_wnd",
        "_sndbuf",
        "_sndbuf_start",
        "_fin_queued",
        "_fin_seq",
        "_cwnd",
        "_ssthresh",
        "_ca_acc",
        "_ack_credit",
        "_dupacks",
        "_in_recovery",
        "_recover",
        "_rtx_now",
        "_srtt",
        "_rttvar",
        "_rto",
        "_rtt_seq",
        "_rtt_time",
        "_retries",
        "_rtx_deadline",
        "_reo_deadline",
        "_persist_deadline",
        "_persist_backoff",
        "_probe_due",
        "_probe_sent_at",
        "_rcv_adv",
        "_rcv_limit",
        "_rcv_cap",
        "_rcv_sws",
        "_ooo_starts",
        "_ooo_data",
        "_ooo_bytes",
        "_ooo_max",
        "_ooo_fin",
        "_sack_ok",
        "_sack_recent",
        "_run_lo",
        "_run_hi",
        "_dsack_lo",
        "_dsack_hi",
        "_sb_lo",
        "_sb_hi",
        "_rtx_hi",
        "_rtx_ends",
        "_rtx_marks",
        "_rtx_lost",
        "_ack_due",
        "_dupacks_due",
        "_synack_due",
        "_synack_retries",
        "_ctl",
        "_events",
        "_closed_emitted",
        "_space_armed",
        "_last_rx",
        "_last_ack_rx",
        "_tw",
    )

    def __init__(
        self,
        params: TcpParams,
        iss: int,
        irs: int,
        peer_window: int,
        peer_mss: int = 0,
        peer_wscale: int = -1,
        peer_sack_permitted: bool = False,
        now: float = 0.0,
        peer_tsval: int = -1,
    ) -> None:
        """Record the app's SYN; state LISTEN with the SYN pending.

        ``peer_window`` is the SYN's raw window field (never scaled, RFC 7323 §2.2),
        ``peer_mss`` 0 if the SYN had no MSS option, ``peer_wscale`` -1 if it had no
        window scale option, ``peer_tsval`` -1 if it had no Timestamps option.
        """
        self.params = params
        self.iss = iss & SEQ_MASK
        """Our initial send sequence number (wire value of send position 0)."""
        self.irs = irs & SEQ_MASK
        """The app's initial sequence number (wire value of receive position 0)."""
        self.peer_mss = peer_mss
        self.peer_sack_permitted = peer_sack_permitted
        self.bytes_in = 0
        """Data bytes received in order from the app (delivered as DataReceived)."""
        self.bytes_out = 0
        """Data bytes sent to the app and acknowledged by it."""
        self.retransmits = 0
        """Segments sent again (RTO, fast retransmit, SYN-ACK)."""
        self.probes = 0
        """Zero-window probes sent (RFC 9293 §3.8.6.1)."""
        self.sack_retransmits = 0
        """Of the retransmits, holes the app's SACK blocks showed lost (RFC 6675)."""
        self._state = _LISTEN

        # RFC 7323 §2.2: scaling is on only if both sides offer it, and the shift the
        # app announced applies to windows it sends us.
        self._wscale_ok = peer_wscale >= 0
        self._snd_shift = min(peer_wscale, _MAX_WSCALE) if self._wscale_ok else 0
        self._rcv_shift = params.wscale if self._wscale_ok else 0
        # RFC 7323 §3.2: timestamps are on only if the SYN carried them (we always
        # answer with ours). The MSS counts no options (RFC 6691), so each segment's
        # payload gives up the option's 12 bytes.
        self._ts_ok = peer_tsval >= 0
        self._ts_recent = peer_tsval if self._ts_ok else 0
        # A per-connection clock offset, like Linux, so TSvals reveal no uptime.
        self._ts_offset = (iss * 2654435761) & SEQ_MASK
        self._smss = min(params.mss, peer_mss if peer_mss > 0 else _DEFAULT_MSS)
        if self._ts_ok:  # never below 1: a zero MSS would stall the sender
            self._smss = max(self._smss - TS_OPTION_LEN, 1)
        self._seg_max = self._smss

        # Send side, unwrapped positions: 0 = our SYN, data from 1.
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        """Highest position ever sent (SND.NXT before any go-back-N retreat)."""
        self.snd_wnd = peer_window & 0xFFFF
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self._max_snd_wnd = self.snd_wnd
        self._sndbuf = SendBuffer()
        self._sndbuf_start = 1
        self._fin_queued = False
        self._fin_seq = -1
        self._cwnd = 10 * self._smss  # RFC 6928 / the brief: IW = 10 segments
        self._ssthresh = 1 << 40  # RFC 5681 §3.1: "arbitrarily high"
        self._ca_acc = 0
        self._ack_credit = 0
        """Pure ACKs coalesced into the next one (coalesce_ack): slow-start growth they add."""
        self._dupacks = 0
        self._in_recovery = False
        self._recover = 0
        self._rtx_now = False
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = params.rto_initial
        self._rtt_seq = -1
        self._rtt_time = 0.0
        self._retries = 0
        self._rtx_deadline: float | None = None
        self._reo_deadline: float | None = None
        """With SACK, outside recovery: when SND.UNA's segment counts as lost because the
        app has SACKed data sent after it (RACK's reordering window, RFC 8985 §6.2)."""
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._probe_due = False
        self._probe_sent_at = -1.0

        # Receive side, unwrapped positions: 0 = the app's SYN, data from 1.
        self.rcv_nxt = 1
        self._last_ack_sent = 1
        """RCV.NXT as last sent in an ACK (Last.ACK.sent, RFC 7323 §4.3)."""
        self._rcv_adv = 1
        """Right edge of the window we advertised (RCV.NXT + RCV.WND); never retreats."""
        self._rcv_limit = 1 + params.rcv_buf
        """Position up to which the consumer said it can take data."""
        self._rcv_cap = min(params.rcv_buf, 0xFFFF << self._rcv_shift)
        # RFC 1122 §4.2.3.3: move the right edge only by min(RCV.BUFF/2, MSS) or more.
        self._rcv_sws = max(1, min(params.rcv_buf // 2, self._smss))
        self._ooo_starts: list[int] = []
        self._ooo_data: list[bytes] = []
        self._ooo_bytes = 0
        mob = params.max_ooo_bytes
        self._ooo_max = params.rcv_buf if mob is None else mob
        self._ooo_fin = -1
        self._sack_ok = peer_sack_permitted and params.sack
        self._sack_recent: list[int] = []
        """Positions of the latest out-of-order arrivals, newest first (RFC 2018 §4)."""
        self._run_lo: list[int] = []
        """With SACK: the held pieces merged into maximal contiguous ranges, so that a
        block is one bisect away however many pieces make it (ascending, disjoint)."""
        self._run_hi: list[int] = []
        self._dsack_lo = -1
        """A duplicate segment's range to report (RFC 2883), or -1."""
        self._dsack_hi = -1
        self._sb_lo: list[int] = []
        """The sender's scoreboard (RFC 6675 §3): our data the app has SACKed, as
        disjoint ranges above SND.UNA (ascending)."""
        self._sb_hi: list[int] = []
        self._rtx_hi = 0
        """HighRxt (RFC 6675 §2): in SACK recovery, the end of the last hole resent."""
        self._rtx_ends: list[int] = []
        """In SACK recovery, the holes resent and still unacknowledged: their ends
        (ascending), and SND.MAX when each went out (_rtx_marks)."""
        self._rtx_marks: list[int] = []
        self._rtx_lost = False
        """The resent segment at SND.UNA was lost too: send it again."""

        self._ack_due = False
        self._dupacks_due = 0
        self._synack_due = False
        self._synack_retries = 0
        self._ctl: list[Segment] = []
        self._events: deque[TcpEvent] = deque()
        self._closed_emitted = False
        self._space_armed = False
        self._last_rx = now
        self._last_ack_rx = now
        self._tw: TimeWait | None = None  # in TIME-WAIT: what answers the app

    # ------------------------------------------------------------------ queries

    @property
    def state(self) -> TcpState:
        """Current RFC 9293 state."""
        return self._state

    @property
    def rto(self) -> float:
        """Current retransmission timeout, including back-off (RFC 6298)."""
        return self._rto

    @property
    def cwnd(self) -> int:
        """Congestion window in bytes (RFC 5681)."""
        return self._cwnd

    @property
    def send_mss(self) -> int:
        """Largest payload we put in one segment: min(app's MSS, our MSS), less the
        Timestamps option when it is on."""
        return self._smss

    @property
    def segment_max(self) -> int:
        """Largest payload of a segment of new data: send_mss times set_segment_limit()."""
        return self._seg_max

    def set_segment_limit(self, segments: int) -> None:
        """Let a segment of new data hold up to ``segments`` times send_mss.

        For a TUN whose kernel cuts GSO packets itself (IFF_VNET_HDR): local TCP takes
        such a packet whole, so one of 4 x 64 KiB costs one write, one trip through the
        app's receive path and about one ACK instead of four. Retransmissions stay at
        send_mss, so a TUN that refused the large packet still gets the data through.
        """
        if segments < 1:
            raise ValueError(f"segments must be >= 1, got {segments}")
        self._seg_max = self._smss * segments

    @property
    def timestamps(self) -> bool:
        """Whether the RFC 7323 Timestamps option is in use (the app offered it)."""
        return self._ts_ok

    @property
    def sack(self) -> bool:
        """Whether SACK is on (the app offered it and TcpParams.sack): its ACKs may then
        carry blocks for :meth:`receive`."""
        return self._sack_ok

    @property
    def time_wait(self) -> TimeWait | None:
        """In TIME-WAIT, the record that answers the app until the wait is over: all the
        engine keeps of the connection from then on. None in every other state."""
        return self._tw

    @property
    def timeouts_in_a_row(self) -> int:
        """Retransmission timeouts since the app last acknowledged new data."""
        return self._retries

    def describe(self) -> str:
        """The send side's state, for a log line about a stalled connection: what the
        app has acknowledged, its window and our timers, with the 32-bit wire values a
        packet capture shows."""
        iss = self.iss
        return (
            f"{self._state.value} una={(iss + self.snd_una) & SEQ_MASK} "
            f"nxt={(iss + self.snd_nxt) & SEQ_MASK} max={(iss + self.snd_max) & SEQ_MASK} "
            f"(+{self.snd_una - 1} acked, {self.snd_max - self.snd_una} in flight, "
            f"{len(self._sndbuf)} queued) wnd={self.snd_wnd} wl1={self.snd_wl1} "
            f"wl2={self.snd_wl2} cwnd={self._cwnd} ssthresh={self._ssthresh} "
            f"rto={self._rto:.3f} srtt={self._srtt} mss={self._smss} "
            f"ts={self._ts_ok} ts_recent={self._ts_recent} sack={self._sack_ok} "
            f"scoreboard={len(self._sb_lo)} recovery={self._in_recovery} "
            f"rcv_nxt={(self.irs + self.rcv_nxt) & SEQ_MASK} "
            f"rcv_wnd={self._rcv_adv - self.rcv_nxt}"
        )

    @property
    def send_queued(self) -> int:
        """Bytes queued towards the app, unsent plus unacknowledged."""
        return len(self._sndbuf)

    @property
    def ooo_bytes(self) -> int:
        """Out-of-order bytes held for reassembly."""
        return self._ooo_bytes

    @property
    def receive_window(self) -> int:
        """Bytes of window currently advertised beyond RCV.NXT."""
        return max(self._rcv_adv - self.rcv_nxt, 0)

    def send_space(self) -> int:
        """How many bytes :meth:`send` would accept now."""
        if self._fin_queued or self._state not in _QUEUE_STATES:
            return 0
        space = self.params.snd_buf - len(self._sndbuf)
        return space if space > 0 else 0

    def next_event(self) -> TcpEvent | None:
        """Pop the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        """Absolute time at which :meth:`handle_timer` should run, or None."""
        if self._state is _CLOSED:
            return None
        t = self._last_rx + self.params.idle_timeout
        tw = self._tw
        for d in (self._rtx_deadline, self._persist_deadline, self._reo_deadline,
                  tw.deadline if tw is not None else None):
            if d is not None and d < t:
                t = d
        return t

    # ------------------------------------------------------------------ user calls

    def coalesce_ack(self) -> bool:
        """The engine would leave out a pure ACK that the app's next segment supersedes
        (aio/engine.py ``_superseded``): True if that is fine, and then the next new ACK
        grows the slow-start window as much as both would have (RFC 3465's limit of
        2 segments applies per ACK the app sent). False in fast recovery, where every ACK
        moves the window by itself (RFC 6582 §3.2 steps 3-4)."""
        if self._in_recovery:
            return False
        self._ack_credit += 1
        return True

    def accept(self, now: float) -> None:
        """The proxy answered 2xx: answer the pending SYN with a SYN-ACK.

        No-op unless the connection is still in LISTEN.
        """
        if self._state is not _LISTEN:
            return
        self._state = _SYN_RECEIVED
        self._synack_due = True
        self._rto = self.params.rto_initial
        self._rtx_deadline = now + self._rto
        # Time the handshake: the app's ACK gives the first RTT sample (RFC 6298 §2.2).
        self._rtt_seq = 1
        self._rtt_time = now
        self._last_ack_rx = now

    def refuse(self, now: float) -> None:
        """The proxy refused or was unreachable: RST the SYN so connect() fails fast.

        The RST carries an ACK of the SYN and sequence 0 (RFC 9293 §3.10.7.1: the SYN
        had no ACK), which the app's kernel turns into ECONNREFUSED. No-op unless the
        connection is still in LISTEN.
        """
        if self._state is not _LISTEN:
            return
        self._ctl.append(Segment(0, (self.irs + 1) & SEQ_MASK, RST | ACK, 0, b""))
        self._enter_closed()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes from the proxy towards the app; returns how many were taken.

        Never takes more than :meth:`send_space`, so the queue stays within
        ``snd_buf``. A short count arms a :class:`SendSpaceAvailable` event.
        """
        space = self.send_space()
        n = len(data)
        if n > space:
            n = space
        if n:
            if n == len(data):
                self._sndbuf.extend(data)
            else:
                self._sndbuf.extend(memoryview(data)[:n])
        if n < len(data) or self.send_space() < self.params.snd_buf // 2:
            self._space_armed = True
        return n

    def close(self, now: float) -> None:
        """The proxy hit EOF: send our FIN after all queued data (half-close).

        RFC 9293 §3.10.4: the state changes at once (FIN-WAIT-1 / LAST-ACK), the FIN
        itself goes out once every queued byte has been sent; we keep receiving.
        In SYN-RECEIVED the FIN waits for ESTABLISHED. In LISTEN this is
        :meth:`refuse`, since the app has not been answered yet.
        """
        state = self._state
        if state is _LISTEN:
            self.refuse(now)
            return
        if self._fin_queued or state not in _QUEUE_STATES:
            return
        self._fin_queued = True
        self._fin_seq = self._sndbuf_start + len(self._sndbuf)
        if state is _ESTABLISHED:
            self._state = _FIN_WAIT_1
        elif state is _CLOSE_WAIT:
            self._state = _LAST_ACK

    def abort(self, now: float) -> None:
        """Drop the connection: queue a RST (if the app can hear one) and go CLOSED."""
        if self._state is _CLOSED:
            return
        self._queue_abort_rst()
        self._enter_closed()

    def set_receive_space(self, n: int) -> None:
        """The consumer can take ``n`` more bytes beyond everything delivered so far.

        The advertised window becomes min(n, rcv_buf), but its right edge never
        moves left (RFC 9293 §3.8.6.2.1). Without calls to this method the window
        closes after ``rcv_buf`` bytes: delivered data is charged to the consumer
        until it reports space again. A window update ACK is queued when the window
        opens from below one MSS to at least one MSS, or by half of rcv_buf
        (RFC 1122 §4.2.3.3), so the app does not wait for its persist timer.
        Note the receive-side SWS rule: the right edge only moves by at least
        min(rcv_buf/2, MSS), so the consumer must be able to report that much.
        """
        self._rcv_limit = self.rcv_nxt + (n if n > 0 else 0)
        if self._state not in _RECV_TEXT_STATES:
            return
        old = self._rcv_adv - self.rcv_nxt
        if old < 0:
            old = 0
        new = self._wanted_window()
        if new > old:
            mss = self._smss
            if (old < mss <= new) or new - old >= self.params.rcv_buf // 2:
                self._ack_due = True

    # ------------------------------------------------------------------ arrivals

    def receive(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | bytearray | memoryview,
        now: float,
        tsval: int = -1,
        tsecr: int = 0,
        sack: tuple[int, ...] = (),
    ) -> None:
        """Process one segment from the app (RFC 9293 §3.10.7).

        ``window`` is the raw 16-bit field; ``payload`` may be a memoryview into the
        engine's packet buffer: whatever is kept is copied. ``tsval``/``tsecr``: its
        Timestamps option, tsval -1 if it had none. ``sack``: its SACK option's edges
        (32-bit wire values, left and right in pairs), used only with SACK on.
        """
        state = self._state
        if state is _CLOSED:
            return
        self._last_rx = now
        if state is _LISTEN:
            # The SYN is pending while the proxy is dialled. Retransmitted SYNs are
            # ignored; anything else cannot be legitimate yet (the app has seen
            # nothing from us), and RFC 9293 §3.10.7.2 ignores RSTs here too.
            return
        plen = len(payload)
        rcv_nxt = self.rcv_nxt
        off = (seq - self.irs - rcv_nxt) & SEQ_MASK
        if off >= SEQ_HALF:
            off -= SEQ_MOD
        # Fast path: ESTABLISHED, exactly in order, ACK set, no SYN/RST/FIN, the text
        # fits the window and no out-of-order FIN bounds it. Steps 1-4 of §3.10.7.4
        # cannot reject such a segment and the text needs no trimming.
        if (
            off == 0
            and state is _ESTABLISHED
            and (flags & (SYN | RST | FIN | ACK)) == ACK
            and plen <= self._rcv_adv - rcv_nxt
            and self._ooo_fin < 0
        ):
            # TS.Recent only from a segment the ACK check accepted (like Linux).
            if self._on_ack(ack, window, rcv_nxt, plen == 0, now, tsecr, sack):
                if tsval >= 0:
                    self._ts_update(rcv_nxt, tsval)
                if plen:
                    self._deliver(payload, 0, plen, now)
            return
        tw = self._tw
        if tw is not None:  # TIME-WAIT: its record answers (never the fast path above)
            verdict = tw.receive(seq, flags, plen, now, self.params.time_wait)
            if verdict == TW_ACK:
                self._ack_due = True
            elif verdict == TW_OVER:
                self._enter_closed()
            return
        self._receive_slow(state, off, ack, flags, window, payload, plen, now, tsval, tsecr,
                           sack)

    def _ts_update(self, seg_start: int, tsval: int) -> None:
        """RFC 7323 §4.3 (2): TS.Recent takes SEG.TSval if it is not older and the
        segment starts at or before Last.ACK.sent. So a delayed ACK echoes the
        earliest segment it covers, an out-of-order one changes nothing, and the
        retransmission that fills a hole is what the next ACK echoes: the app's
        kernel gets a valid RTT sample for it (RFC 7323 §4.1)."""
        if seg_start <= self._last_ack_sent and (tsval - self._ts_recent) & SEQ_MASK < SEQ_HALF:
            self._ts_recent = tsval
            if self._tw is not None:  # the ACK that ended CLOSING: the record echoes it too
                self._tw.ts_recent = tsval

    def _receive_slow(
        self,
        state: TcpState,
        off: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | bytearray | memoryview,
        plen: int,
        now: float,
        tsval: int,
        tsecr: int,
        sack: tuple[int, ...],
    ) -> None:
        """Everything but the in-order ESTABLISHED case, step by step (§3.10.7.4)."""
        rcv_nxt = self.rcv_nxt
        wnd = self._rcv_adv - rcv_nxt
        if wnd < 0:
            wnd = 0

        # Second (checked first, RFC 5961 §3.2): RST. Only an exact RCV.NXT match
        # resets; an in-window RST earns a challenge ACK; anything else is dropped.
        if flags & RST:
            if off == 0:
                self._reset_by_peer()
            elif 0 < off < wnd:
                self._ack_due = True
            return

        # Fourth: SYN.
        if flags & SYN:
            if state is _SYN_RECEIVED:
                # Our SYN-ACK was lost and the app retransmitted its SYN.
                if not flags & ACK:
                    self._synack_due = True
                return
            self._ack_due = True  # RFC 5961 §4: challenge ACK, drop
            return

        # First: acceptability test (RFC 9293 §3.10.7.4 table: "special allowance should
        # be made to accept valid ACKs", see _acceptable).
        fin = flags & FIN
        seg_len = plen + (1 if fin else 0)
        if not _acceptable(off, seg_len, wnd):
            if plen and off < 0 and self._sack_ok and rcv_nxt + off >= 1:
                # Text we already have (our ACK of it was lost, or the app's
                # retransmission was spurious): RFC 2883 §4.1.1.
                self._dsack_lo = rcv_nxt + off
                self._dsack_hi = rcv_nxt + off + plen + (1 if fin else 0)
            self._ack_due = True
            return

        # Fifth: ACK. Segments without it are dropped.
        if not flags & ACK:
            return
        seg_start = rcv_nxt + off
        if state is _SYN_RECEIVED:
            a = (ack - self.iss) & SEQ_MASK
            if a != 1:
                # Not an ACK of our SYN: <SEQ=SEG.ACK><CTL=RST> (§3.10.7.4).
                if len(self._ctl) < _MAX_CTL:
                    self._ctl.append(Segment(ack & SEQ_MASK, 0, RST, 0, b""))
                return
            self._establish(window, seg_start, now)
        elif not self._on_ack(ack, window, seg_start, seg_len == 0, now, tsecr, sack):
            return
        if tsval >= 0:
            self._ts_update(seg_start, tsval)
        state = self._state

        # Seventh and eighth: text and FIN, only where the app may still send them.
        if state in _RECV_TEXT_STATES:
            self._text_and_fin(seg_start, payload, plen, fin, now)

    def _establish(self, window: int, seg_start: int, now: float) -> None:
        """SYN-RECEIVED -> ESTABLISHED on the ACK of our SYN (RFC 9293 §3.10.7.4)."""
        self.snd_una = 1
        if self.snd_nxt < 1:
            self.snd_nxt = 1
        if self.snd_max < 1:
            self.snd_max = 1
        self.snd_wnd = window << self._snd_shift
        if self.snd_wnd > self._max_snd_wnd:
            self._max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seg_start
        self.snd_wl2 = 1
        self._last_ack_rx = now
        if self._rtt_seq == 1:
            self._rtt_sample(now - self._rtt_time)
        elif self._srtt is None:
            # RFC 6298 §5.7: a lost SYN-ACK must not leave a backed-off RTO behind.
            self._rto = self.params.rto_initial
        self._rtt_seq = -1
        self._rtx_deadline = None
        self._retries = 0
        self._state = _FIN_WAIT_1 if self._fin_queued else _ESTABLISHED
        self._events.append(Established())

    def _on_ack(
        self, ack: int, window: int, seg_start: int, pure: bool, now: float, tsecr: int,
        sack: tuple[int, ...],
    ) -> bool:
        """ACK field processing in synchronized states; False if the segment is dropped."""
        snd_una = self.snd_una
        d = (ack - self.iss - snd_una) & SEQ_MASK
        if d >= SEQ_HALF:
            d -= SEQ_MOD
        a = snd_una + d
        if a > self.snd_max:
            # RFC 9293 §3.10.7.4: it ACKs something not yet sent: ACK, drop.
            self._ack_due = True
            return False
        if d < 0 and -d > self._max_snd_wnd:
            # RFC 5961 §5.2: outside SND.UNA - MAX.SND.WND .. SND.NXT: challenge ACK.
            self._ack_due = True
            return False
        self._last_ack_rx = now
        wnd_changed = False
        if d >= 0:
            # Window update rule (§3.10.7.4): only from a segment no older than the
            # one that last set the window, so reordered ACKs cannot shrink it.
            wl1 = self.snd_wl1
            if wl1 < seg_start or (wl1 == seg_start and self.snd_wl2 <= a):
                wnd = window << self._snd_shift
                if wnd != self.snd_wnd:
                    wnd_changed = True
                    self.snd_wnd = wnd
                    if wnd > self._max_snd_wnd:
                        self._max_snd_wnd = wnd
                self.snd_wl1 = seg_start
                self.snd_wl2 = a
            if sack and self._sack_ok:
                self._sack_update(sack, a)
            if d > 0:
                self._on_new_ack(a, now, tsecr)
            elif pure and not wnd_changed and self.snd_wnd and self.snd_nxt > snd_una:
                # RFC 5681 §2 duplicate ACK: data outstanding, no text/SYN/FIN, same
                # ACK and same window.
                self._on_dup_ack()
            if (self._sb_lo and not self._in_recovery and self.snd_una >= self._recover
                    and self._sack_lost_edge() > self.snd_una):
                # RFC 6675 §5: the scoreboard shows SND.UNA's segment lost before the
                # third duplicate ACK (or without duplicates: a window update).
                self._enter_recovery()
            elif (self._rtx_ends and self._in_recovery and self._sb_hi
                    and self._sb_hi[-1] > self._rtx_marks[0]):
                # The app holds data we sent after resending the segment at SND.UNA,
                # yet not that segment: the resend was lost too (as RACK, RFC 8985,
                # infers from send order). RFC 6675 alone would wait for the RTO.
                self._rtx_lost = True
            if self._sb_lo and not self._in_recovery and self.snd_una >= self._recover:
                # Data sent after SND.UNA's segment has arrived, too little yet for
                # IsLost (a small window, the last segments): unless that segment
                # was only reordered, it is lost, which a reordering window's wait
                # tells (RACK, RFC 8985 §6.2) long before the RTO would.
                if self._reo_deadline is None:
                    srtt = self._srtt
                    wait = srtt / 4 if srtt is not None else _REO_WND_DEFAULT
                    self._reo_deadline = now + (wait if wait > _CLOCK_GRANULARITY
                                                else _CLOCK_GRANULARITY)
            else:
                self._reo_deadline = None
        if self.snd_nxt > self.snd_una and self.snd_wl2 + self.snd_wnd <= self.snd_una:
            # The window closed with data in flight (RFC 9293 §3.8.6.2.2, shrinking).
            self._window_closed_in_flight()
        return True

    def _window_closed_in_flight(self) -> None:
        """What is outstanding counts as unsent: go-back-N from SND.UNA once the window
        reopens, the persist timer probing meanwhile, no RTO. A fast recovery ends here
        (cwnd deflated to ssthresh; none again before SND.UNA passes what was sent): with
        SACK its pipe estimate would count that data in flight and send nothing."""
        self.snd_nxt = self.snd_una
        self._rtx_deadline = None
        self._rtt_seq = -1
        if self._in_recovery:
            self._in_recovery = False
            self._dupacks = 0
            self._recover = self.snd_max
            if self._cwnd > self._ssthresh:
                self._cwnd = self._ssthresh

    def _on_new_ack(self, a: int, now: float, tsecr: int) -> None:
        """SND.UNA < SEG.ACK =< SND.MAX: free acknowledged data, run RFC 5681/6298/6582."""
        snd_una = self.snd_una
        acked = a - snd_una
        buf_start = self._sndbuf_start
        data_end = buf_start + len(self._sndbuf)
        upto = a if a < data_end else data_end
        if upto > buf_start:
            self._sndbuf.discard(upto - buf_start)
            self._sndbuf_start = upto
            self.bytes_out += upto - buf_start
        self.snd_una = a
        if self.snd_nxt < a:
            self.snd_nxt = a
        if self._sb_lo:
            # A range the cumulative ACK cuts into goes whole: the app no longer holds
            # what it said.
            _drop_through(self._sb_lo, self._sb_hi, a)
        if self._rtx_ends:
            _drop_through(self._rtx_ends, self._rtx_marks, a)
        self._retries = 0
        if 0 <= self._rtt_seq <= a:
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = -1
        elif self._rtt_seq < 0 and tsecr and self._ts_ok:
            # Nothing timed (Karn discarded it after a retransmission): the echoed
            # TSval still dates what was acknowledged (RFC 7323 §4.1), and this
            # sample is what undoes the RTO back-off. 0 means "no echo", like Linux.
            r = (self._ts_clock(now) - tsecr) & SEQ_MASK
            if r < _TS_HZ * self.params.rto_max:
                self._rtt_sample(r / _TS_HZ)

        smss = self._smss
        if self._in_recovery:
            if a >= self._recover:
                # RFC 6582 §3.2 step 3, full ACK: deflate the window and leave recovery.
                self._in_recovery = False
                self._dupacks = 0
                flight = self.snd_nxt - a
                self._cwnd = min(self._ssthresh, max(flight, smss) + smss)
            else:
                # RFC 6582 §3.2 step 4, partial ACK: the next hole is lost too (with
                # SACK too, as Linux assumes: the blocks may not show it lost yet).
                self._rtx_now = True
                if not self._sack_ok:
                    cwnd = self._cwnd - acked
                    if acked >= smss:
                        cwnd += smss
                    self._cwnd = cwnd if cwnd > smss else smss
        else:
            self._dupacks = 0
            if self._cwnd < self._ssthresh:
                # Slow start with RFC 3465 appropriate byte counting, L = 2*SMSS; of
                # our segments, as the app ACKs about one a segment whatever its size
                # (else larger segments would slow the doubling per round trip). What
                # a timeout resends (below "recover") goes at send_mss.
                seg = smss if snd_una < self._recover else self._seg_max
                limit = 2 * seg * (1 + self._ack_credit)
                self._cwnd += acked if acked < limit else limit
            else:
                self._ca_acc += acked
                if self._ca_acc >= self._cwnd:
                    self._ca_acc -= self._cwnd
                    self._cwnd += smss
            if self._cwnd > 1 << 32:
                self._cwnd = 1 << 32
        self._ack_credit = 0
        # RFC 6298 §5.2/§5.3: stop the timer when all is acknowledged, else restart.
        self._rtx_deadline = now + self._rto if self.snd_nxt > a else None

        if self._fin_queued and a > self._fin_seq:
            self._on_fin_acked(now)
        elif self._space_armed and self.send_space() >= self.params.snd_buf // 2:
            self._space_armed = False
            self._events.append(SendSpaceAvailable())

    def _on_dup_ack(self) -> None:
        """Count a duplicate ACK; the third starts fast retransmit (RFC 5681 §3.2)."""
        self._dupacks += 1
        if self._in_recovery:
            if not self._sack_ok:
                # RFC 6582 §3.2 step 3: each further duplicate means a segment left
                # the network; inflate so new data can keep the pipe full. (With SACK
                # the pipe estimate counts what left.)
                self._cwnd += self._smss
        elif self._dupacks == _DUPTHRESH and self.snd_una >= self._recover:
            # RFC 6582 §3.2 step 2: only if this is not the tail of an earlier loss
            # episode (SND.UNA has passed "recover").
            self._enter_recovery()

    def _enter_recovery(self) -> None:
        """Fast retransmit and enter fast recovery (RFC 5681 §3.2, RFC 6582 §3.2 step 2,
        RFC 6675 §5 steps 4.1-4.3)."""
        smss = self._smss
        flight = self.snd_nxt - self.snd_una
        self._ssthresh = max(flight // 2, 2 * smss)
        self._recover = self.snd_max
        if self._sack_ok:
            self._cwnd = self._ssthresh
            self._rtx_hi = self.snd_una
            self._rtx_ends.clear()
            self._rtx_marks.clear()
            self._rtx_lost = False
        else:
            self._cwnd = self._ssthresh + _DUPTHRESH * smss
        self._in_recovery = True
        self._rtx_now = True
        self._rtt_seq = -1  # Karn

    # ------------------------------------------------------------------ SACK scoreboard

    def _sack_update(self, sack: tuple[int, ...], a: int) -> None:
        """Merge the app's SACK blocks (RFC 2018 §3) into the scoreboard. A block is taken
        only inside (SEG.ACK, SND.MAX]: that drops a D-SACK block (RFC 2883, at or below
        the ACK) and anything malformed or forged, as RFC 2018 lets a sender ignore."""
        top = self.snd_max - a
        base = self.iss + a
        lo = self._sb_lo
        hi = self._sb_hi
        for k in range(0, len(sack) - 1, 2):
            left = (sack[k] - base) & SEQ_MASK
            right = (sack[k + 1] - base) & SEQ_MASK
            if 0 < left < right <= top:
                _range_add(lo, hi, a + left, a + right)
        if len(lo) > _MAX_SACKED_RANGES:
            del lo[_MAX_SACKED_RANGES:]
            del hi[_MAX_SACKED_RANGES:]

    def _sack_lost_edge(self) -> int:
        """IsLost (RFC 6675 §4) as a boundary: every hole below it is lost, since above
        it DupThresh ranges, or more than (DupThresh - 1) * SMSS bytes, are SACKed.
        SND.UNA when the scoreboard shows nothing lost."""
        lo = self._sb_lo
        hi = self._sb_hi
        limit = (_DUPTHRESH - 1) * self._smss
        above = 0
        n = len(lo)
        i = n
        while i:
            i -= 1
            above += hi[i] - lo[i]
            if above > limit or n - i >= _DUPTHRESH:
                return lo[i]
        return self.snd_una

    def _sack_fill(self, out: list[Segment], ack_w: int, win: int, tsv: int, tse: int) -> int:
        """RFC 6675 §5 step (C) in SACK recovery: while the pipe leaves a segment's room
        in cwnd, retransmit the next hole the scoreboard shows lost (NextSeg rule 1).
        Returns the room left for new data (rule 2), which may be negative."""
        lo = self._sb_lo
        hi = self._sb_hi
        una = self.snd_una
        smss = self._smss
        lost = self._sack_lost_edge()
        s = self._rtx_hi if self._rtx_hi > una else una
        # SetPipe (RFC 6675 §4): outstanding bytes, less the SACKed ones, less the lost
        # ones not resent yet (the holes between s and the lost edge).
        pipe = self.snd_max - una
        for i in range(len(lo)):
            pipe -= hi[i] - lo[i]
        first = bisect_right(hi, s)
        p = s
        for i in range(first, len(lo)):
            if lo[i] > lost:
                break
            if lo[i] > p:
                pipe -= lo[i] - p
            p = hi[i]
        room = self._cwnd - pipe
        i = first
        n_ranges = len(lo)
        data_end = self._sndbuf_start + len(self._sndbuf)
        edge = self.snd_wl2 + self.snd_wnd
        while room >= smss:
            while i < n_ranges and lo[i] <= s:
                s = hi[i]
                i += 1
            if i >= n_ranges or s >= lost:
                break
            # The hole ends where a SACKed range starts: never past the data (a block
            # ends at SND.MAX at most), so never at our FIN.
            n = lo[i] - s
            if n > smss:
                n = smss
            if s + n > edge:
                break  # beyond the app's window now (only if it shrank: as Linux does)
            off = s - self._sndbuf_start
            out.append(Segment((self.iss + s) & SEQ_MASK, ack_w,
                               ACK | (PSH if s + n == data_end else 0), win,
                               self._sndbuf.slice(off, off + n), 0, -1, False, tsv, tse))
            self.retransmits += 1
            self.sack_retransmits += 1
            s += n
            room -= n
            self._rtx_hi = s
            if len(self._rtx_ends) < 2 * _MAX_SACKED_RANGES:  # bounded; unlogged: the RTO
                self._rtx_ends.append(s)
                self._rtx_marks.append(self.snd_max)
        return room

    def _on_fin_acked(self, now: float) -> None:
        """Our FIN is acknowledged (RFC 9293 §3.10.7.4, FIN-WAIT-1/CLOSING/LAST-ACK)."""
        self._rtx_deadline = None
        self._persist_deadline = None
        state = self._state
        if state is _FIN_WAIT_1:
            self._state = _FIN_WAIT_2
        elif state is _CLOSING:
            self._enter_time_wait(now)
        elif state is _LAST_ACK:
            self._enter_closed()

    def _text_and_fin(
        self,
        seg_start: int,
        payload: bytes | bytearray | memoryview,
        plen: int,
        fin: int,
        now: float,
    ) -> None:
        """Seventh and eighth steps: deliver or hold the text, then the FIN."""
        rcv_nxt = self.rcv_nxt
        end = seg_start + plen
        fin_pos = end if fin else -1
        right = self._rcv_adv
        if self._ooo_fin >= 0 and self._ooo_fin < right:
            right = self._ooo_fin  # nothing exists beyond a FIN already seen
        if end > right:
            # Text beyond the window is dropped, and so is a FIN after it.
            end = right
            fin_pos = -1
        start = seg_start if seg_start > rcv_nxt else rcv_nxt
        if seg_start < rcv_nxt and plen and self._sack_ok and seg_start >= 1:
            # Partly old: its duplicate head is D-SACKed (RFC 2883 §4.1.1).
            self._dsack_lo = seg_start
            self._dsack_hi = min(seg_start + plen, rcv_nxt)
        if start < end:
            if start == rcv_nxt:
                self._deliver(payload, start - seg_start, end - seg_start, now)
            else:
                fresh = self._ooo_insert(start, payload, start - seg_start, end - seg_start)
                if self._sack_ok:
                    if fresh:
                        self._sack_note(start)
                    else:  # all of it is held already (RFC 2883 §4.1.3)
                        self._dsack_lo = start
                        self._dsack_hi = end + 1 if fin_pos == end == self._ooo_fin else end
                self._queue_dupack()
        elif plen:
            # Only old text (a retransmission we already have), or text into a zero
            # window: tell the app where we are.
            self._ack_due = True
        if fin_pos < 0:
            return
        if fin_pos == self.rcv_nxt:
            self._on_fin(now)
        elif fin_pos > self.rcv_nxt:
            if self._ooo_fin < 0:
                held_end = self._ooo_starts[-1] + len(self._ooo_data[-1]) if self._ooo_starts else 0
                # An out-of-order FIN: remembered, processed when the hole fills.
                # One before text we already hold is bogus and ignored.
                if fin_pos >= held_end:
                    self._ooo_fin = fin_pos
            if not plen:
                self._queue_dupack()

    def _deliver(
        self, payload: bytes | bytearray | memoryview, lo: int, hi: int, now: float
    ) -> None:
        """Emit in-order text ``payload[lo:hi]`` (which starts at RCV.NXT)."""
        data: bytes | memoryview
        if type(payload) is memoryview and type(payload.obj) is bytes:
            # A view of an immutable packet may be kept as it is: the 64 KiB copy per
            # offloaded segment was the one memcpy left on the upload path.
            data = payload if lo == 0 and hi == len(payload) else payload[lo:hi]
        else:
            data = bytes(payload) if lo == 0 and hi == len(payload) else bytes(payload[lo:hi])
        self.rcv_nxt += hi - lo
        if self._ooo_starts and self._ooo_starts[0] <= self.rcv_nxt:
            chunks = self._ooo_drain()
            if chunks:
                data = b"".join([data, *chunks])
        self.bytes_in += len(data)
        self._events.append(DataReceived(data))
        self._ack_due = True
        if self._ooo_fin >= 0 and self._ooo_fin == self.rcv_nxt:
            self._on_fin(now)

    def _on_fin(self, now: float) -> None:
        """The app's FIN, in order (RFC 9293 §3.10.7.4, eighth)."""
        self.rcv_nxt += 1
        self._ooo_fin = -1
        self._ooo_clear()
        self._ack_due = True
        self._events.append(PeerClosed())
        state = self._state
        if state is _ESTABLISHED:
            self._state = _CLOSE_WAIT
        elif state is _FIN_WAIT_1:
            # Our FIN is not acknowledged yet (it would be FIN-WAIT-2 otherwise).
            self._state = _CLOSING
        elif state is _FIN_WAIT_2:
            self._enter_time_wait(now)

    def _reset_by_peer(self) -> None:
        """An acceptable RST: the app aborted (RFC 9293 §3.10.7.4, second)."""
        self._events.append(ConnectionReset())
        self._enter_closed()

    # ------------------------------------------------------------------ reassembly

    def _queue_dupack(self) -> None:
        """An immediate duplicate ACK per out-of-order segment (RFC 5681 §4.2)."""
        if self._dupacks_due < _MAX_DUPACKS_PER_CALL:
            self._dupacks_due += 1
        self._ack_due = True

    def _ooo_insert(
        self, start: int, payload: bytes | bytearray | memoryview, lo: int, hi: int
    ) -> bool:
        """Hold ``payload[lo:hi]`` (at position ``start``) minus what is already held;
        False if all of it was held already.

        The held pieces stay sorted and disjoint; overlap is trimmed from the new
        segment, and whatever exceeds ``max_ooo_bytes`` is dropped (the app will
        retransmit it).
        """
        starts = self._ooo_starts
        datas = self._ooo_data
        end = start + (hi - lo)
        base = start - lo  # position of payload[0]
        i = bisect_right(starts, start)
        cur = start
        if i:
            prev_end = starts[i - 1] + len(datas[i - 1])
            if prev_end >= end:
                return False
            if prev_end > cur:
                cur = prev_end
        fresh = False
        new_s: list[int] = []
        new_d: list[bytes] = []
        budget = self._ooo_max - self._ooo_bytes
        room = _MAX_OOO_SEGMENTS - len(starts)
        j = i
        n = len(starts)
        while cur < end:
            nxt_start = starts[j] if j < n else end
            if nxt_start > end:
                nxt_start = end
            if nxt_start > cur:
                fresh = True
                take = nxt_start - cur
                if take > budget:
                    take = budget
                if take <= 0 or room <= 0:
                    break
                new_s.append(cur)
                new_d.append(bytes(payload[cur - base : cur + take - base]))
                budget -= take
                room -= 1
                self._ooo_bytes += take
            if j >= n or starts[j] >= end:
                break
            seg_end = starts[j] + len(datas[j])
            if seg_end > cur:
                cur = seg_end
            j += 1
        if not new_s:
            return fresh
        if j == i:
            starts[i:i] = new_s
            datas[i:i] = new_d
        else:
            pairs = sorted(zip(starts[i:j] + new_s, datas[i:j] + new_d, strict=True))
            starts[i:j] = [p[0] for p in pairs]
            datas[i:j] = [p[1] for p in pairs]
        if self._sack_ok:
            for s, d in zip(new_s, new_d, strict=True):
                _range_add(self._run_lo, self._run_hi, s, s + len(d))
        return True

    def _ooo_drain(self) -> list[bytes]:
        """Pop held pieces that RCV.NXT has reached; advance RCV.NXT past them."""
        starts = self._ooo_starts
        datas = self._ooo_data
        rcv_nxt = self.rcv_nxt
        chunks: list[bytes] = []
        k = 0
        n = len(starts)
        while k < n and starts[k] <= rcv_nxt:
            s = starts[k]
            d = datas[k]
            e = s + len(d)
            if e > rcv_nxt:
                chunks.append(d if s == rcv_nxt else d[rcv_nxt - s :])
                rcv_nxt = e
            self._ooo_bytes -= len(d)
            k += 1
        del starts[:k]
        del datas[:k]
        self.rcv_nxt = rcv_nxt
        # Several runs when the in-order segment itself reached past held data.
        n = bisect_right(self._run_lo, rcv_nxt)
        if n:
            del self._run_lo[:n]
            del self._run_hi[:n]
        return chunks

    def _ooo_clear(self) -> None:
        self._ooo_starts.clear()
        self._ooo_data.clear()
        self._ooo_bytes = 0
        self._sack_recent.clear()
        self._run_lo.clear()
        self._run_hi.clear()

    def _ooo_run(self, pos: int) -> tuple[int, int] | None:
        """The maximal held range around position ``pos`` (SACK only), or None."""
        rlo = self._run_lo
        i = bisect_right(rlo, pos) - 1
        if i < 0 or self._run_hi[i] <= pos:
            return None
        return rlo[i], self._run_hi[i]

    # ------------------------------------------------------------------ SACK

    def _sack_note(self, pos: int) -> None:
        """Remember an out-of-order arrival at ``pos`` as the newest (RFC 2018 §4)."""
        recent = self._sack_recent
        if pos in recent:
            recent.remove(pos)
        recent.insert(0, pos)
        del recent[_MAX_SACK_RECENT:]

    def _sack_option(self) -> tuple[int, ...]:
        """The SACK blocks for the next pure ACK, as wire edges (RFC 2018 §4, RFC 2883).

        A pending D-SACK block comes first (once: each duplicate is reported in one ACK),
        then the held range containing it if there is one, even when that is the same
        range (RFC 2883 §4: Linux takes a first block above the ACK as a D-SACK only when
        the second contains it); then the range of the latest out-of-order arrival and
        those of the arrivals before it, newest first; then any other held ranges, highest
        first. As many as fit beside the timestamps: 3, else 4. A range that ends at a
        held FIN covers it too, as the app's kernel counts it (RFC 9293: the FIN takes a
        sequence number).
        """
        room = 3 if self._ts_ok else 4
        blocks: list[tuple[int, int]] = []
        first = 0  # 1: blocks[0] is a D-SACK block, which a later range may equal
        if self._dsack_lo >= 0:
            blocks.append((self._dsack_lo, self._dsack_hi))
            first = 1
            around = self._ooo_run(self._dsack_lo)
            if around is not None:
                blocks.append(around)
            self._dsack_lo = self._dsack_hi = -1
        recent = self._sack_recent
        k = 0
        while k < len(recent):
            run = self._ooo_run(recent[k])
            if run is None:
                del recent[k]  # delivered since (or never held: over the budget)
                continue
            if len(blocks) < room and run not in blocks[first:]:
                blocks.append(run)
            k += 1
        rlo = self._run_lo
        rhi = self._run_hi
        i = len(rlo) - 1
        while i >= 0 and len(blocks) < room:
            run = (rlo[i], rhi[i])
            if run not in blocks[first:]:
                blocks.append(run)
            i -= 1
        irs = self.irs
        fin = self._ooo_fin
        edges: list[int] = []
        for lo, hi in blocks[:room]:
            edges.append((irs + lo) & SEQ_MASK)
            edges.append((irs + (hi + 1 if hi == fin else hi)) & SEQ_MASK)
        return tuple(edges)

    # ------------------------------------------------------------------ output

    def segments_to_send(self, now: float) -> list[Segment]:
        """Segments to transmit now, in order.

        Data segments carry the ACK; besides them at most one pure ACK is produced
        per call (ACK coalescing), except that every out-of-order arrival gets its
        own immediate duplicate ACK so the app's fast retransmit can work.
        """
        out: list[Segment] = []
        if self._ctl:
            out.extend(self._ctl)
            self._ctl.clear()
        state = self._state
        if state is _CLOSED or state is _LISTEN:
            return out
        tw = self._tw
        if tw is not None:  # TIME-WAIT
            if self._ack_due:
                out.append(tw.ack(now))
                self._ack_due = False
            return out
        if state is _SYN_RECEIVED:
            if self._synack_due or self._ack_due or self._dupacks_due:
                self._emit_synack(out, now)
            return out
        ack_w = (self.irs + self.rcv_nxt) & SEQ_MASK
        win, edge = self._window_field()
        if self._ts_ok:
            tsv = self._ts_clock(now)
            tse = self._ts_recent
        else:
            tsv = -1
            tse = 0
        sent = False
        if state in _SEND_STATES:
            sent = self._emit_data(out, now, ack_w, win, tsv, tse)
        ndup = self._dupacks_due
        dsack = self._dsack_lo >= 0  # only ever set with SACK on
        if ndup or dsack or (self._ack_due and not sent):
            # SACK blocks ride on pure ACKs only: on a data segment they would take
            # payload room the app's MSS (our gso_size) has already counted.
            sack = self._sack_option() if dsack or (self._sack_ok and self._ooo_starts) else ()
            ack_seq = self._ack_seq_wire()
            out.append(Segment(ack_seq, ack_w, ACK, win, b"", 0, -1, False, tsv, tse, sack))
            if ndup > 1:
                if dsack:  # a duplicate is reported once (RFC 2883 §4): not in the others
                    sack = self._sack_option() if self._ooo_starts else ()
                out.extend([Segment(ack_seq, ack_w, ACK, win, b"", 0, -1, False, tsv, tse,
                                    sack)] * (ndup - 1))
            sent = True
        if sent:
            self._last_ack_sent = self.rcv_nxt
            if edge > self._rcv_adv:
                # Only a window actually sent moves the edge we must honour.
                self._rcv_adv = edge
        self._ack_due = False
        self._dupacks_due = 0
        self._update_persist(now)
        return out

    def _emit_synack(self, out: list[Segment], now: float) -> None:
        """(Re)send <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK> with our options."""
        # RFC 7323 §2.2: the window in a SYN segment is never scaled.
        w = self._wanted_window()
        if w > 0xFFFF:
            w = 0xFFFF
        if self.rcv_nxt + w > self._rcv_adv:
            self._rcv_adv = self.rcv_nxt + w
        w = self._rcv_adv - self.rcv_nxt
        out.append(
            Segment(
                self.iss,
                (self.irs + self.rcv_nxt) & SEQ_MASK,
                SYN | ACK,
                w if w < 0xFFFF else 0xFFFF,
                b"",
                self.params.mss,
                self._rcv_shift if self._wscale_ok else -1,
                self._sack_ok,
                self._ts_clock(now) if self._ts_ok else -1,
                self._ts_recent if self._ts_ok else 0,
            )
        )
        self._last_ack_sent = self.rcv_nxt
        if self.snd_max >= 1:
            self.retransmits += 1
        else:
            self.snd_nxt = self.snd_max = 1
        if self._rtx_deadline is None:
            self._rtx_deadline = now + self._rto
        self._synack_due = False
        self._ack_due = False
        self._dupacks_due = 0

    def _ts_clock(self, now: float) -> int:
        return _ts_at(now, self._ts_offset)

    def _emit_data(
        self, out: list[Segment], now: float, ack_w: int, win: int, tsv: int, tse: int
    ) -> bool:
        """Append retransmissions, new data, the FIN and probes; True if any."""
        sndbuf = self._sndbuf
        buf_start = self._sndbuf_start
        data_end = buf_start + len(sndbuf)
        seq_end = data_end + 1 if self._fin_queued else data_end
        una = self.snd_una
        iss = self.iss
        smss = self._smss
        sent = False
        sack_recovery = self._in_recovery and self._sack_ok
        lost = self._rtx_lost
        if self._rtx_now or lost:
            # Fast retransmit / partial ACK: the first unacknowledged segment, whatever
            # the windows say (it was in them once); with SACK only if it has not been
            # resent in this recovery yet, or that resend was lost.
            self._rtx_now = False
            self._rtx_lost = False
            if una < self.snd_max and (lost or not (sack_recovery and una < self._rtx_hi)):
                n = min(smss, self.snd_max - una, data_end - una)
                if n < 0:
                    n = 0
                if sack_recovery and self._sb_lo and self._sb_lo[0] - una < n:
                    n = self._sb_lo[0] - una  # not into what the app holds
                fin = self._fin_queued and una + n == data_end and una + n < self.snd_max
                flags = ACK | (FIN if fin else 0) | (PSH if n and una + n == data_end else 0)
                lo = una - buf_start
                out.append(
                    Segment((iss + una) & SEQ_MASK, ack_w, flags, win, sndbuf.slice(lo, lo + n),
                            0, -1, False, tsv, tse)
                )
                self.retransmits += 1
                sent = True
                if sack_recovery:
                    end = una + n + (1 if fin else 0)
                    if end > self._rtx_hi:
                        self._rtx_hi = end
                    if lost:
                        self.sack_retransmits += 1
                    if self._rtx_ends and self._rtx_ends[0] <= end:
                        self._rtx_marks[0] = self.snd_max  # its resend, sent again
                    else:
                        self._rtx_ends.insert(0, end)
                        self._rtx_marks.insert(0, self.snd_max)
                if self._rtx_deadline is None:
                    self._rtx_deadline = now + self._rto
        room = 0
        if sack_recovery:
            n_out = len(out)
            room = self._sack_fill(out, ack_w, win, tsv, tse)
            if len(out) > n_out:
                sent = True

        nxt = self.snd_nxt
        if nxt < seq_end:
            edge = self.snd_wl2 + self.snd_wnd
            # In SACK recovery new data goes out only as the pipe allows (RFC 6675 §5).
            cwnd_limit = nxt + room if sack_recovery else una + self._cwnd
            sb_lo = self._sb_lo
            sb_hi = self._sb_hi
            if sb_lo and not sack_recovery:
                # What the app has SACKed below SND.NXT is not in flight (as in SetPipe).
                for i in range(len(sb_lo)):
                    if sb_lo[i] >= nxt:
                        break
                    cwnd_limit += (sb_hi[i] if sb_hi[i] < nxt else nxt) - sb_lo[i]
            limit = cwnd_limit if cwnd_limit < edge else edge
            snd_max = self.snd_max
            seg_max = self._seg_max
            while nxt < seq_end:
                # Resends (go-back-N after a timeout) at send_mss: see set_segment_limit().
                cap = seg_max if nxt >= snd_max else smss
                if nxt < snd_max and sb_lo:
                    # A resend (go-back-N after a timeout): skip what the app has SACKed.
                    # It is not in flight either, so it leaves its share of cwnd.
                    k = bisect_right(sb_lo, nxt)
                    if k and nxt < sb_hi[k - 1]:
                        cwnd_limit += sb_hi[k - 1] - nxt
                        limit = cwnd_limit if cwnd_limit < edge else edge
                        nxt = sb_hi[k - 1]
                        continue
                    if k < len(sb_lo) and sb_lo[k] - nxt < cap:
                        cap = sb_lo[k] - nxt
                if nxt < data_end:
                    n = data_end - nxt
                    if n > cap:
                        n = cap
                    room = limit - nxt
                    if n > room:
                        # Sender SWS avoidance (RFC 9293 §3.8.6.2.1): a short
                        # segment (under send_mss: one over it is as full as any)
                        # only if nothing is in flight or it is at least half the
                        # largest window the app has offered.
                        if room <= 0 or (nxt > una and room < smss
                                         and room < self._max_snd_wnd >> 1):
                            break
                        n = room
                    end = nxt + n
                    # Our FIN takes a sequence number, hence a byte of window.
                    fin = self._fin_queued and end == data_end and end < edge
                    flags = ACK | (PSH if end == data_end else 0)
                    if fin:
                        flags |= FIN
                        end += 1
                    lo = nxt - buf_start
                    payload = sndbuf.slice(lo, lo + n)
                else:
                    # Only the FIN is left.
                    if nxt >= edge:
                        break
                    end = nxt + 1
                    flags = ACK | FIN
                    payload = b""
                out.append(Segment((iss + nxt) & SEQ_MASK, ack_w, flags, win, payload,
                                   0, -1, False, tsv, tse))
                sent = True
                if nxt < snd_max:
                    self.retransmits += 1
                elif self._rtt_seq < 0:
                    self._rtt_seq = end
                    self._rtt_time = now
                nxt = end
                if nxt > snd_max:
                    snd_max = nxt
                if self._rtx_deadline is None:
                    self._rtx_deadline = now + self._rto
            self.snd_nxt = nxt
            self.snd_max = snd_max

        if self._probe_due:
            self._probe_due = False
            nxt = self.snd_nxt
            # Only if the window is still closed and nothing is in flight: an ACK
            # may have reopened it since the persist timer fired.
            if nxt == una and nxt < seq_end and self.snd_wl2 + self.snd_wnd <= nxt:
                # RFC 9293 §3.8.6.1: one byte beyond the closed window (or the
                # bare FIN); the app answers with an ACK carrying its window.
                # SND.NXT does not move: the byte counts as unsent until ACKed.
                if nxt < data_end:
                    lo = nxt - buf_start
                    probe = Segment((iss + nxt) & SEQ_MASK, ack_w, ACK, win,
                                    sndbuf.slice(lo, lo + 1), 0, -1, False, tsv, tse)
                else:
                    probe = Segment((iss + nxt) & SEQ_MASK, ack_w, ACK | FIN, win, b"",
                                    0, -1, False, tsv, tse)
                out.append(probe)
                sent = True
                self.probes += 1
                self._probe_sent_at = now
                if nxt + 1 > self.snd_max:
                    self.snd_max = nxt + 1
        return sent

    def _ack_seq_wire(self) -> int:
        """Sequence number for a pure ACK or RST.

        SND.MAX is what the app most likely expects (SND.NXT may have retreated after
        an RTO); but never beyond the app's window, where Linux would drop the
        segment as out of window (like its tcp_acceptable_seq()).
        """
        s = self.snd_max
        edge = self.snd_wl2 + self.snd_wnd
        if s > edge:
            s = edge if edge > self.snd_una else self.snd_una
        return (self.iss + s) & SEQ_MASK

    def _wanted_window(self) -> int:
        """The window (bytes beyond RCV.NXT) we would advertise now, not yet committed.

        RFC 9293 §3.8.6.2.1 / RFC 1122 §4.2.3.3: the right edge never retreats, and
        advances only by at least min(rcv_buf/2, MSS) so the app cannot be lured into
        sending tiny segments.
        """
        rcv_nxt = self.rcv_nxt
        cur = self._rcv_adv - rcv_nxt
        if cur < 0:
            cur = 0
        avail = self._rcv_limit - rcv_nxt
        if avail > self._rcv_cap:
            avail = self._rcv_cap
        if avail > cur and avail - cur >= self._rcv_sws:
            return avail
        return cur

    def _window_field(self) -> tuple[int, int]:
        """Encode the window for outgoing segments: (field, right edge it promises).

        The field is scaled and at most 65535; the caller commits the edge to
        ``_rcv_adv`` once a segment carrying it is really sent.
        """
        shift = self._rcv_shift
        rcv_nxt = self.rcv_nxt
        cur = self._rcv_adv - rcv_nxt
        new = self._wanted_window()
        field = new >> shift
        if (field << shift) < cur:
            # Rounding down would pull the edge left: round up instead (Linux does
            # the same), overshooting the consumer's space by < 2**shift bytes.
            field = (cur + (1 << shift) - 1) >> shift
        if field > 0xFFFF:
            field = 0xFFFF
        return field, rcv_nxt + (field << shift)

    # ------------------------------------------------------------------ timers

    def handle_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now`` (early calls do nothing)."""
        state = self._state
        if state is _CLOSED:
            return
        if now >= self._last_rx + self.params.idle_timeout:
            log.debug("idle timeout in %s", state.value)
            self._abort_with(TimedOut())
            return
        tw = self._tw
        if tw is not None:  # TIME-WAIT
            if now >= tw.deadline:
                self._enter_closed()
            return
        d = self._rtx_deadline
        if d is not None and now >= d:
            self._on_rto(now)
            if self._state is _CLOSED:
                return
        d = self._reo_deadline
        if d is not None and now >= d:
            self._reo_deadline = None
            if (self._sb_lo and not self._in_recovery and self.snd_una >= self._recover
                    and self._state in _SEND_STATES):
                self._enter_recovery()
        d = self._persist_deadline
        if d is not None and now >= d:
            self._on_persist(now)

    def _on_rto(self, now: float) -> None:
        """Retransmission timeout (RFC 6298 §5.4-5.6, RFC 5681 §3.1)."""
        p = self.params
        self._rtt_seq = -1  # Karn: no sample from anything retransmitted
        if self._state is _SYN_RECEIVED:
            if self._synack_retries >= p.syn_ack_retries:
                self._abort_with(TimedOut())
                return
            self._synack_retries += 1
            self._synack_due = True
            self._rto = min(self._rto * 2, p.rto_max)
            self._rtx_deadline = now + self._rto
            return
        if self.snd_max <= self.snd_una:
            self._rtx_deadline = None  # nothing outstanding any more
            return
        if self.snd_wl2 + self.snd_wnd <= self.snd_una:
            # The window is closed: what is outstanding waits for it to open, and
            # the persist timer (which tolerates a live app's zero window) probes.
            self._window_closed_in_flight()
            return
        if self._retries >= p.max_retransmits:
            log.debug("retransmissions exhausted in %s", self._state.value)
            self._abort_with(TimedOut())
            return
        smss = self._smss
        if not self._retries:
            # RFC 5681 §3.1 eq. (4), once per loss episode: a second timeout for the
            # same data must not halve ssthresh again.
            self._ssthresh = max((self.snd_nxt - self.snd_una) // 2, 2 * smss)
        self._retries += 1
        # The loss window; RFC 6582 §3.2 step 4 note: "recover" guards against
        # fast-retransmitting on the duplicates the go-back-N resend provokes.
        self._cwnd = smss
        self._ca_acc = 0
        self._recover = self.snd_max
        self._in_recovery = False
        self._dupacks = 0
        self._rtx_now = False
        if self._retries > 1:
            # A second timeout without progress: the app may have dropped what it
            # SACKed (reneging, RFC 2018 §8), so the go-back-N resends that too. After
            # the first, it skips what the app holds (RFC 6675 §5.1, as Linux does).
            self._sb_lo.clear()
            self._sb_hi.clear()
        self.snd_nxt = self.snd_una  # go-back-N: resend from the first hole
        self._rto = min(self._rto * 2, p.rto_max)  # RFC 6298 §5.5
        # Re-armed here, not when the retransmission is built, so the back-off and
        # the give-up still happen if the engine is slow to call segments_to_send.
        self._rtx_deadline = now + self._rto

    def _on_persist(self, now: float) -> None:
        """Persist timer: probe the zero window, backing off (RFC 1122 §4.2.2.17)."""
        p = self.params
        last_ack = self._last_ack_rx
        if last_ack < self._probe_sent_at and now - last_ack >= p.persist_max:
            # Our last probe went unanswered and the app has been silent for
            # persist_max: it is gone. A window that stays closed while the app
            # keeps ACKing is never a reason to give up.
            self._abort_with(TimedOut())
            return
        self._probe_due = True
        if self._persist_backoff < 30:
            self._persist_backoff += 1
        self._persist_deadline = now + self._persist_interval()

    def _persist_interval(self) -> float:
        p = self.params
        base = self._rto if self._rto > p.rto_min else p.rto_min
        return min(base * (1 << self._persist_backoff), p.rto_max)

    def _update_persist(self, now: float) -> None:
        """Arm the persist timer iff nothing is in flight and the window is closed."""
        if (
            self._state in _SEND_STATES
            and self.snd_nxt == self.snd_una
            and self.snd_nxt
            < self._sndbuf_start + len(self._sndbuf) + (1 if self._fin_queued else 0)
            and self.snd_wl2 + self.snd_wnd <= self.snd_nxt
        ):
            if self._persist_deadline is None:
                self._persist_deadline = now + self._persist_interval()
        else:
            self._persist_deadline = None
            self._persist_backoff = 0
            self._probe_sent_at = -1.0

    def _rtt_sample(self, r: float) -> None:
        """Update SRTT/RTTVAR/RTO from one measurement (RFC 6298 §2.2-2.4)."""
        if r < 0:
            r = 0.0
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        rto = self._srtt + max(_CLOCK_GRANULARITY, 4 * self._rttvar)
        p = self.params
        self._rto = p.rto_min if rto < p.rto_min else p.rto_max if rto > p.rto_max else rto

    # ------------------------------------------------------------------ teardown

    def _queue_abort_rst(self) -> None:
        """Queue the RST that tells the app the connection is gone, if it can hear one."""
        state = self._state
        if state is _LISTEN:
            self._ctl.append(Segment(0, (self.irs + 1) & SEQ_MASK, RST | ACK, 0, b""))
        elif state is not _TIME_WAIT and state is not _CLOSED:
            # RFC 9293 §3.10.5 <SEQ=SND.NXT><CTL=RST>, with the ACK Linux also sets.
            # Should the app's RCV.NXT differ, it answers with a challenge ACK, which
            # the engine (no connection any more) answers via reset_for() with the
            # exact sequence number.
            self._ctl.append(
                Segment(
                    self._ack_seq_wire(), (self.irs + self.rcv_nxt) & SEQ_MASK, RST | ACK, 0, b""
                )
            )

    def _abort_with(self, event: TcpEvent) -> None:
        self._queue_abort_rst()
        self._events.append(event)
        self._enter_closed()

    def _enter_time_wait(self, now: float) -> None:
        self._state = _TIME_WAIT
        self._rtx_deadline = None
        self._persist_deadline = None
        self._reo_deadline = None
        self._sndbuf = SendBuffer()
        self._ooo_clear()
        window, edge = self._window_field()  # what every ACK from now on advertises
        if edge < self._rcv_adv:
            edge = self._rcv_adv
        self._tw = TimeWait(irs=self.irs, rcv_nxt=self.rcv_nxt, wnd=edge - self.rcv_nxt,
                            seq=self._ack_seq_wire(), window=window,
                            ts_offset=self._ts_offset if self._ts_ok else -1,
                            ts_recent=self._ts_recent, sack_ok=self._sack_ok,
                            deadline=now + self.params.time_wait)

    def _enter_closed(self) -> None:
        """Go CLOSED, free the buffers, and report Closed exactly once."""
        self._state = _CLOSED
        self._rtx_deadline = None
        self._persist_deadline = None
        self._tw = None
        self._reo_deadline = None
        self._sndbuf = SendBuffer()
        self._ooo_clear()
        self._ooo_fin = -1
        self._ack_due = False
        self._dupacks_due = 0
        self._synack_due = False
        self._probe_due = False
        self._rtx_now = False
        if not self._closed_emitted:
            self._closed_emitted = True
            self._events.append(Closed())

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {self._state.value} una={self.snd_una} nxt={self.snd_nxt} "
            f"rcv_nxt={self.rcv_nxt} queued={len(self._sndbuf)} ooo={self._ooo_bytes}>"
        )
