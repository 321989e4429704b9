"""One captured connection: the TCP state machine towards the app paired with its proxy tunnel.

Back-pressure, both ways:
- app -> proxy: the receive window we advertise is what the proxy socket's buffer can
  still take (`rcv_buf - write_buffer_size`); when the kernel buffer drains, asyncio's
  resume_writing reopens it.
- proxy -> app: bytes the TCP send queue cannot take stay in `pending` and the proxy
  socket stops being read until the app's ACKs free space.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, cast

from proxyvpn.aio.busypoll import BULK_BYTES
from proxyvpn.logs import FlowLogger
from proxyvpn.netstack.tcp import (
    Closed,
    ConnectionReset,
    DataReceived,
    PeerClosed,
    SendSpaceAvailable,
    TcpConnection,
    TimedOut,
)

if TYPE_CHECKING:
    from proxyvpn.aio.engine import Engine
    from proxyvpn.relay.dial import Dial, Tunnel

log = logging.getLogger("proxyvpn.flow")

EOF_POLL_FIRST = 0.01
"""Seconds until a held-back FIN first re-checks that the app's bytes reached the proxy;
the interval then doubles, up to EOF_POLL_MAX (or a quarter of half_close_delay)."""

EOF_POLL_MAX = 0.25


class Flow:
    """Glue between one TcpConnection and one TunnelProtocol (it is the tunnel's sink)."""

    __slots__ = ("engine", "key", "family", "conn", "dst_host", "dst_port", "tunnel", "dial",
                 "pending", "pending_eof", "timer_at", "_log", "_closed", "_reading_paused",
                 "_fin_queued", "_proxy_eof", "last_rx", "_eof_timer", "_eof_poll", "_eof_draining",
                 "gso_size")

    def __init__(self, engine: Engine, key: tuple[bytes, int, bytes, int], family: int,
                 conn: TcpConnection, dst_host: str, dst_port: int, gso_size: int = -1) -> None:
        self.engine = engine
        self.gso_size = gso_size
        """For build(): -1 plain packets; else the app's MSS, the size the kernel cuts our
        larger segments to if it must (offloaded TUN)."""
        self.key = key
        self.family = family
        self.conn = conn
        self.dst_host = dst_host
        self.dst_port = dst_port
        self.tunnel: Tunnel | None = None
        self.dial: Dial | None = None
        """The proxy dial while it runs."""
        self.pending = bytearray()
        self.pending_eof = False
        self.timer_at: float | None = None
        self._closed = False
        self._reading_paused = False
        self._fin_queued = False
        self._proxy_eof = False  # the destination finished sending (tunnel EOF)
        self.last_rx = 0.0
        self._eof_timer: asyncio.TimerHandle | None = None
        self._eof_poll = EOF_POLL_FIRST
        self._eof_draining = False  # the held FIN waits for the proxy's ACK of our bytes
        self._log: FlowLogger | None = None

    @property
    def log(self) -> FlowLogger:
        """This flow's logger (built on first use: most flows never log)."""
        if self._log is None:
            key, host, port = self.key, self.dst_host, self.dst_port
            src = f"{ipaddress.ip_address(key[0])}:{key[1]}"
            dst = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self._log = FlowLogger(log, {"flow": f"{src} -> {dst}"})
        return self._log

    # ------------------------------------------------------------ stack -> proxy

    def handle_events(self, now: float) -> None:
        """Act on everything the state machine reported."""
        conn = self.conn
        chunks: list | None = None  # the app's data, written with one syscall
        while (event := conn.next_event()) is not None:
            kind = type(event)
            if kind is DataReceived:
                data = cast(DataReceived, event).data
                if chunks is None:
                    chunks = [data]
                else:
                    chunks.append(data)
                continue
            if chunks is not None:
                self._to_tunnel(chunks)
                chunks = None
            if kind is SendSpaceAvailable:
                self._push_pending(now)
            elif kind is PeerClosed:
                self._app_half_closed(now)
            elif kind is ConnectionReset or kind is TimedOut:
                self.log.debug("%s", kind.__name__)
                self.close_tunnel(abort=True)
            elif kind is Closed:
                self._on_closed()
        if chunks is not None:
            self._to_tunnel(chunks)
        if self.tunnel is not None:
            conn.set_receive_space(self.engine.params.rcv_buf - self.tunnel.write_buffer_size())

    def _to_tunnel(self, chunks: list) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(chunks[0]) if len(chunks) == 1 else tunnel.writelines(chunks)

    def _app_half_closed(self, now: float) -> None:
        """The app sent FIN. Many proxies (tinyproxy and squid, measured) tear the whole
        tunnel down when the client half-closes, which would cut off the reply. So the
        FIN is passed on only once the proxy has acknowledged every byte of the app's
        and the reply direction has then been quiet for half_close_delay seconds:
        replies still arrive, and servers that wait for EOF still get it."""
        delay = self.engine.config.half_close_delay
        if delay <= 0 or self._proxy_eof:
            # With the reply direction already finished there is nothing to cut off:
            # pass the FIN on now, which also closes the proxy connection at once.
            self._forward_eof()
            return
        self.last_rx = now
        self._hold_eof(now)

    def _eof_timer_fired(self) -> None:
        self._eof_timer = None
        self._hold_eof(self.engine._loop.time())

    def _hold_eof(self, now: float) -> None:
        """Pass the held FIN on if its time has come, else look again when it may have."""
        loop = self.engine._loop
        delay = self.engine.config.half_close_delay
        tunnel = self.tunnel
        if tunnel is not None and (tunnel.unacknowledged() > 0 or self._reading_paused):
            # The app's last bytes have not even reached the proxy (a slow or lossy link
            # to it): the server cannot have answered yet, and a FIN now would let the
            # proxy drop the tunnel before it does. Or we have stopped reading the reply
            # (the app takes it slowly): no reply arriving is then no quiet, and the FIN
            # would cut off what the proxy still holds. Polled, backing off, since the
            # kernel tells no one when its send queue empties.
            self._eof_draining = True
            self._eof_timer = loop.call_at(now + self._eof_poll, self._eof_timer_fired)
            cap = min(delay / 4, EOF_POLL_MAX)
            self._eof_poll = min(self._eof_poll * 2, max(cap, EOF_POLL_FIRST))
            return
        if self._eof_draining:
            self._eof_draining = False  # acknowledged (within a poll): the quiet wait starts
            if now > self.last_rx:
                self.last_rx = now
        quiet_since = self.last_rx + delay
        if now >= quiet_since:
            self._forward_eof()
        else:
            self._eof_timer = loop.call_at(quiet_since, self._eof_timer_fired)

    def _forward_eof(self) -> None:
        if self.tunnel is not None:
            self.tunnel.write_eof()

    def _on_closed(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._eof_timer is not None:
            self._eof_timer.cancel()
        self.close_tunnel()
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        self.engine.forget(self)

    def close_tunnel(self, abort: bool = False) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.abort() if abort else tunnel.close()

    def after_transmit(self) -> None:
        """Hook after the engine sent our segments (nothing to do yet)."""

    # ------------------------------------------------------------ proxy -> stack

    def attach(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        # Reads of whole segments: each becomes full-sized segments with no runt after them.
        tunnel.read_in_units(self.conn.send_mss)
        tunnel.attach(self)

    def tunnel_data(self, data: bytes, last: bool = False) -> None:
        if len(data) > BULK_BYTES and self.engine.poller is not None:
            self.engine.poller.bulk()
        if self._eof_timer is not None:
            self.last_rx = self.engine._loop.time()
        if self.pending:
            self.pending += data
        else:
            taken = self.conn.send(data)
            if taken < len(data):
                self.pending += memoryview(data)[taken:]
        if self.pending and not self._reading_paused and self.tunnel is not None:
            self._reading_paused = True
            self.tunnel.pause_reading()
        if last:
            # The proxy's FIN came with these bytes: queued behind them now, it rides on
            # their last segment when the send queue took them all (one TUN write for a
            # short reply and its close).
            self._tunnel_ended()
        # Straight out, not at the next loop iteration: data_received is an event-loop
        # callback of its own, so nothing is left to coalesce with, and an interactive
        # reply saves a trip through the selector.
        self.engine.touch(self)
        self.engine.transmit()

    def tunnel_eof(self) -> None:
        self._tunnel_ended()
        self._wake()

    def _tunnel_ended(self) -> None:
        self._proxy_eof = True
        self.pending_eof = not self._fin_queued
        self._push_pending(self.engine._loop.time())

    def tunnel_lost(self, exc: Exception | None) -> None:
        now = self.engine._loop.time()
        if exc is not None:
            self.log.debug("proxy connection lost: %s", exc)
            self.tunnel = None
            self.conn.abort(now)
        else:
            self.pending_eof = not self._fin_queued
            self._push_pending(now)
        self._wake()

    def tunnel_writable(self) -> None:
        self._wake()  # transmit() runs handle_events, which reopens the receive window

    def _push_pending(self, now: float) -> None:
        if self.pending:
            taken = self.conn.send(self.pending)
            del self.pending[:taken]
        if not self.pending:
            if self.pending_eof:
                self.pending_eof = False
                self._fin_queued = True
                self.conn.close(now)
            elif self._reading_paused and self.tunnel is not None:
                self._reading_paused = False
                self.tunnel.resume_reading()

    def _wake(self) -> None:
        self.engine.touch(self)
        self.engine.schedule_transmit()
