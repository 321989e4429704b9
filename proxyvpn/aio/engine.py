"""The asyncio shell around the sans-IO stack: TUN in, segments out, one proxy tunnel per flow.

One reader callback drains the TUN in batches; every connection touched by a batch (or
by its proxy socket) is put in a dirty set, and a single `transmit()` turns their
pending segments into packets, writes them in one batch and re-arms the one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import json
import logging
import os
import signal
import socket
import stat
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, cast

from proxyvpn.aio import memory
from proxyvpn.aio.busypoll import BULK_BYTES, BusyPollSelector
from proxyvpn.aio.flow import Flow
from proxyvpn.config import Config
from proxyvpn.errors import ConfigError, ProxyError, ProxyVpnError
from proxyvpn.netstack import fast
from proxyvpn.netstack.sack_option import sack_edges
from proxyvpn.netstack.seq import IsnSource
from proxyvpn.netstack.tcp import (
    TS_OPTION_LEN,
    TW_ACK,
    TW_OVER,
    TcpConnection,
    TcpParams,
    TcpState,
    TimeWait,
    reset_for,
)
from proxyvpn.netstack.wire import strip_vnet
from proxyvpn.relay.dial import ProxyEndpoint, TunnelProtocol, start_tunnel

log = logging.getLogger("proxyvpn.aio")

STALL_TIMEOUTS = 4
"""Retransmission timeouts in a row (~3 s from the first at the 200 ms minimum RTO) after
which a flow is logged as stalled, once: the app's kernel is not acknowledging what we
send it, which no loss on a TUN explains for that long."""

READ_BATCH = 64
"""Packets read per reader wake-up: amortises the callback without starving timers."""

BIG_SEGMENTS = 4
"""send_mss per segment of new data to an app, where the kernel takes more than 64 KiB
in one GSO packet (TunHandle.big_ipv4, big_ipv6): a whole proxy read of 4 x 64 KiB
(SocketTransport.read_in_units) goes in one TUN write, one pass through the app's receive
path and about one ACK, where it took four of each. Within what pcap readers take (256
KiB); an allocation of 8 x 32 KiB pages in the kernel."""

_MAX_PLAIN_WRITE = 0xFFFF + 40 + fast.VNET_HDR_LEN
"""The longest TUN write that is not a GSO packet over 64 KiB (IPv6 does not count its
header in the length field)."""

_REFUSALS = frozenset((errno.EMSGSIZE, errno.EINVAL, errno.ENOMEM))
"""How a kernel says a TUN write is too large for it (EMSGSIZE: more fragments than an skb
holds, before Linux 6.6; ENOMEM: no pages for it). ENOBUFS comes back from write_batch
as a short count (_send)."""


class Engine:
    """Owns the flow table and drives every TcpConnection from TUN packets and timers."""

    def __init__(self, config: Config, endpoint: ProxyEndpoint, tun_fd: int,
                 *, vnet: bool = False, big_ipv4: bool = False, big_ipv6: bool = False,
                 pcap_path: Path | None = None,
                 poller: BusyPollSelector | None = None) -> None:
        self.config = config
        self.poller = poller
        """The loop's selector, told when bulk data moves (it then does not poll)."""
        self.endpoint = endpoint
        self.fd = tun_fd
        self.vnet = vnet
        """The TUN has IFF_VNET_HDR + offload: 64 KiB segments both ways (system/tun.py)."""
        self.big_ipv4 = vnet and big_ipv4
        """IPv4 flows send segments of BIG_SEGMENTS x 64 KiB to the apps (BIG TCP; off for
        good once the kernel refuses one: _refused())."""
        self.big_ipv6 = vnet and big_ipv6
        """The same for IPv6 flows."""
        self._read_size = 65536 + (64 if vnet else 0)  # an IPv6 GSO packet may exceed 64 KiB a little
        self.wire = fast.select(pure=config.pure_python)
        self.params = TcpParams(mss=config.mtu - 60 if config.ipv6 else config.mtu - 40)
        self.flows: dict[tuple[bytes, int, bytes, int], Flow] = {}
        self.stats: Counter[str] = Counter()
        self._dirty: dict[Flow, None] = {}  # insertion-ordered set
        self._time_wait: OrderedDict[tuple[bytes, int, bytes, int], TimeWait] = OrderedDict()
        """What is left of the connections in TIME-WAIT, by 4-tuple, oldest first (the
        first to end, and the first to give way when the table is full). Their flows are
        gone: a flow entering TIME-WAIT is retired at its next transmit()."""
        self._out: list[bytes | tuple] = []
        """Packets to write: bytes, or (headers, payload) from build(split=True)."""
        self._backlog: list[bytes | tuple] = []
        self._timers: list[tuple[float, int, tuple[bytes, int, bytes, int]]] = []
        """(deadline, tie-breaker, 4-tuple): by key, not flow, so that a flow that is over
        is freed at once, not when its last entry reaches the top."""
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._auth_reported = False
        self._loop = asyncio.get_running_loop()
        self._pcap = _open_pcap(pcap_path, vnet) if pcap_path else None
        self._seq = 0
        self._isn = IsnSource()

    # ------------------------------------------------------------------ TUN input

    def start(self) -> None:
        self._loop.add_reader(self.fd, self._on_readable)

    def stop(self) -> None:
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        for flow in list(self.flows.values()):
            flow.conn.abort(self._loop.time())
            self.touch(flow)
            flow.close_tunnel()
        self.transmit()
        self._time_wait.clear()
        if self._timer_handle:
            self._timer_handle.cancel()
        if self._pcap:
            self._pcap.close()

    def _on_readable(self) -> None:
        try:
            packets = self.wire.read_batch(self.fd, READ_BATCH, self._read_size)
        except OSError as exc:
            log.error("reading the TUN failed: %s", exc)
            self.stats["tun_read_errors"] += 1
            return
        now = self._loop.time()
        self.stats["tun_reads"] += 1
        self.stats["packets_in"] += len(packets)
        if self._pcap:
            stamp = time.time()
            for packet in packets:
                self._pcap.writepkt(packet, stamp)
        if self.poller is not None and sum(map(len, packets)) > BULK_BYTES:
            self.poller.bulk()  # by the batch: with a small --mtu no packet is bulk-sized
        parse, vnet = self.wire.parse, self.vnet
        parsed: list[tuple | int | None] = []
        for packet in packets:
            try:
                parsed.append(parse(packet, True, vnet))  # verify_checksum, vnet
            except Exception:
                parsed.append(None)
                self._packet_failed()
        last = len(parsed) - 1
        for i, packet in enumerate(packets):
            p = parsed[i]
            if p is None:
                continue
            try:
                if (i < last and _superseded(p, parsed[i + 1])
                        and self._coalesce(cast(tuple, p))):
                    self.stats["acks_coalesced"] += 1
                    continue
                self._on_packet(packet, p, now)
            except Exception:
                self._packet_failed()
        self.transmit()

    def _packet_failed(self) -> None:
        # A bug, not bad input (parse drops and counts that): it costs this one packet --
        # the app retransmits -- not the rest of the batch.
        self.stats["packet_errors"] += 1
        if self.stats["packet_errors"] == 1:
            log.exception("internal error handling a TUN packet (dropped; further "
                          "ones are counted as packet_errors)")

    def _coalesce(self, parsed: tuple) -> bool:
        """Whether its connection lets a superseded pure ACK go unprocessed: it must
        exist (else the ACK gets its RST) and agree (TcpConnection.coalesce_ack)."""
        flow = self.flows.get((parsed[1], parsed[3], parsed[2], parsed[4]))
        return flow is not None and flow.conn.coalesce_ack()

    def _on_packet(self, packet: bytes, parsed: tuple | int, now: float) -> None:
        """One packet from the TUN, as ``parse`` gave it (a tuple, or a drop reason);
        _on_readable counted it and wrote it to the capture."""
        if isinstance(parsed, int):
            self.stats["drop_" + self.wire.DROP_REASONS[parsed].lower()] += 1
            return
        (family, src, dst, sport, dport, seq, ack, flags, window,
         start, end, mss, wscale, sack_ok, tsval, tsecr) = parsed
        key = (src, sport, dst, dport)
        flow = self.flows.get(key)
        if flow is None:
            tw = self._time_wait.get(key)
            if tw is not None:
                self._in_time_wait(tw, parsed, packet, key, now)
            else:
                self._on_unknown(parsed, packet, key, now)
            return
        conn = flow.conn
        sack: tuple[int, ...] = ()
        if conn.sack and conn.snd_max > conn.snd_una:
            # Only a segment acknowledging data in flight has blocks worth reading (its
            # own data or not: Linux puts them on both); see sack_option.py.
            edges = sack_edges(packet, start, self.vnet, tsval >= 0)
            if edges is None:
                self.stats["bad_sack_options"] += 1  # the ACK still counts, the blocks not
            elif edges:
                self.stats["acks_with_sack"] += 1
                sack = edges
        conn.receive(seq, ack, flags, window,
                     memoryview(packet)[start:end] if end > start else b"", now, tsval, tsecr,
                     sack)
        # Its events wait for transmit(): one pass per flow and batch, so a batch's
        # segments of one flow go to the proxy in one sendmsg().
        self.touch(flow)
        if flags & fast.SYN and conn.state is TcpState.CLOSED:
            # A SYN for a connection that is over: a new incarnation of the 4-tuple
            # (it ended TIME-WAIT, RFC 9293 §3.10.7.4) or one behind the packet that
            # closed it. Let the old flow go now and take the SYN as a new one, rather
            # than make the app retransmit it a second later.
            flow.handle_events(now)
            if self.flows.get(key) is None:
                self._on_unknown(parsed, packet, key, now)

    def _on_unknown(self, parsed: tuple, packet: bytes, key: tuple, now: float) -> None:
        (family, src, dst, sport, dport, seq, ack, flags, window,
         start, end, mss, wscale, sack_ok, tsval, tsecr) = parsed
        syn_only = flags & (fast.SYN | fast.ACK | fast.RST | fast.FIN) == fast.SYN
        if syn_only:
            self._open_flow(parsed, key, now)
            return
        self.stats["segments_unknown_flow"] += 1
        self._reset(parsed)

    def _in_time_wait(self, tw: TimeWait, parsed: tuple, packet: bytes, key: tuple,
                      now: float) -> None:
        """A segment for a connection that is over, in TIME-WAIT (its record answers)."""
        (family, src, dst, sport, dport, seq, ack, flags, window,
         start, end, *_) = parsed
        deadline = tw.deadline
        verdict = tw.receive(seq, flags, end - start, now, self.params.time_wait)
        if verdict == TW_ACK:
            self._out.append(self.wire.build(family, dst, src, dport, sport, *tw.ack(now),
                                             0 if self.vnet else -1, False))
            if tw.deadline != deadline:
                self._time_wait.move_to_end(key)  # the wait restarted: the last to end
        elif verdict == TW_OVER:
            del self._time_wait[key]
            if flags & fast.SYN:
                # A new incarnation of the 4-tuple (RFC 9293 §3.10.7.4): open it now
                # rather than make the app retransmit its SYN a second later.
                self._on_unknown(parsed, packet, key, now)

    def _retire(self, flow: Flow, tw: TimeWait, now: float) -> None:
        """``flow`` is in TIME-WAIT: keep its record, let the flow and all it holds go.

        Each connection the server closes first waits time_wait seconds, so short
        connections at N/s keep ~2N of them: as records they take a fraction of the
        memory (README, Performance: "TIME-WAIT as a record") and no --max-flows slot. The table holds as many as --max-flows; when full, the
        oldest gives way, as Linux's does (tcp_max_tw_buckets). The risk, a late
        duplicate segment of the old connection, is small on a local TUN.
        """
        table = self._time_wait
        if len(table) >= self.config.max_flows:
            table.popitem(last=False)
            self.stats["time_wait_reclaimed"] += 1
        table[flow.key] = tw
        flow.conn.abort(now)  # silent in TIME-WAIT: no RST; Closed
        flow.handle_events(now)  # the flow closes its tunnel and forgets itself

    def _reset(self, parsed: tuple) -> None:
        """Answer a segment no flow takes with the RST RFC 9293 §3.10.7.1 prescribes."""
        (family, src, dst, sport, dport, seq, ack, flags, window,
         start, end, *_) = parsed
        reply = reset_for(seq, ack, flags, end - start)
        if reply is not None:
            rseq, rack, rflags = reply
            self._out.append(self.wire.build(family, dst, src, dport, sport, rseq, rack, rflags, 0,
                                             gso_size=0 if self.vnet else -1))
            self.stats["resets_sent"] += 1

    # ------------------------------------------------------------------ flows

    def _open_flow(self, parsed: tuple, key: tuple, now: float) -> None:
        (family, src, dst, sport, dport, seq, ack, flags, window,
         start, end, mss, wscale, sack_ok, tsval, tsecr) = parsed
        dst_ip = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, dst)
        try:
            protocol = TunnelProtocol(dst_ip, dport, self.endpoint.credentials)
        except ValueError:
            # No CONNECT request can name it (port 0: any local process can send that
            # SYN); refuse it like a closed port rather than hold a flow that never dials.
            self.stats["syn_bad_target"] += 1
            self._reset(parsed)
            return
        if len(self.flows) >= self.config.max_flows:
            self.stats["flows_over_limit"] += 1
            self._reset(parsed)
            return
        gso_size = -1
        if self.vnet:
            # The app's MSS bounds what its kernel wants per packet on the wire, not per
            # write into the TUN: we send segments as large as our own MSS and let the
            # kernel cut them to the app's MSS where it must (GSO; local TCP takes them
            # whole). RFC 9293 §3.7.1 defaults to 536 without the option.
            gso_size = min(mss or 536, self.params.mss)
            if tsval >= 0:  # the connection will send timestamps: 12 bytes less payload
                gso_size = max(gso_size - TS_OPTION_LEN, 1)
            mss = self.params.mss
        conn = TcpConnection(self.params, iss=self._isn.next(), irs=seq, peer_window=window,
                             peer_mss=mss, peer_wscale=wscale, peer_sack_permitted=bool(sack_ok),
                             now=now, peer_tsval=tsval)
        conn.set_segment_limit(self.segment_limit(family))
        flow = Flow(self, key, family, conn, dst_ip, dport, gso_size)
        self.flows[key] = flow
        self.stats["flows_opened"] += 1
        # Callbacks, not a task per connection: at 1,700 connections/s asyncio's
        # task, futures and transport set-up were a fifth of our CPU (relay/transport.py).
        dial = start_tunnel(self.endpoint, dst_ip, dport, loop=self._loop,
                            mark=self.config.bypass_mark,
                            timeout=self.config.connect_timeout, protocol=protocol,
                            ssl_context=self.endpoint_ssl(),
                            on_done=lambda exc: self._dialed(flow, protocol, exc))
        if not dial.done:  # it may have failed at once (e.g. every address refused)
            flow.dial = dial

    def _dialed(self, flow: Flow, protocol: TunnelProtocol, exc: ProxyVpnError | None) -> None:
        flow.dial = None
        if isinstance(exc, ProxyError):
            self._report_refusal(flow, exc)
            self._refuse(flow)
            return
        if exc is not None:
            flow.log.warning("proxy connection failed: %s", exc)
            self.stats["proxy_failures"] += 1
            self._refuse(flow)
            return
        if self.flows.get(flow.key) is not flow:  # the flow went away meanwhile
            protocol.close()
            return
        now = self._loop.time()
        flow.attach(protocol)
        flow.conn.accept(now)
        self.touch(flow)
        self.schedule_transmit()

    def _report_refusal(self, flow: Flow, exc: ProxyError) -> None:
        self.stats["proxy_refused"] += 1
        if exc.auth_failed:
            self.stats["proxy_auth_failed"] += 1
            if not self._auth_reported:
                self._auth_reported = True
                log.error("proxy authentication failed (%s %s): check the user name and "
                          "password; connections are refused until it is fixed", exc.status, exc.reason)
                return
        flow.log.info("proxy refused: %s %s", exc.status, exc.reason)

    def _refuse(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is not flow:
            return
        flow.conn.refuse(self._loop.time())
        self.touch(flow)
        self.schedule_transmit()

    def forget(self, flow: Flow) -> None:
        """Called by the flow once its connection reached CLOSED."""
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            self.stats["flows_closed"] += 1
            self.stats["retransmits"] += flow.conn.retransmits
            self.stats["sack_retransmits"] += flow.conn.sack_retransmits

    # ------------------------------------------------------------------ output

    def touch(self, flow: Flow) -> None:
        """Mark ``flow`` for the next transmit(), which handles its events and sends."""
        self._dirty[flow] = None

    def schedule_transmit(self) -> None:
        """Coalesce work from proxy callbacks into one transmit per loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._flush_scheduled = False
        self.transmit()

    def transmit(self) -> None:
        """Act on the dirty flows' events, build their pending segments, write them,
        re-arm the timer."""
        now = self._loop.time()
        build = self.wire.build
        out = self._out
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for flow in dirty:
                flow.handle_events(now)
                family, (src, sport, dst, dport) = flow.family, flow.key
                gso_size = flow.gso_size
                # split: headers apart from the payload, which write_batch gathers
                # with writev -- the payload is copied once, by the kernel. Positional
                # (a Segment is build's arguments from seq to sack, then gso_size and
                # split): the C function matches keywords by name, ~30 string compares.
                for seg in flow.conn.segments_to_send(now):
                    out.append(build(family, dst, src, dport, sport, *seg, gso_size, True))
                tw = flow.conn.time_wait
                if tw is not None and self.flows.get(flow.key) is flow:
                    self._retire(flow, tw, now)
                    continue
                # Lazy timers: a flow keeps at most one live heap entry, the earliest
                # deadline it has asked for. A deadline that moved later (the RTO and idle
                # timers move on every ACK) is left to the entry already queued, which
                # fires early, finds nothing due and re-queues: one heap push per RTO
                # period instead of one per packet.
                deadline = flow.conn.next_timer()
                at = flow.timer_at
                if deadline is not None and (at is None or deadline < at):
                    flow.timer_at = deadline
                    self._seq += 1
                    heapq.heappush(self._timers, (deadline, self._seq, flow.key))
                flow.after_transmit()
        if out:
            self._out = []
            self._write(out)
        self._arm_timer()

    def _write(self, packets: list[bytes | tuple]) -> None:
        if self._pcap:
            stamp = time.time()
            for packet in packets:
                self._pcap.writepkt(b"".join(packet) if type(packet) is tuple else packet, stamp)
        self.stats["packets_out"] += len(packets)
        self.stats["tun_writes"] += 1
        if self._backlog:
            self._backlog.extend(packets)
            return
        if self._send(packets):
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        backlog, self._backlog = self._backlog, []
        if not self._send(backlog):
            self._loop.remove_writer(self.fd)

    def _send(self, packets: list[bytes | tuple]) -> bool:
        """Write what the TUN takes; keep the rest as the backlog. True if there is one."""
        while True:
            err = 0
            try:
                written = self.wire.write_batch(self.fd, packets)
            except OSError as exc:
                written, err = getattr(exc, "packets_written", 0), exc.errno or errno.EIO
                log.debug("TUN write failed: %s", errno.errorcode.get(err, exc))
            if (written < len(packets) and (not err or err in _REFUSALS)
                    and _length(packets[written]) > _MAX_PLAIN_WRITE):
                # Too large for this kernel (a short count is ENOBUFS: no memory for an
                # skb that large, whose pages come from high-order allocations; EAGAIN
                # needs a full send buffer, and a TUN's is INT_MAX). That packet is lost
                # (the stack resends it as any loss); the rest goes.
                self.stats["tun_write_errors"] += 1
                self._refused(packets[written])
                packets = packets[written + 1:]
                continue
            if err:
                # Refused for what it is (e.g. EINVAL for a bogus one) or the device is
                # going (EIO, EBADF): count it, drop the batch, as any loss.
                self.stats["tun_write_errors"] += 1
                self._backlog = []
                return False
            self._backlog = packets[written:]
            return bool(self._backlog)

    def segment_limit(self, family: int) -> int:
        """send_mss per segment of new data for a new flow of ``family`` (4 or 6)."""
        return BIG_SEGMENTS if (self.big_ipv4 if family == 4 else self.big_ipv6) else 1

    def _refused(self, packet: bytes | tuple) -> None:
        """The TUN refused ``packet``, over 64 KiB: send none that large again, in either
        family -- the skb that could not be had is the same (the flows resend it at
        send_mss, as any segment lost)."""
        if not (self.big_ipv4 or self.big_ipv6):
            return
        self.big_ipv4 = self.big_ipv6 = False
        self.stats["tun_big_refused"] += 1
        for flow in self.flows.values():
            flow.conn.set_segment_limit(1)
        log.warning("the kernel refused a %d-byte TUN write: segments of at most 64 KiB "
                    "from now on", _length(packet))

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        timers = self._timers
        flows = self.flows
        while timers and ((flow := flows.get(timers[0][2])) is None
                          or flow.timer_at != timers[0][0]):
            heapq.heappop(timers)  # stale entry: the flow re-armed or went away
        when = timers[0][0] if timers else None
        if self._time_wait:
            first = next(iter(self._time_wait.values())).deadline
            if when is None or first < when:
                when = first
        if when is None:
            return
        if self._timer_at is not None and self._timer_at <= when and self._timer_handle:
            return
        if self._timer_handle:
            self._timer_handle.cancel()
        self._timer_at = when
        self._timer_handle = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._timer_at = None
        now = self._loop.time()
        table = self._time_wait
        while table and next(iter(table.values())).deadline <= now:
            table.popitem(last=False)
        timers = self._timers
        flows = self.flows
        while timers and timers[0][0] <= now:
            deadline, _, key = heapq.heappop(timers)
            flow = flows.get(key)
            if flow is None or flow.timer_at != deadline:
                continue
            flow.timer_at = None
            conn = flow.conn
            conn.handle_timer(now)
            if conn.timeouts_in_a_row == STALL_TIMEOUTS:
                self.stats["flows_stalled"] += 1
                flow.log.warning("%d retransmission timeouts without an ACK from the app "
                                 "(%s)", STALL_TIMEOUTS, conn.describe())
            self.touch(flow)
        self.transmit()

    # ------------------------------------------------------------------ misc

    def endpoint_ssl(self) -> Any:
        if self.endpoint.scheme != "https":
            return None
        if not hasattr(self, "_ssl"):
            import ssl
            self._ssl = ssl.create_default_context()
        return self._ssl

    def snapshot_stats(self) -> dict[str, Any]:
        stats = dict(self.stats)
        # Segments we sent the app again: of the closed flows (forget) and the open ones.
        conns = [f.conn for f in self.flows.values()]
        stats["retransmits"] = self.stats["retransmits"] + sum(c.retransmits for c in conns)
        stats["sack_retransmits"] = (self.stats["sack_retransmits"]
                                     + sum(c.sack_retransmits for c in conns))
        stats["flows_active"] = len(self.flows)
        stats["flows_time_wait"] = len(self._time_wait)
        stats["fast_path"] = self.wire.IMPL
        return stats


_PURE_ACK = fast.ACK
_CONTROL = fast.SYN | fast.RST | fast.FIN | fast.ACK


def _superseded(a: tuple | int, b: tuple | int | None) -> bool:
    """Whether pure ACK ``a`` says nothing that ``b``, the next packet of the same read
    batch, does not say too, so that ``a`` need not be processed at all.

    In a bulk download the app's kernel ACKs every 64 KiB segment, and a TUN read returns
    several of those ACKs (~5 a batch on the suite's 1-flow download): only the last one
    moves anything. ``b`` must be of the same flow, at the same sequence number (``a``
    carried no data), and acknowledge strictly more: then its window is the newer one
    (RFC 9293 §3.10.7.4's SND.WL1/WL2 rule would take it over ``a``'s), its timestamp
    echo the more recent, and an ``a`` that was a duplicate ACK (RFC 5681) is stale, since
    ``b`` shows the hole filled. A receiver's stretch ACK is the same thing (RFC 5681 §4.2
    allows one per two segments; Linux GRO hands them up much larger). The connection
    still has its say (TcpConnection.coalesce_ack): slow start credits ``b`` with the
    growth ``a`` would have given, and in fast recovery every ACK is processed.
    """
    if type(a) is not tuple or type(b) is not tuple:
        return False
    # family, src, dst, sport, dport, seq, ack, flags, window, start, end, ...
    return (a[7] == _PURE_ACK and a[9] == a[10]
            and b[7] & _CONTROL == _PURE_ACK
            and a[3] == b[3] and a[4] == b[4] and a[1] == b[1] and a[2] == b[2]
            and a[5] == b[5]
            and 0 < (b[6] - a[6]) & 0xFFFFFFFF < 0x80000000)


def _length(packet: bytes | tuple) -> int:
    """Bytes of one packet as write_batch() takes it: bytes, or (headers, payload)."""
    return len(packet) if type(packet) is not tuple else sum(len(part) for part in packet)


def _open_pcap(path: Path, vnet: bool = False) -> Any:
    """A pcap writer of raw IP packets. With `vnet` (an offloaded TUN) each packet's
    virtio_net_hdr is stripped and a partial TCP checksum completed, so that Wireshark
    sees what the kernel on the other side sees."""
    import dpkt

    fh = os.fdopen(_create_private(path), "wb")  # closed in Engine.stop
    # 262144: what libpcap and Wireshark read at most, above a segment of
    # BIG_SEGMENTS x 64 KiB (an IPv4 one's length field 0: Wireshark takes it as TSO).
    return _Pcap(dpkt.pcap.Writer(fh, snaplen=262144, linktype=dpkt.pcap.DLT_RAW), vnet)


class _Pcap:
    def __init__(self, writer: Any, vnet: bool) -> None:
        self._writer = writer
        self._vnet = vnet

    def writepkt(self, packet: bytes, stamp: float) -> None:
        if self._vnet:
            packet = strip_vnet(packet)
        self._writer.writepkt(packet, ts=stamp)

    def close(self) -> None:
        self._writer.close()


_PRIVATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_private(path: Path) -> int:
    """A descriptor of `path` truncated and mode 0600 before the first byte is written:
    a capture holds the plaintext of every captured connection.

    os.open with mode 0600 (never the umask's 0644), not through a symbolic link (one
    planted in /tmp must not redirect a capture written by a root `up`), and checked on
    the descriptor, not the path, so a swapped entry cannot redirect the chmod.
    ConfigError, one line, for anything else.
    """
    fd = _open_private(path, _PRIVATE_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            # A device (/dev/null) must not be chmod-ed; a file of another user stays
            # theirs to read whatever mode we set.
            raise ConfigError(f"--pcap {path}: not a regular file of this user")
        if info.st_mode & 0o077:
            # Readable by others until now, so someone may hold it open: a chmod does not
            # take their descriptor away. Write a new file instead of reusing this one.
            os.close(fd)
            fd = -1
            _unlink_private(path)
            fd = _open_private(path, _PRIVATE_FLAGS | os.O_EXCL)
        # An existing file keeps its old mode through open(); truncate only now that it
        # is known to be ours.
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def _open_private(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"--pcap {path}: is a symbolic link; give the real path") from None
        raise ConfigError(f"--pcap {path}: {exc.strerror or exc}") from None


def _unlink_private(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"--pcap {path}: readable by other users and cannot be replaced: "
                          f"{exc.strerror or exc}") from None


async def run_engine(config: Config, plan: Any, tun: Any, state_dir: Path,
                     poller: BusyPollSelector | None = None) -> str:
    """Run until SIGINT/SIGTERM; returns why it stopped. ``poller``: the running loop's
    selector, when it is a BusyPollSelector."""
    assert config.proxy is not None
    endpoint = ProxyEndpoint(scheme=cast(Any, config.proxy.scheme), host=config.proxy.host,
                             port=config.proxy.port, addresses=tuple(plan.proxy_ips),
                             credentials=config.proxy.credentials)
    engine = Engine(config, endpoint, tun.fd, vnet=tun.vnet, big_ipv4=tun.big_ipv4,
                    big_ipv6=tun.big_ipv6,
                    pcap_path=config.pcap, poller=poller)
    memory.tune()
    loop = asyncio.get_running_loop()
    stopped = asyncio.get_running_loop().create_future()
    # asyncio resets a removed handler to the default (for SIGTERM: die on the spot), so
    # the caller's own handlers are put back afterwards.
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    def on_signal(signum: int) -> None:
        if not stopped.done():
            stopped.set_result(signal.Signals(signum).name)

    for signum in previous:
        loop.add_signal_handler(signum, on_signal, signum)
    engine.start()
    stats_path = state_dir / "stats.json"
    stats_failed = False
    try:
        while not stopped.done():
            try:
                _write_stats(stats_path, engine.snapshot_stats())
            except OSError as exc:
                # `status` loses its counters (a full /run, say); the data path must not.
                if not stats_failed:
                    log.warning("cannot write %s: %s (status shows no counters)",
                                stats_path, exc.strerror or exc)
                stats_failed = True
            await asyncio.wait([stopped], timeout=1.0)
    finally:
        engine.stop()
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
        with contextlib.suppress(OSError):  # whatever is there now is not worth a crash
            stats_path.unlink(missing_ok=True)
    return stopped.result()


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(stats, fh)
    os.replace(tmp, path)
