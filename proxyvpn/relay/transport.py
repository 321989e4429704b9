"""A plain TCP transport driven straight from the event loop's reader/writer callbacks.

asyncio's selector transport does the same job, but setting one up costs three
``call_soon`` hops, a waiter future and two syscalls (getsockname, getpeername), and
tearing it down another hop. At 1,700 proxy connections a second that machinery was a
fifth of proxyvpn's CPU (cProfile of bench cps_64), so plain-TCP tunnels use this
instead. TLS tunnels keep asyncio's SSL transport.

It implements the part of :class:`asyncio.Transport` a :class:`~asyncio.Protocol`
relies on, with asyncio's semantics: writes go to the socket at once and queue only
what it does not take; ``pause_writing``/``resume_writing`` at the water marks; EOF is
``eof_received`` (closing unless it returns True); ``connection_lost`` comes from a
later loop iteration, never from inside the call that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Final

log = logging.getLogger("proxyvpn.relay")

READ_SIZE = 256 * 1024
"""Bytes per recv(): asyncio's own choice; a bulk download arrives 100-160 KB a read."""

# While the proxy streams to us, SO_RCVLOWAT is raised to the read size. Without it epoll
# wakes us for every ~100 KB the proxy writes, and each wake-up is a trip through the
# event loop, our TCP stack and a TUN write that wakes the app; with it each one moves a
# whole read (README, Performance: the 1-flow download +9 %, 8 flows +16 %, CPU per GB
# -10 %).

STREAM_AFTER = 1024 * 1024
"""Bytes a burst must have brought before the mark goes up, so that a reply smaller than
this (a web page, an API answer) never waits for the hold below."""

STREAM_READ = 64 * 1024
"""... and the read that raises it must be at least this long: the proxy is outpacing us."""

STREAM_HOLD = 0.001
"""Seconds without a read that end a burst. With the mark up, the bytes below it (the
tail of a download) are then read anyway and the mark is dropped: the most the mark
delays any byte (asyncio rounds its timeouts up to the millisecond)."""

FIN_PROBE_BELOW = 16 * 1024
"""A read shorter than this (a reply, not a stream) is followed at once by one more
recv(). On a short-lived connection under load the proxy's FIN has nearly always arrived
with the reply (squid relays the server's reply and close back to back: 17,555 of 17,555
replies in the bench's connection test), and knowing it now lets the stack send the reply
and its FIN in one segment, one TUN write, instead of a second segment after another trip
through the event loop. The first read (normally the whole CONNECT answer) is never
followed up, and once a follow-up finds nothing, or more data, the connection is taken for
a long-lived one or a stream and never followed up again: at most one recv() per
connection that finds nothing."""

_IOV_BATCH = 512
"""Buffers per sendmsg(), below Linux's IOV_MAX (1024)."""

_HOLD_FROM: Final = 4096
"""A queued chunk at least this long is held as it is when nothing can change it: bytes,
or a view of bytes (the TUN packets an upload's segments are views of) that is at least a
quarter of them, so a held view cannot pin much more memory than the queue counts.
Shorter ones, and any the writer may reuse once write() returns (a bytearray), are copied
into the queue's last bytearray, so that many tiny writes cannot make many small objects."""

_COALESCE_MAX: Final = 64 * 1024
"""... which takes copies up to this size: growing one large bytearray copies it whole."""


def _holdable(chunk: bytes | bytearray | memoryview) -> bool:
    if type(chunk) is bytes:
        return len(chunk) >= _HOLD_FROM
    if type(chunk) is memoryview and type(chunk.obj) is bytes:
        n = len(chunk)
        return n >= _HOLD_FROM and 4 * n >= len(chunk.obj)
    return False


def _flat(chunk: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """``chunk`` as the queue keeps it: len() in bytes, and never the caller's own view
    (which it may release while we still hold it); a view of another format or shape is
    cast to bytes, or copied if it is not contiguous. A send straight to the socket needs
    none of this (the kernel takes any buffer; TunnelProtocol writes bytes-sized items)."""
    if type(chunk) is bytes or type(chunk) is bytearray:
        return chunk
    view = memoryview(chunk)
    if view.ndim == 1 and view.itemsize == 1 and view.c_contiguous:
        return view
    return view.cast("B") if view.c_contiguous else view.tobytes()

CLOSE_STALL = 60.0
"""Seconds a closing transport waits for the peer to take any of its buffered bytes
before it gives up and aborts. The flow is gone by then: without a bound, a proxy that
stops reading would keep the socket and up to rcv_buf bytes until proxyvpn exits."""


_LOST: Final = asyncio.Protocol()
"""What a transport's protocol is once connection_lost() was delivered: every callback a
no-op, so a late call (get_protocol(), a stray timer) needs no check for None."""


class SocketTransport(asyncio.Transport):
    """One connected, non-blocking TCP socket and its protocol."""

    __slots__ = ("_loop", "_sock", "_fd", "_protocol", "_buffer", "_queued", "_high", "_low",
                 "_reading", "_writing", "_closing", "_eof", "_shut", "_at_eof", "_write_paused",
                 "_lost", "_linger", "_drained", "_read_size", "_burst", "_last_read", "_lowat_timer",
                 "_lowat_since", "_read_before", "_probe_fin")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.Protocol) -> None:
        """Take over ``sock`` (connected, non-blocking): tell ``protocol`` and start reading."""
        # No super().__init__(): it would only fill BaseTransport's `_extra` slot with a
        # dict, which get_extra_info() below never reads, and compiled (mypyc 2.4) this
        # class does not free that inherited slot: 64 bytes lost per proxy connection.
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        # What the socket did not take yet, mostly as the writer's own buffers (_HOLD_FROM):
        # one bytearray would cost a copy of every byte queued, and on growth CPython
        # copies its whole content again, which an upload through a slower proxy paid for
        # with up to a sixth of proxyvpn's CPU. Made on first use: an empty deque is
        # ~600 bytes, 6 MiB over 10,000 idle flows.
        self._buffer: deque[bytes | bytearray | memoryview] | None = None
        self._queued = 0  # bytes in _buffer
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._reading = False
        self._writing = False  # a writer callback is registered
        self._closing = False
        self._eof = False  # write_eof() called
        self._shut = False  # ... and the FIN went out (shutdown(SHUT_WR))
        self._at_eof = False  # the peer's FIN was read
        self._write_paused = False  # protocol.pause_writing() was called
        self._lost = False
        self._linger: asyncio.TimerHandle | None = None  # bounds close() (CLOSE_STALL)
        self._drained = False  # the peer took bytes since the linger timer was armed
        self._read_size = READ_SIZE
        self._burst = 0  # bytes read since the last pause of STREAM_HOLD
        self._last_read = 0.0  # loop time of the last read
        self._lowat_timer: asyncio.TimerHandle | None = None  # armed while the read mark is up
        self._lowat_since = 0.0  # when that timer was (re)armed
        self._read_before = False  # a read has returned bytes (the first is the CONNECT answer)
        self._probe_fin = True  # short reads are followed up (FIN_PROBE_BELOW)
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # ------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        more: bytes | None = None
        failed: OSError | None = None
        callback = "data_received"
        try:
            if data:
                now = self._loop.time()
                n = len(data)
                self._burst = self._burst + n if now - self._last_read < STREAM_HOLD else n
                self._last_read = now
                if (n >= STREAM_READ and self._burst >= STREAM_AFTER
                        and self._lowat_timer is None):
                    self._raise_lowat(now)
                if n < FIN_PROBE_BELOW and self._probe_fin and self._read_before:
                    try:
                        # Sized for what it is looking for: recv() allocates the whole
                        # size before it reads, and mostly there is nothing to read.
                        more = self._sock.recv(FIN_PROBE_BELOW)
                    except (BlockingIOError, InterruptedError):
                        self._probe_fin = False
                    except OSError as exc:
                        failed = exc  # after the bytes before it, as a later read would
                    if more == b"":
                        # Known before the bytes are delivered (eof_read()), so the FIN
                        # can ride on their last segment.
                        self.pause_reading()
                        self._at_eof = True
                    elif more:
                        self._probe_fin = False  # a stream after all
                        self._burst += len(more)
                self._read_before = True
                self._protocol.data_received(data)
                if more and not self._closing:
                    # Already read: delivered even if the protocol paused reading just
                    # now (once per connection at most; asyncio never does this).
                    self._protocol.data_received(more)
                if failed is not None:
                    self._fatal(failed)
                if more != b"" or self._closing:
                    return
            else:
                self.pause_reading()
                self._at_eof = True
            callback = "eof_received"
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._protocol_failed(exc, callback)
            return
        if not keep_open:
            self.close()

    def eof_read(self) -> bool:
        """Whether the peer's FIN has been read. During data_received() this says that
        eof_received() follows at once (unless the protocol closes the transport
        meanwhile): the proxy's FIN came with those bytes."""
        return self._at_eof

    def _raise_lowat(self, now: float) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self._read_size)
        self._lowat_since = now
        self._lowat_timer = self._loop.call_at(now + STREAM_HOLD, self._lowat_check)

    def _lowat_check(self) -> None:
        """While reads keep coming, look again a hold after the last one; once none came
        for a hold, drop the mark and read whatever sits below it."""
        if self._last_read > self._lowat_since:
            self._lowat_since = self._loop.time()
            self._lowat_timer = self._loop.call_at(self._last_read + STREAM_HOLD,
                                                   self._lowat_check)
            return
        self._lowat_timer = None
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if self._reading:
            self._on_readable()

    def read_in_units(self, unit: int) -> None:
        """Make every full read a whole number of ``unit`` bytes (the app's segment size):
        a read of READ_SIZE would end in a runt segment of READ_SIZE % unit bytes, one
        more TUN write (and app wake-up) per read."""
        if 0 < unit <= READ_SIZE:
            self._read_size = READ_SIZE - READ_SIZE % unit

    @property
    def read_size(self) -> int:
        """Bytes asked of each recv(); also the read mark while the proxy streams."""
        return self._read_size

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._at_eof:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # ------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("write() after write_eof()")
        if self._closing or not data:
            return  # closing: dropped silently (TunnelProtocol checks is_closing() itself)
        if self._queued:
            self._queue((data,), 0)
            return
        sent = self._send(self._sock.send, data)
        if sent is not None and sent < len(data):
            self._queue((data,), sent)

    def writelines(self, chunks: list[bytes | memoryview]) -> None:  # type: ignore[override]
        """Write several buffers with one sendmsg() (asyncio's joins them into a copy)."""
        if self._eof:
            raise RuntimeError("write() after write_eof()")
        if self._closing:
            return
        for i in range(0, len(chunks), _IOV_BATCH):
            if self._closing:
                return
            batch = chunks[i:i + _IOV_BATCH]
            if self._queued:
                self._queue(batch, 0)
                continue
            sent = self._send(self._sock.sendmsg, batch)
            if sent is None:
                return
            if sent < sum(map(len, batch)):
                self._queue(batch, sent)

    def _send(self, send: Callable[[Any], int], data: Any) -> int | None:
        """Bytes ``send(data)`` took (0 if the socket is full); None after a fatal error."""
        try:
            return send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fatal(exc)
            return None

    def _queue(self, chunks: tuple | list, skip: int) -> None:
        """Buffer what the socket did not take: ``chunks`` after their first ``skip`` bytes."""
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        was_empty = not self._queued
        for chunk in chunks:
            chunk = _flat(chunk)
            n = len(chunk)
            if skip >= n:
                skip -= n
                continue
            part = memoryview(chunk)[skip:] if skip else chunk
            skip = 0
            if _holdable(part):
                buffer.append(part)
            else:
                tail = buffer[-1] if buffer else None
                if type(tail) is bytearray and len(tail) < _COALESCE_MAX:
                    tail += part
                else:
                    buffer.append(bytearray(part))
            self._queued += len(part)
        if not self._queued:
            return
        if was_empty:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        if not self._write_paused and self._queued > self._high:
            self._write_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                self._protocol_failed(exc, "pause_writing")

    def _on_writable(self) -> None:
        buffer = self._buffer
        if buffer is None:  # registered only while bytes are queued
            return
        sent = self._send(self._sock.sendmsg, list(islice(buffer, _IOV_BATCH)))
        if not sent:
            return
        self._queued -= sent
        while sent:
            n = len(buffer[0])
            if sent < n:
                buffer[0] = memoryview(buffer[0])[sent:]
                break
            buffer.popleft()
            sent -= n
        self._drained = True
        if self._write_paused and self._queued <= self._low:
            self._write_paused = False
            try:
                self._protocol.resume_writing()  # may write, close or write_eof
            except Exception as exc:
                self._protocol_failed(exc, "resume_writing")
                return
        if buffer or not self._writing:
            return
        self._writing = False
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._lose(None)
        elif self._eof:
            self._shutdown_write()

    def write_eof(self) -> None:
        if self._eof or self._closing:
            return
        self._eof = True
        if not self._queued:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        if self._shut or self._lost:
            return
        self._shut = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fatal(exc)

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._queued

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 4 * low if low is not None else 64 * 1024
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    # ------------------------------------------------------------ closing

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; once the write buffer is flushed, close the socket."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._queued:
            self._lose(None)
        else:
            self._drained = False
            self._linger = self._loop.call_later(CLOSE_STALL, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger = None
        if self._lost:
            return
        if self._drained:  # slow but moving: give it another period
            self._drained = False
            self._linger = self._loop.call_later(CLOSE_STALL, self._linger_expired)
            return
        log.debug("proxy took none of %d buffered bytes in %.0f s after close: aborting",
                  self._queued, CLOSE_STALL)
        self._force_close(TimeoutError("the proxy stopped reading"))

    def abort(self) -> None:
        """Close now, dropping whatever is still buffered."""
        self._force_close(None)

    def _fatal(self, exc: OSError) -> None:
        log.debug("proxy socket error: %s", exc)
        self._force_close(exc)

    def _protocol_failed(self, exc: Exception, method: str) -> None:
        """A protocol callback raised (a bug): report it as asyncio does, then close."""
        self._loop.call_exception_handler({
            "message": f"Fatal error: protocol.{method}() call failed.",
            "exception": exc, "transport": self, "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._closing = True
        self.pause_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._buffer = None
        self._queued = 0
        self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._lowat_timer is not None:
            self._lowat_timer.cancel()
            self._lowat_timer = None
        # A later iteration, as asyncio does: the protocol's owner may be in the middle
        # of the call that closed us.
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            # The protocol holds us (its .transport), and through it the flow and its TCP
            # state: left in place, that cycle made every connection garbage that only the
            # cyclic collector could free, and flows outlive its young collections (the
            # 2 s TIME-WAIT), so they piled up in the older generations: RSS 40 -> 260 MiB
            # over 200,000 connections with none open (bench lab, cps_64 rounds). asyncio's
            # transports let go of their protocol here too.
            self._protocol = _LOST

    # ------------------------------------------------------------ misc

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``peername`` and ``sockname`` (asked of the socket on demand);
        ``sslcontext`` is None: this transport is never TLS."""
        try:
            if name == "socket":
                return self._sock
            if name == "peername":
                return self._sock.getpeername()
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            return default
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("SocketTransport keeps the protocol it was made with")
