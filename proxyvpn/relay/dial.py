"""Dialing the upstream proxy and running one CONNECT tunnel (asyncio shell).

:func:`start_tunnel` (callbacks; what the engine uses) and :func:`open_tunnel` (the
same as a coroutine) connect to the proxy -- trying its already-resolved
addresses in order on a socket that carries the bypass ``SO_MARK`` so policy
routing does not capture it again -- optionally wrap it in TLS, send the
CONNECT request (RFC 9110 §9.3.6) and wait for a 2xx. Plain connections run on
our own :class:`~proxyvpn.relay.transport.SocketTransport`, TLS ones on asyncio's. The handshake logic
itself lives in the sans-IO :mod:`proxyvpn.relay.connect`; this module only
moves bytes.

After the handshake the :class:`TunnelProtocol` is a plain byte pipe: bytes from
the proxy go to a :class:`TunnelSink` (the flow's TCP state machine towards the
app), bytes from the app go out through :meth:`TunnelProtocol.write`. Back-pressure
is explicit: the sink pauses/resumes reading, and the protocol reports when its
write buffer is above the high-water mark.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from proxyvpn.errors import (
    PrivilegeError,
    ProxyError,
    ProxyProtocolError,
    ProxyUnreachableError,
    ProxyVpnError,
)
from proxyvpn.relay.connect import (
    ConnectResponse,
    ConnectResponseParser,
    connect_request,
    format_authority,
)
from proxyvpn.relay.transport import SocketTransport

__all__ = ["Dial", "ProxyEndpoint", "TunnelProtocol", "TunnelSink", "open_tunnel", "start_tunnel"]

log = logging.getLogger("proxyvpn.relay")

#: Write-buffer high-water mark: above it the proxy socket is "full" and the
#: flow should stop accepting data from the app (shrink its receive window).
WRITE_HIGH_WATER = 1024 * 1024
#: Low-water mark: below it writing resumes (``TunnelSink.tunnel_writable``).
WRITE_LOW_WATER = 256 * 1024
#: Bytes received before a sink is attached that we buffer before pausing the
#: socket; nothing may grow without bound (DESIGN.md, path step 3).
PENDING_LIMIT = WRITE_HIGH_WATER

# Linux value of SO_MARK (asm-generic/socket.h); socket.SO_MARK exists on
# Linux builds of CPython but is looked up defensively.
_SO_MARK: int = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True, repr=False)
class ProxyEndpoint:
    """Where the upstream proxy is and how to talk to it."""

    scheme: Literal["http", "https"]
    """``http``: plain TCP to the proxy; ``https``: TLS to the proxy, then CONNECT inside."""
    host: str
    """The proxy's name as configured: used for TLS SNI / certificate check and display."""
    port: int
    """The proxy's TCP port."""
    addresses: tuple[str, ...]
    """IP addresses to try, in order; resolved by the caller (no DNS here)."""
    credentials: tuple[str, str] | None = None
    """(user, password) for Basic proxy authentication (RFC 7617), or None."""

    def __post_init__(self) -> None:
        """Validate fields so a bad endpoint fails at construction, not mid-dial."""
        if self.scheme not in ("http", "https"):
            raise ValueError(f"proxy scheme must be 'http' or 'https', got {self.scheme!r}")
        if isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"proxy port must be in 1..65535, got {self.port!r}")
        for address in self.addresses:
            ipaddress.ip_address(address)  # raises ValueError for a name or garbage

    def __repr__(self) -> str:
        """Like the dataclass repr, but the password is replaced by ``***``."""
        creds = None if self.credentials is None else (self.credentials[0], "***")
        return (
            f"ProxyEndpoint(scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
            f"addresses={self.addresses!r}, credentials={creds!r})"
        )

    def __str__(self) -> str:  # (not `__str__ = __repr__`: mypyc cannot compile that)
        return self.__repr__()


class TunnelSink(Protocol):
    """Receives what happens on the proxy side of an established tunnel.

    Implemented by the flow that owns the tunnel (the TCP state machine towards
    the app). All methods are called from the event loop and must not block.
    """

    def tunnel_data(self, data: bytes, last: bool = False) -> None:
        """Bytes from the destination, in order. ``last``: the proxy's FIN came with
        them, and stands for the tunnel_eof() that will not follow."""

    def tunnel_eof(self) -> None:
        """The proxy half-closed: no more data will come (we may still write)."""

    def tunnel_lost(self, exc: Exception | None) -> None:
        """The connection is gone; ``exc`` is None for an orderly close."""

    def tunnel_writable(self) -> None:
        """The write buffer drained below the low-water mark; writing may resume."""


class Tunnel(Protocol):
    """What the owner of an established tunnel does with it: :class:`TunnelProtocol`.

    Typed as a protocol, not as the class, so that a stand-in (the benchmarks' and
    tests' sinks) can take its place: compiled code checks class annotations at run time.
    """

    def attach(self, sink: TunnelSink) -> None: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def writelines(self, chunks: list[bytes | memoryview]) -> None: ...
    def write_eof(self) -> None: ...
    def write_buffer_size(self) -> int: ...
    def unacknowledged(self) -> int: ...
    def read_in_units(self, unit: int) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class TunnelProtocol(asyncio.Protocol):
    """One CONNECT tunnel: the handshake, then a byte pipe to a :class:`TunnelSink`.

    Life cycle: ``connection_made`` sends the CONNECT request; responses are
    parsed by :class:`ConnectResponseParser`; on a 2xx :attr:`response` holds the
    :class:`ConnectResponse`, :attr:`on_settled` gets None and the protocol enters
    relay mode; on anything else it gets :class:`ProxyError` /
    :class:`ProxyProtocolError` and the transport is closed. In relay mode, data (starting with the bytes
    that followed the header block) goes to the sink given to :meth:`attach`;
    whatever arrives before ``attach`` is buffered and flushed, in order, by it.
    """

    def __init__(self, dst_host: str, dst_port: int, credentials: tuple[str, str] | None) -> None:
        """Prepare a tunnel to ``dst_host:dst_port``; raises ValueError for a bad target."""
        # Built now so a bad host fails before any socket exists.
        self.target = format_authority(dst_host, dst_port)
        """The CONNECT target, ``host:port`` (IPv6 in brackets)."""
        self._request = connect_request(self.target, credentials)
        self.on_settled: Callable[[ProxyVpnError | None], None] | None = None
        """Called once the handshake ends: None for a 2xx, else ProxyError /
        ProxyProtocolError (set by the :class:`Dial` that drives this protocol)."""
        self.response: ConnectResponse | None = None
        """The proxy's final response, once received (2xx or not)."""
        self.writing_paused = False
        """True while the transport's write buffer is above the high-water mark."""
        self.transport: asyncio.Transport | None = None
        self._parser: ConnectResponseParser | None = ConnectResponseParser()
        self._sink: TunnelSink | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_eof = False
        self._pending_lost: tuple[Exception | None] | None = None
        self._user_paused = False  # pause_reading() by the owner
        self._pending_paused = False  # paused because nothing is attached yet
        self._eof_written = False
        self._eof_received = False
        self._tls = False
        self._closed = False
        self._relaying = False  # a 2xx arrived: bytes now belong to the flow

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the CONNECT request as soon as the (TLS) connection exists."""
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        # Our own marks instead of asyncio's 64 KiB default: a flow relays bulk
        # data and a deeper buffer keeps the pipe full while the app side reacts.
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if log.isEnabledFor(logging.DEBUG):  # getpeername() is a syscall
            log.debug("CONNECT %s via %s", self.target, transport.get_extra_info("peername"))
        # Never log the request: it may carry Proxy-Authorization. Drop our
        # copy once sent so the credentials do not outlive the handshake here.
        self.transport.write(self._request)
        self._request = b""

    def data_received(self, data: bytes) -> None:
        """Feed the handshake parser, or pass tunnel bytes to the sink."""
        if self._parser is not None:
            self._handshake_data(data)
        elif self._relaying:
            self._deliver(data)
        # else: the handshake failed; whatever follows (an error page body) is
        # not tunnel data and the transport is already closing.

    def eof_received(self) -> bool:
        """The proxy half-closed its side.

        During the handshake this is a protocol error. In relay mode it is the
        destination's FIN: tell the sink (unless _deliver gave it the FIN with the
        last bytes, SocketTransport.eof_read) and keep the transport open (return
        True) so the other direction can still flow -- a half-closed TCP
        connection is legitimate (RFC 9293 §3.6). If our FIN went out already,
        both directions are done and the transport may close (return False).
        TLS has no half-close: the SSL transport ignores the return value and
        warns when it is True, so return False there too.
        """
        if self._parser is not None:
            self._fail(ProxyProtocolError("proxy closed the connection before answering CONNECT"))
            return False
        if not self._relaying:
            return False
        if not self._eof_received:  # else _deliver gave the sink this FIN with the last bytes
            self._eof_received = True
            if self._sink is not None:
                self._sink.tunnel_eof()
            else:
                self._pending_eof = True
        # Both directions finished: nothing can flow any more, let it close.
        return not self._tls and not self._eof_written

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: fail the handshake or tell the sink."""
        self._closed = True
        if self._parser is not None:
            detail = f": {exc}" if exc is not None else ""
            self._fail(
                ProxyProtocolError(f"proxy closed the connection before answering CONNECT{detail}")
            )
            return
        if not self._relaying:
            return
        if self._sink is not None:
            self._sink.tunnel_lost(exc)
        else:
            self._pending_lost = (exc,)

    def pause_writing(self) -> None:
        """Write buffer above the high-water mark: the owner should stop writing."""
        self.writing_paused = True

    def resume_writing(self) -> None:
        """Write buffer drained to the low-water mark: tell the sink it may write."""
        self.writing_paused = False
        if self._sink is not None:
            self._sink.tunnel_writable()

    # ------------------------------------------------------------ handshake

    def _handshake_data(self, data: bytes) -> None:
        """Parse response bytes; settle (:attr:`on_settled`) when complete."""
        assert self._parser is not None
        try:
            response = self._parser.feed(data)
        except ProxyProtocolError as exc:
            self._fail(exc)
            return
        if response is None:
            return
        self._parser = None
        self.response = response
        if not response.ok:
            log.info(
                "proxy refused CONNECT %s: %d %s", self.target, response.status, response.reason
            )
            self._fail(ProxyError(response.status, response.reason, self.target))
            return
        log.debug("tunnel to %s established (%d %s)", self.target, response.status, response.reason)
        self._relaying = True
        if response.leftover:
            # Bytes that shared a read with the header block are the first
            # bytes of the tunnelled flow (RFC 9110 §9.3.6): keep them first,
            # buffered until the owner attaches.
            self._deliver(response.leftover)
        self._settle(None)

    def _settle(self, exc: ProxyVpnError | None) -> None:
        settled, self.on_settled = self.on_settled, None
        if settled is not None:
            settled(exc)

    def _fail(self, exc: ProxyVpnError) -> None:
        """Fail the handshake and drop the connection to the proxy."""
        self._parser = None
        self._settle(exc)
        if self.transport is not None and not self._closed:
            self.transport.close()

    # ------------------------------------------------------------ relay mode

    def _deliver(self, data: bytes) -> None:
        """Give tunnel bytes to the sink, or buffer them until one is attached."""
        if self._sink is not None:
            transport = self.transport
            last = isinstance(transport, SocketTransport) and transport.eof_read()
            if last:
                # Before the sink runs: what it does in the call (write_eof) must see
                # the proxy's FIN as received already.
                self._eof_received = True
            self._sink.tunnel_data(data, last)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= PENDING_LIMIT and not self._pending_paused:
            self._pending_paused = True
            self._apply_reading()

    def attach(self, sink: TunnelSink) -> None:
        """Start delivering tunnel events to ``sink``, first flushing any buffered ones."""
        if self._sink is not None:
            raise RuntimeError("TunnelProtocol.attach() called twice")
        self._sink = sink
        pending, self._pending, self._pending_size = self._pending, [], 0
        # A FIN that came before the sink rides with the last bytes, as in _deliver.
        eof_with_data = self._pending_eof and bool(pending)
        for i, chunk in enumerate(pending):
            sink.tunnel_data(chunk, eof_with_data and i == len(pending) - 1)
        if self._pending_eof:
            self._pending_eof = False
            if not eof_with_data:
                sink.tunnel_eof()
        if self._pending_lost is not None:
            (exc,) = self._pending_lost
            self._pending_lost = None
            sink.tunnel_lost(exc)
        if self._pending_paused:
            self._pending_paused = False
            self._apply_reading()

    def _apply_reading(self) -> None:
        """Pause or resume the transport according to both pause reasons."""
        if self.transport is None or self._closed or self.transport.is_closing():
            return
        if self._user_paused or self._pending_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def write(self, data: bytes | memoryview) -> None:
        """Send tunnel bytes towards the destination.

        Raises RuntimeError before the tunnel is established (bytes sent then
        would be read by the proxy as a new request) or after :meth:`write_eof`.
        Silently drops data once the connection is closing: ``tunnel_lost``
        reports that.
        """
        transport = self._open_for_writing()
        if transport is not None:
            transport.write(data)

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        """:meth:`write` for several buffers at once (one syscall on a plain tunnel)."""
        transport = self._open_for_writing()
        if transport is not None:
            transport.writelines(chunks)

    def _open_for_writing(self) -> asyncio.Transport | None:
        """The transport to write to; None once closing; RuntimeError if writing is wrong."""
        if not self._relaying:
            raise RuntimeError(f"tunnel to {self.target} is not established")
        if self._eof_written:
            raise RuntimeError("write() after write_eof()")
        if self.transport is None or self._closed or self.transport.is_closing():
            return None
        return self.transport

    def write_eof(self) -> None:
        """Half-close towards the destination after the buffered data.

        Plain TCP sends a FIN. TLS cannot half-close (close_notify ends the
        whole session), so there it is only remembered (:attr:`eof_written`)
        and the owner closes when the other direction ends too. If the proxy
        already half-closed, both directions are finished and the transport is
        closed (after flushing).
        """
        if self._eof_written:
            return
        self._eof_written = True
        if self.transport is None or self._closed or self.transport.is_closing():
            return
        if self._eof_received:
            # The proxy already finished its direction: the tunnel is done, and close()
            # sends the FIN after the buffered data (a shutdown() first would only cost
            # a syscall: no data can follow the proxy's FIN, so close() never resets).
            self.transport.close()
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    @property
    def eof_written(self) -> bool:
        """True once :meth:`write_eof` was called (even if TLS could not send it)."""
        return self._eof_written

    def close(self) -> None:
        """Close after flushing the write buffer."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close immediately, discarding buffered data (the app side was reset)."""
        if self.transport is not None:
            self.transport.abort()

    def read_in_units(self, unit: int) -> None:
        """Read the proxy in whole multiples of ``unit`` bytes where our transport does
        the reading (not TLS: asyncio's SSL transport decides its own reads)."""
        if isinstance(self.transport, SocketTransport):
            self.transport.read_in_units(unit)

    def pause_reading(self) -> None:
        """Stop reading from the proxy: the app side cannot take more for now."""
        self._user_paused = True
        self._apply_reading()

    def resume_reading(self) -> None:
        """Resume reading from the proxy."""
        self._user_paused = False
        self._apply_reading()

    def write_buffer_size(self) -> int:
        """Bytes queued towards the proxy and not yet accepted by the kernel."""
        if self.transport is None or self._closed:
            return 0
        return self.transport.get_write_buffer_size()

    def unacknowledged(self) -> int:
        """Bytes written towards the proxy that its kernel has not acknowledged yet: our
        queue plus the socket's send queue (SIOCOUTQ: unsent and unacknowledged)."""
        queued = self.write_buffer_size()
        if self.transport is None or self._closed:
            return queued
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return queued
        try:
            outq = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):  # closed under us (fd -1): nothing more goes out
            return queued
        return queued + int(struct.unpack("i", outq)[0])


# --------------------------------------------------------------------------- dialing


def _set_mark(sock: socket.socket, mark: int) -> None:
    """Put the bypass fwmark on ``sock`` so policy routing lets it out directly."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
    except PermissionError:
        raise PrivilegeError("setting SO_MARK needs CAP_NET_ADMIN") from None


class Dial:
    """One tunnel being opened, driven by loop callbacks (no task, no futures).

    TCP-connects to each endpoint address in turn on a marked socket, adds TLS for
    ``https`` (asyncio's SSL transport: the one step that runs as a task), then lets the
    protocol send CONNECT and read the answer. ``on_done`` is called exactly once: with
    None when the protocol is in relay mode, else with the error. One timer bounds it all.
    """

    __slots__ = ("_loop", "_endpoint", "_protocol", "_mark", "_timeout", "_tls", "_on_done",
                 "_addresses", "_address", "_cause", "_sock", "_connecting", "_transport",
                 "_task", "_phase", "_timer", "_done")

    def __init__(self, endpoint: ProxyEndpoint, protocol: TunnelProtocol, *, mark: int | None,
                 timeout: float, tls: ssl.SSLContext | None,
                 on_done: Callable[[ProxyVpnError | None], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        # get_running_loop() costs a getpid() syscall: a caller that has the loop passes it.
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._endpoint = endpoint
        self._protocol = protocol
        self._mark = mark
        self._timeout = timeout
        self._tls = tls
        self._on_done = on_done
        self._addresses = iter(endpoint.addresses)
        self._address = ""
        self._cause: str | None = None  # why the last address failed
        self._sock: socket.socket | None = None  # ours until a transport owns it
        self._connecting = False  # a writer callback waits for connect() to finish
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task | None = None
        self._phase = "connect"
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._endpoint.addresses:
            self._finish(ProxyUnreachableError((), "no proxy address to try"))
            return
        self._timer = self._loop.call_at(self._loop.time() + self._timeout, self._timed_out)
        self._protocol.on_settled = self._finish
        self._try_next()

    @property
    def done(self) -> bool:
        """True once finished, failed or cancelled."""
        return self._done

    def cancel(self) -> None:
        """Give up (the flow went away): close whatever exists; ``on_done`` is not called."""
        if not self._done:
            self._done = True
            self._cleanup(failed=True)

    # ------------------------------------------------------------ steps

    def _try_next(self) -> None:
        port = self._endpoint.port
        for address in self._addresses:
            self._address = address
            # Validated IP literals (ProxyEndpoint): only IPv6 ones contain a colon.
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                # Non-blocking from birth: setblocking() would be one more syscall.
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # e.g. IPv6 disabled: EAFNOSUPPORT
                self._cause = f"{address}: {_strerror(exc)}"
                continue
            try:
                if self._mark is not None:
                    _set_mark(sock, self._mark)
                # CONNECT request and small interactive writes must not wait for Nagle.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = sock.connect_ex((address, port))
            except PrivilegeError as exc:
                sock.close()
                self._finish(exc)
                return
            except OSError as exc:
                sock.close()
                self._failed_address(_strerror(exc))
                continue
            if err == errno.EINPROGRESS and _established(sock):
                err = 0
            if err == errno.EINPROGRESS:
                self._sock = sock
                self._connecting = True
                self._loop.add_writer(sock.fileno(), self._on_connect_done)
                return
            if err == 0:
                self._connected(sock)
                return
            sock.close()
            self._failed_address(os.strerror(err))
        self._finish(ProxyUnreachableError(self._endpoint.addresses,
                                           self._cause or "no address tried"))

    def _failed_address(self, reason: str) -> None:
        # Our own wording: asyncio's ("Connect call failed ...") hid the errno text
        # users recognise, e.g. "Connection refused".
        self._cause = f"{self._address} port {self._endpoint.port}: {reason}"
        log.debug("proxy %s", self._cause)

    def _on_connect_done(self) -> None:
        sock = self._sock
        assert sock is not None
        self._connecting = False
        self._loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._sock = None
            sock.close()
            self._failed_address(os.strerror(err))
            self._try_next()
            return
        self._connected(sock)

    def _connected(self, sock: socket.socket) -> None:
        if self._tls is None:
            self._sock = None  # the transport owns it from here
            self._phase = "CONNECT response"
            # The protocol sends CONNECT from connection_made and settles us on the answer.
            self._transport = SocketTransport(self._loop, sock, self._protocol)
        else:
            # The socket stays ours until the task runs: cancelled before its first
            # step, the coroutine never starts and would not close it.
            self._sock = sock
            self._phase = "TLS handshake"
            self._task = self._loop.create_task(self._start_tls(sock, self._tls))

    async def _start_tls(self, sock: socket.socket, tls: ssl.SSLContext) -> None:
        host = self._endpoint.host
        self._sock = None  # create_connection owns it (and closes it on failure)
        try:
            transport, _ = await self._loop.create_connection(
                lambda: self._protocol, sock=sock, ssl=tls, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            # create_connection closed the socket already.
            self._finish(ProxyUnreachableError(self._endpoint.addresses,
                                               f"TLS handshake with {host} failed: {exc}"))
            return
        self._transport = cast(asyncio.Transport, transport)
        if not self._done:
            self._phase = "CONNECT response"

    def _timed_out(self) -> None:
        self._timer = None
        if self._phase != "connect":
            what = f"waiting for {self._phase}"
        elif self._cause is None:
            what = f"connecting to port {self._endpoint.port}"
        else:  # an earlier address failed differently: say how
            what = f"connecting to port {self._endpoint.port} (earlier: {self._cause})"
        self._finish(ProxyUnreachableError(self._endpoint.addresses,
                                           f"timed out after {self._timeout:g}s {what}"))

    def _finish(self, exc: ProxyVpnError | None) -> None:
        if self._done:
            return
        self._done = True
        self._cleanup(failed=exc is not None)
        self._on_done(exc)

    def _cleanup(self, *, failed: bool) -> None:
        self._protocol.on_settled = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not failed:
            return
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._connecting:
                self._connecting = False
                self._loop.remove_writer(sock.fileno())
            sock.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # asyncio closes the half-made TLS transport
        if self._transport is not None:
            self._transport.abort()


def _established(sock: socket.socket) -> bool:
    """Whether a connect() that said EINPROGRESS has finished already.

    To a proxy in this host or on a veth, the whole handshake runs inside connect()
    (the SYN-ACK is processed as the call releases the socket), so asking costs one
    getpeername() and saves waiting for writability: two epoll_ctl() calls and a
    trip through the event loop per connection. getpeername() fails with ENOTCONN
    until the connection is established, and after a failure, which the writer
    callback then reports.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


def start_tunnel(
    endpoint: ProxyEndpoint,
    dst_host: str,
    dst_port: int,
    *,
    mark: int | None,
    timeout: float,
    protocol: TunnelProtocol,
    on_done: Callable[[ProxyVpnError | None], None],
    ssl_context: ssl.SSLContext | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Dial:
    """Start opening a CONNECT tunnel to ``dst_host:dst_port`` (the target ``protocol``
    was made for) through ``endpoint``; ``on_done`` gets None or the error, once.

    Tries ``endpoint.addresses`` in order; each socket gets ``SO_MARK = mark``
    (unless None) and TCP_NODELAY. The first address to accept is used; the
    rest of the handshake (TLS for ``https``, CONNECT, response) runs on it.
    ``timeout`` bounds the whole operation. Once done without error ``protocol`` is in
    relay mode (``protocol.response`` holds the 2xx); ``protocol.attach(sink)`` starts
    the data. ``on_done`` may run before this returns (e.g. no address at all).

    ``loop`` is the running event loop, for a caller that has it at hand.

    For ``https`` without ``ssl_context`` a default verifying context is used;
    the certificate is checked against ``endpoint.host``.

    Errors given to ``on_done``:
        PrivilegeError: ``mark`` given but the process lacks CAP_NET_ADMIN.
        ProxyUnreachableError: no address accepted, TLS failed, or timeout.
        ProxyError: the proxy answered non-2xx (``auth_failed`` for 407).
        ProxyProtocolError: the proxy's answer was not valid HTTP/1.x, or it
            closed the connection before answering.
    """
    tls: ssl.SSLContext | None = None
    if endpoint.scheme == "https":
        tls = ssl_context if ssl_context is not None else ssl.create_default_context()
    dial = Dial(endpoint, protocol, mark=mark, timeout=timeout, tls=tls, on_done=on_done,
                loop=loop)
    dial.start()
    return dial


async def open_tunnel(
    endpoint: ProxyEndpoint,
    dst_host: str,
    dst_port: int,
    *,
    mark: int | None,
    timeout: float,
    protocol: TunnelProtocol,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """:func:`start_tunnel` as a coroutine: returns once relaying, raises its error.
    Cancelling it closes whatever the dial had opened."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_done(exc: ProxyVpnError | None) -> None:
        if not done.done():
            done.set_result(None) if exc is None else done.set_exception(exc)

    dial = start_tunnel(endpoint, dst_host, dst_port, mark=mark, timeout=timeout,
                        protocol=protocol, on_done=on_done, ssl_context=ssl_context)
    try:
        await done
    except asyncio.CancelledError:
        dial.cancel()
        if done.done() and not done.cancelled() and done.exception() is None:
            # Cancelled after the tunnel came up but before we resumed: nobody owns it.
            protocol.abort()
        raise
