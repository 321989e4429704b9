"""open_tunnel / TunnelProtocol against real sockets on loopback, and the miniproxy.

Every test runs its own event loop (asyncio.run) with servers on 127.0.0.1 / ::1
and ephemeral ports; nothing needs root except the SO_MARK test, which skips
clearly without CAP_NET_ADMIN.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import hashlib
import importlib.util
import logging
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxyvpn.errors import (
    ProxyError,
    ProxyProtocolError,
    ProxyUnreachableError,
    ProxyVpnError,
)
from proxyvpn.relay import dial as dial_module
from proxyvpn.relay.dial import (
    WRITE_HIGH_WATER,
    Dial,
    ProxyEndpoint,
    TunnelProtocol,
    open_tunnel,
    start_tunnel,
)
from proxyvpn.relay.miniproxy import start_proxy
from proxyvpn.relay.transport import SocketTransport

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, T], limit: float = 20.0) -> T:
    """Run one test coroutine in a fresh loop, never longer than ``limit``."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


def port_of(server: asyncio.base_events.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def closed_port() -> int:
    """A loopback port with (almost certainly) nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


class Sink:
    """A TunnelSink that records everything, in order."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.lost_exc: Exception | None = None
        self.writable = 0
        self.eof_with_data = 0  # tunnel_data(last=True) calls
        self._changed = asyncio.Event()

    def tunnel_data(self, data: bytes, last: bool = False) -> None:
        self.data += data
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        if last:
            self.events.append("eof")  # the FIN came with these bytes
            self.eof_with_data += 1
        self._changed.set()

    def tunnel_eof(self) -> None:
        self.events.append("eof")
        self._changed.set()

    def tunnel_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost_exc = exc
        self._changed.set()

    def tunnel_writable(self) -> None:
        self.writable += 1
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], limit: float = 5.0) -> None:
        async with asyncio.timeout(limit):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


async def start_echo() -> asyncio.base_events.Server:
    """Echo server: echoes everything, then answers our FIN with b"<EOF>" and closes.

    The reply after EOF is what proves half-close works end to end.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"<EOF>")
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass  # peer gone, or the test's loop is ending
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Fake:
    """A scripted 'proxy': records the request head, then runs ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Fake:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                await self.script(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # peer gone, or the test's loop is ending
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def endpoint(self) -> ProxyEndpoint:
        assert self.server is not None
        return ProxyEndpoint("http", "fake", port_of(self.server), ("127.0.0.1",))


async def echo_to_the_end(protocol: TunnelProtocol, payload: bytes) -> None:
    """Through a tunnel to start_echo()'s server: send ``payload`` and our FIN, and get
    both back (the echo, then its b"<EOF>" and close)."""
    sink = Sink()
    protocol.attach(sink)
    protocol.write(payload)
    protocol.write_eof()
    await sink.until(lambda: "lost" in sink.events)
    assert bytes(sink.data) == payload + b"<EOF>"


@contextlib.asynccontextmanager
async def proxy_and_echo(**proxy_kwargs: Any) -> AsyncIterator[tuple[ProxyEndpoint, int]]:
    """A miniproxy and an echo server on loopback; yields (endpoint, echo port)."""
    echo = await start_echo()
    proxy = await start_proxy("127.0.0.1", 0, **proxy_kwargs)
    try:
        creds = proxy_kwargs.get("credentials")
        yield (
            ProxyEndpoint("http", "localhost", port_of(proxy), ("127.0.0.1",), creds),
            port_of(echo),
        )
    finally:
        proxy.close()
        echo.close()


async def dial(
    endpoint: ProxyEndpoint,
    host: str,
    port: int,
    *,
    timeout: float = 5.0,
    mark: int | None = None,
    credentials: tuple[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> TunnelProtocol:
    protocol = TunnelProtocol(host, port, credentials or endpoint.credentials)
    await open_tunnel(
        endpoint, host, port, mark=mark, timeout=timeout, protocol=protocol, ssl_context=ssl_context
    )
    return protocol


# ----------------------------------------------------------------------------- endpoint


def test_endpoint_repr_hides_password() -> None:
    endpoint = ProxyEndpoint("http", "proxy.example", 3128, ("192.0.2.1",), ("alice", "hunter2"))
    for text in (repr(endpoint), str(endpoint), f"{endpoint}"):
        assert "hunter2" not in text
        assert "alice" in text and "192.0.2.1" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "socks5"},
        {"port": 0},
        {"port": 70000},
        {"addresses": ("proxy.example",)},
    ],
)
def test_endpoint_validates(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "scheme": "http",
        "host": "p",
        "port": 3128,
        "addresses": ("127.0.0.1",),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError):
        ProxyEndpoint(**fields)


def test_protocol_rejects_bad_target_and_early_writes() -> None:
    async def body() -> None:
        with pytest.raises(ValueError):
            TunnelProtocol("evil\r\nX: y", 443, None)
        protocol = TunnelProtocol("example.com", 443, None)
        with pytest.raises(RuntimeError, match="not established"):
            protocol.write(b"too early")
        with pytest.raises(RuntimeError, match="not established"):
            protocol.writelines([b"too", b"early"])

    run(body())


# ----------------------------------------------------------------------------- tunnels


def test_tunnel_carries_data_both_ways_and_half_close(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    payload = random.Random(7).randbytes(3 * 1024 * 1024 + 17)

    async def body() -> None:
        async with proxy_and_echo() as (endpoint, echo_port):
            protocol = await dial(endpoint, "127.0.0.1", echo_port)
            assert protocol.response is not None and protocol.response.status == 200
            assert protocol.on_settled is None  # settled once, then let go
            sink = Sink()
            protocol.attach(sink)
            half = len(payload) // 2
            for i in range(0, half, 100_000):
                protocol.write(payload[i : min(i + 100_000, half)])
            view = memoryview(payload)  # the rest as one gather-write of many buffers
            protocol.writelines([view[i : i + 30_000] for i in range(half, len(payload), 30_000)])
            await sink.until(lambda: len(sink.data) >= len(payload))
            # Half-close: our FIN reaches the echo server, which still answers.
            protocol.write_eof()
            assert protocol.eof_written
            with pytest.raises(RuntimeError):
                protocol.write(b"after eof")
            await sink.until(lambda: "lost" in sink.events)
            assert hashlib.sha256(sink.data).digest() == hashlib.sha256(payload + b"<EOF>").digest()
            assert sink.events == ["data", "eof", "lost"]
            assert sink.lost_exc is None

    run(body())


def test_half_close_keeps_the_other_direction_open() -> None:
    """After the destination's FIN we can still send, and get the echo-reply."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nbye")
        await writer.drain()
        writer.write_eof()  # destination is done talking...
        data = await reader.readexactly(5)  # ...but still listens
        assert data == b"later"
        await reader.read()  # our FIN
        self_events.append("fake saw FIN")

    self_events: list[str] = []

    async def body() -> None:
        async with Fake(script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 80)
            sink = Sink()
            protocol.attach(sink)
            await sink.until(lambda: "eof" in sink.events)
            assert not protocol.transport.is_closing()  # type: ignore[union-attr]
            protocol.write(b"later")
            protocol.write_eof()
            await sink.until(lambda: "lost" in sink.events)
            await fake.closed.wait()
        assert bytes(sink.data) == b"bye"
        assert sink.events == ["data", "eof", "lost"]
        assert self_events == ["fake saw FIN"]

    run(body())


def test_early_bytes_in_the_header_read_are_kept_and_ordered() -> None:
    """The proxy's 200 and the first tunnel bytes arrive in one segment."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nEARLY")  # one write: one segment
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"LATE")
        await writer.drain()

    async def body() -> None:
        async with Fake(script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443, credentials=("u", "p"))
            await fake.closed.wait()  # everything sent and closed before attach
            await asyncio.sleep(0.05)
            sink = Sink()
            protocol.attach(sink)  # buffered data, then the proxy's EOF, in order
            assert bytes(sink.data) == b"EARLYLATE"
            assert sink.events == ["data", "eof"]
            assert sink.eof_with_data == 1  # the FIN with the last buffered bytes
            # Half-closed by the proxy only: our FIN finishes the tunnel.
            assert not protocol.transport.is_closing()  # type: ignore[union-attr]
            protocol.write_eof()
            await sink.until(lambda: "lost" in sink.events)
            assert sink.events == ["data", "eof", "lost"]
            assert fake.requests == [
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
                b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p") + b"\r\n\r\n"
            ]
            with pytest.raises(RuntimeError):
                protocol.attach(Sink())

    run(body())


def after_go(send: Callable[[asyncio.StreamWriter], object]) -> Script:
    """A fake proxy's script: 200, then, once we wrote b"go", ``send``; then read to the end."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()
        assert await reader.readexactly(2) == b"go"
        send(writer)
        await writer.drain()
        await reader.read()
    return script


def _reply_and_fin(writer: asyncio.StreamWriter) -> None:
    writer.write(b"reply")
    writer.write_eof()


def test_a_reply_read_with_the_proxys_fin_reaches_the_sink_with_it() -> None:
    """Reply and FIN queued before we read: the sink gets them in one call
    (tunnel_data(last=True), so the stack can send one segment) and no tunnel_eof after."""
    async def body() -> None:
        async with Fake(after_go(_reply_and_fin)) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            sink = Sink()
            protocol.attach(sink)
            protocol.pause_reading()
            protocol.write(b"go")
            sock = protocol.transport.get_extra_info("socket")  # type: ignore[union-attr]
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLRDHUP)
            deadline = time.monotonic() + 5
            while not poller.poll(0):  # the fake runs on this loop: wait without blocking it
                assert time.monotonic() < deadline, "the proxy's FIN never came"
                await asyncio.sleep(0.002)
            # Reply and FIN are both queued in our socket now.
            protocol.resume_reading()
            await sink.until(lambda: "eof" in sink.events)
            await asyncio.sleep(0.05)  # a second EOF would come by now
            assert bytes(sink.data) == b"reply"
            assert sink.events == ["data", "eof"] and sink.eof_with_data == 1
            protocol.write_eof()  # the proxy's FIN counts as received: this closes
            await sink.until(lambda: "lost" in sink.events)
            assert sink.events == ["data", "eof", "lost"]

    run(body())


def test_early_bytes_reach_a_sink_attached_immediately() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 Connection established\r\nVia: fake\r\n\r\nEARLY")
        await writer.drain()
        await reader.read()

    async def body() -> None:
        async with Fake(script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            sink = Sink()
            protocol.attach(sink)
            await sink.until(lambda: len(sink.data) >= 5)
            assert bytes(sink.data) == b"EARLY"
            assert protocol.response is not None
            assert protocol.response.header("via") == "fake"
            protocol.close()

    run(body())


def test_denied_target_raises_proxy_error_403() -> None:
    async def body() -> None:
        echo = await start_echo()
        port = port_of(echo)
        proxy = await start_proxy("127.0.0.1", 0, deny=[f"127.0.0.1:{port}"])
        endpoint = ProxyEndpoint("http", "localhost", port_of(proxy), ("127.0.0.1",))
        protocol = TunnelProtocol("127.0.0.1", port, None)
        with pytest.raises(ProxyError) as info:
            await open_tunnel(endpoint, "127.0.0.1", port, mark=None, timeout=5, protocol=protocol)
        assert info.value.status == 403
        assert info.value.reason == "Forbidden"
        assert info.value.target == f"127.0.0.1:{port}"
        assert not info.value.auth_failed
        assert protocol.transport is not None and protocol.transport.is_closing()
        with pytest.raises(RuntimeError):
            protocol.write(b"x")
        proxy.close()
        echo.close()

    run(body())


def test_wrong_or_missing_credentials_raise_auth_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        async with proxy_and_echo(credentials=("alice", "s3cret-pw")) as (endpoint, echo_port):
            for creds in (("alice", "wrong-pw"), ("bob", "s3cret-pw")):
                with pytest.raises(ProxyError) as info:
                    await dial(endpoint, "127.0.0.1", echo_port, credentials=creds)
                assert info.value.status == 407 and info.value.auth_failed
            protocol = TunnelProtocol("127.0.0.1", echo_port, None)
            with pytest.raises(ProxyError) as info:
                await open_tunnel(
                    endpoint, "127.0.0.1", echo_port, mark=None, timeout=5, protocol=protocol
                )
            assert info.value.auth_failed
            assert protocol.response is not None
            assert protocol.response.header("Proxy-Authenticate") == 'Basic realm="proxyvpn"'
            # And the right ones work.
            good = await dial(endpoint, "127.0.0.1", echo_port)
            sink = Sink()
            good.attach(sink)
            good.write(b"ping")
            await sink.until(lambda: bytes(sink.data) == b"ping")
            good.close()

    run(body())
    for secret in ("s3cret-pw", "wrong-pw", base64.b64encode(b"alice:s3cret-pw").decode()):
        assert secret not in caplog.text
    assert "Proxy-Authorization" not in caplog.text


def _alive(*types: type) -> int:
    """Objects of ``types`` the collector tracks: alive, or garbage it has not freed."""
    return sum(type(o) in types for o in gc.get_objects())


async def _finished_tunnel(endpoint: ProxyEndpoint, port: int, refused: bool) -> None:
    """One tunnel's whole life through the proxy, relayed or refused (403), dialled with
    callbacks as the engine does (open_tunnel's raise would tie the protocol to the
    traceback's frames: a cycle of the caller's making)."""
    loop = asyncio.get_running_loop()
    protocol = TunnelProtocol("127.0.0.1", port, None)
    settled: asyncio.Future[ProxyVpnError | None] = loop.create_future()
    start_tunnel(endpoint, "127.0.0.1", port, loop=loop, mark=None, timeout=5,
                 protocol=protocol, ssl_context=None, on_done=settled.set_result)
    exc = await settled
    if refused:
        assert isinstance(exc, ProxyError) and exc.status == 403
        await asyncio.sleep(0.05)  # connection_lost() comes from a later loop iteration
    else:
        assert exc is None
        await echo_to_the_end(protocol, b"ping")


@pytest.mark.parametrize("refused", [False, True], ids=["relayed", "refused"])
@pytest.mark.usefixtures("collector_off")
def test_a_finished_tunnel_is_freed_without_the_cycle_collector(refused: bool) -> None:
    """The protocol and its transport hold each other while the connection lives, and
    behind the protocol hangs the engine's flow: once the connection is lost, reference
    counting alone must free them, or every connection waits for the cyclic collector
    (README, Performance: "Connections freed as they end"). Counted, not watched with a
    weak reference: compiled (mypyc 2.4), one to a TunnelProtocol crashes the process
    when the protocol dies."""
    async def body() -> None:
        echo = await start_echo()
        port = port_of(echo)
        proxy = await start_proxy("127.0.0.1", 0, deny=[f"127.0.0.1:{port}"] if refused else [])
        endpoint = ProxyEndpoint("http", "localhost", port_of(proxy), ("127.0.0.1",))
        try:
            for _ in range(3):
                await _finished_tunnel(endpoint, port, refused)
            assert _alive(TunnelProtocol, SocketTransport) == 0, (
                "finished tunnels are left to the cyclic collector")
        finally:
            proxy.close()
            echo.close()

    run(body())


def test_unreachable_target_gives_502() -> None:
    async def body() -> None:
        async with proxy_and_echo() as (endpoint, _):
            with pytest.raises(ProxyError) as info:
                await dial(endpoint, "127.0.0.1", closed_port())
            assert info.value.status == 502

    run(body())


def test_addresses_are_tried_in_order() -> None:
    async def body() -> None:
        echo = await start_echo()
        first = await start_proxy("127.0.0.1", 0)
        port = port_of(first)
        try:
            second = await start_proxy("127.0.0.3", port)  # same port, other address
        except OSError:
            pytest.skip("127.0.0.3 not usable here")
        try:
            for addresses, expected in [
                (("127.0.0.3", "127.0.0.1"), "127.0.0.3"),
                (("127.0.0.1", "127.0.0.3"), "127.0.0.1"),
                # 127.0.0.2 has nothing listening on `port`: refused, then next.
                (("127.0.0.2", "127.0.0.1"), "127.0.0.1"),
                (("127.0.0.2", "127.0.0.3"), "127.0.0.3"),
            ]:
                endpoint = ProxyEndpoint("http", "localhost", port, addresses)
                protocol = await dial(endpoint, "127.0.0.1", port_of(echo))
                assert protocol.transport is not None
                assert protocol.transport.get_extra_info("peername")[0] == expected, addresses
                protocol.close()
        finally:
            first.close()
            second.close()
            echo.close()

    run(body())


@needs_ipv6
def test_ipv6_proxy_address_and_ipv6_listen() -> None:
    async def body() -> None:
        echo = await start_echo()
        proxy = await start_proxy("[::1]", 0)
        endpoint = ProxyEndpoint("http", "localhost", port_of(proxy), ("::1",))
        protocol = await dial(endpoint, "127.0.0.1", port_of(echo))
        assert protocol.transport is not None
        assert protocol.transport.get_extra_info("socket").family == socket.AF_INET6
        sink = Sink()
        protocol.attach(sink)
        protocol.write(b"six")
        await sink.until(lambda: bytes(sink.data) == b"six")
        protocol.close()
        proxy.close()
        echo.close()

    run(body())


def test_all_addresses_unreachable_fails_fast() -> None:
    port = closed_port()
    addresses = ("127.0.0.1", "::1") if ipv6_loopback() else ("127.0.0.1", "127.0.0.2")

    async def body() -> None:
        endpoint = ProxyEndpoint("http", "localhost", port, addresses)
        started = time.monotonic()
        with pytest.raises(ProxyUnreachableError) as info:
            await dial(endpoint, "example.com", 443, timeout=5)
        assert time.monotonic() - started < 1.0
        assert info.value.addresses == addresses
        # The cause names the last address tried and the kernel's reason.
        assert info.value.cause.startswith(f"{addresses[-1]} port {port}")
        assert "refused" in info.value.cause.lower()

    run(body())


def test_empty_address_list_is_unreachable() -> None:
    async def body() -> None:
        with pytest.raises(ProxyUnreachableError, match="no proxy address"):
            await dial(ProxyEndpoint("http", "p", 1, ()), "example.com", 443)

    run(body())


@contextlib.contextmanager
def black_hole(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` whose listener has a full backlog: the kernel drops further
    SYNs, so a connect hangs exactly like a black-holed proxy address."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=1)
    try:
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


def test_tcp_connect_timeout_is_bounded() -> None:
    async def body(port: int) -> None:
        endpoint = ProxyEndpoint("http", "localhost", port, ("127.0.0.1",))
        started = time.monotonic()
        with pytest.raises(ProxyUnreachableError, match="timed out after 0.3s connecting"):
            await dial(endpoint, "example.com", 443, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 0.8

    with black_hole() as port:
        run(body(port))


def test_proxy_that_never_answers_times_out() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # swallow everything, never answer

    async def body() -> None:
        async with Fake(script) as fake:
            started = time.monotonic()
            with pytest.raises(ProxyUnreachableError) as info:
                await dial(fake.endpoint, "example.com", 443, timeout=0.5)
            elapsed = time.monotonic() - started
            assert 0.45 <= elapsed < 1.0
            assert "timed out after 0.5s waiting for CONNECT response" in info.value.cause
            # The connection was closed, not leaked: the fake sees EOF.
            async with asyncio.timeout(2):
                await fake.closed.wait()

    run(body())


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"HTTP/1.1 200 Conn", ProxyProtocolError, "before answering CONNECT"),
        (b"", ProxyProtocolError, "before answering CONNECT"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", ProxyProtocolError, "malformed status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000, ProxyProtocolError, "exceeds"),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nnope",
            ProxyError,
            "503 Service Unavailable",
        ),
    ],
)
def test_proxy_closing_or_misbehaving_during_handshake(
    answer: bytes, error: type[Exception], message: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()  # then close (Fake closes when the script returns)

    async def body() -> None:
        async with Fake(script) as fake:
            protocol = TunnelProtocol("example.com", 443, None)
            with pytest.raises(error, match=message):
                await open_tunnel(
                    fake.endpoint, "example.com", 443, mark=None, timeout=5, protocol=protocol
                )
            assert protocol.transport is not None and protocol.transport.is_closing()

    run(body())


def test_timeout_while_connecting_keeps_why_earlier_addresses_failed() -> None:
    # 127.0.0.1:port refuses at once (nothing listens there); 127.0.0.2:port hangs.
    async def body(port: int) -> None:
        endpoint = ProxyEndpoint("http", "p", port, ("127.0.0.1", "127.0.0.2"))
        with pytest.raises(ProxyUnreachableError) as info:
            await dial(endpoint, "example.com", 443, timeout=0.3)
        cause = info.value.cause
        assert cause.startswith(f"timed out after 0.3s connecting to port {port}"), cause
        assert f"127.0.0.1 port {port}: Connection refused" in cause, cause

    with black_hole("127.0.0.2") as port:
        run(body(port))


@pytest.mark.interpreted
def test_cancel_after_the_tunnel_came_up_but_before_the_caller_resumed() -> None:
    """open_tunnel settled, then its task is cancelled before it runs again: nobody
    will own the tunnel, so it must be closed, not left open and reading."""

    class CancelOnSettle(TunnelProtocol):
        task: asyncio.Task | None = None

        def _settle(self, exc):  # type: ignore[no-untyped-def]
            super()._settle(exc)
            assert self.task is not None
            self.task.cancel()  # same callback: the task has not resumed yet

    async def body() -> None:
        async with proxy_and_echo() as (endpoint, echo_port):
            protocol = CancelOnSettle("127.0.0.1", echo_port, None)
            protocol.task = asyncio.ensure_future(open_tunnel(
                endpoint, "127.0.0.1", echo_port, mark=None, timeout=5, protocol=protocol))
            with pytest.raises(asyncio.CancelledError):
                await protocol.task
            assert protocol.response is not None and protocol.response.status == 200
            assert protocol.transport is not None and protocol.transport.is_closing()

    run(body())


def test_tls_dial_cancelled_before_its_task_ran_closes_the_socket() -> None:
    async def body() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        sock = socket.create_connection(listener.getsockname())
        sock.setblocking(False)
        endpoint = ProxyEndpoint("https", "p", listener.getsockname()[1], ("127.0.0.1",))
        done: list = []
        d = Dial(endpoint, TunnelProtocol("example.com", 443, None), mark=None, timeout=5,
                 tls=ssl.create_default_context(), on_done=done.append)
        d._connected(sock)  # the TCP connect finished: the TLS task is created, not run
        d.cancel()
        assert sock.fileno() == -1, "the socket leaked"
        await asyncio.sleep(0.01)
        assert done == [] and d.done
        listener.close()

    run(body())


def test_start_tunnel_reports_an_immediate_failure_synchronously() -> None:
    async def body() -> None:
        done: list = []
        endpoint = ProxyEndpoint("http", "p", 3128, ())
        d = start_tunnel(endpoint, "example.com", 443, mark=None, timeout=5,
                         protocol=TunnelProtocol("example.com", 443, None), on_done=done.append)
        assert d.done and len(done) == 1 and isinstance(done[0], ProxyUnreachableError)

    run(body())


@pytest.mark.interpreted
@pytest.mark.parametrize("finished", [True, False], ids=["inside-connect", "later"])
def test_connect_that_finished_inside_the_call_goes_straight_on(
        monkeypatch: pytest.MonkeyPatch, finished: bool) -> None:
    """To a proxy on this host the handshake usually completes inside connect(): then the
    CONNECT request goes out before start_tunnel returns; otherwise the dial waits for
    writability. Both ways the tunnel works. (Forced, since whether the kernel finishes
    the handshake inside the call depends on its softirq scheduling.)"""
    monkeypatch.setattr(dial_module, "_established", lambda sock: finished)

    async def body() -> None:
        async with proxy_and_echo() as (endpoint, echo_port):
            done: list = []
            protocol = TunnelProtocol("127.0.0.1", echo_port, None)
            d = start_tunnel(endpoint, "127.0.0.1", echo_port, mark=None, timeout=5,
                             protocol=protocol, on_done=done.append,
                             loop=asyncio.get_running_loop())
            assert (protocol.transport is not None) is finished
            assert not d.done
            while not done:
                await asyncio.sleep(0.001)
            assert done == [None] and protocol.response is not None
            sink = Sink()
            protocol.attach(sink)
            protocol.write(b"ping")
            await sink.until(lambda: bytes(sink.data) == b"ping")
            protocol.close()

    run(body())


def test_established_tells_a_finished_connect_from_one_that_is_not() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket() as sock:
            assert not dial_module._established(sock)  # never connected
            sock.connect(listener.getsockname())
            assert dial_module._established(sock)
    with socket.socket() as sock:
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", closed_port()))
        if err == errno.EINPROGRESS:
            select.select([], [sock], [], 5)
        assert not dial_module._established(sock)  # refused


def test_proxy_reset_mid_header() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 Co")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST instead of FIN

    async def body() -> None:
        async with Fake(script) as fake:
            with pytest.raises(ProxyProtocolError, match="before answering CONNECT"):
                await dial(fake.endpoint, "example.com", 443)

    run(body())


class LateReader:
    """A proxy script that answers 200, then reads nothing until released (so our socket
    buffers fill up), then everything, counting it."""

    def __init__(self) -> None:
        self.release: asyncio.Event | None = None  # made inside the test's loop
        self.received = 0

    async def script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()
        assert self.release is not None
        await self.release.wait()
        while data := await reader.read(1 << 20):
            self.received += len(data)


def test_write_back_pressure_pauses_and_resumes() -> None:
    proxy = LateReader()

    async def body() -> None:
        proxy.release = release = asyncio.Event()
        async with Fake(proxy.script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            sink = Sink()
            protocol.attach(sink)
            assert protocol.transport is not None
            assert protocol.transport.get_write_buffer_limits() == (256 * 1024, WRITE_HIGH_WATER)
            size = 32 * 1024 * 1024
            protocol.write(bytes(size))
            assert protocol.writing_paused
            assert protocol.write_buffer_size() > WRITE_HIGH_WATER
            release.set()
            await sink.until(lambda: sink.writable > 0)
            assert not protocol.writing_paused
            protocol.write_eof()
            await fake.closed.wait()
            assert proxy.received == size

    run(body())


def test_unacknowledged_counts_our_queue_and_the_kernels_until_the_proxy_has_it() -> None:
    """What holds back a half-close (aio/flow.py): bytes the proxy has not acknowledged,
    in our queue or in the socket's send queue, and 0 once it has read them all."""
    proxy = LateReader()

    async def body() -> None:
        proxy.release = release = asyncio.Event()
        async with Fake(proxy.script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            protocol.attach(Sink())
            size = 32 * 1024 * 1024
            protocol.write(bytes(size))
            await asyncio.sleep(0.05)
            queued = protocol.write_buffer_size()
            assert 0 < queued < protocol.unacknowledged() <= size  # the kernel holds some
            release.set()
            async with asyncio.timeout(10):
                while proxy.received < size or protocol.unacknowledged():  # its ACK may lag
                    await asyncio.sleep(0.01)
            protocol.close()
            assert protocol.unacknowledged() == 0

    run(body())


def test_unattached_data_is_bounded_by_pausing_the_socket() -> None:
    size = 4 * 1024 * 1024

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + bytes(size))
        await writer.drain()
        await reader.read()

    async def body() -> None:
        async with Fake(script) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            transport = protocol.transport
            assert isinstance(transport, asyncio.Transport)
            async with asyncio.timeout(3):
                while transport.is_reading():  # nobody attached: must pause
                    await asyncio.sleep(0.01)
            sink = Sink()
            protocol.attach(sink)
            assert transport.is_reading()
            await sink.until(lambda: len(sink.data) >= size)
            assert bytes(sink.data) == bytes(size)
            protocol.close()

    run(body())


def test_pause_reading_holds_data_until_resumed() -> None:
    async def body() -> None:
        async with Fake(after_go(lambda writer: writer.write(b"payload"))) as fake:
            protocol = await dial(fake.endpoint, "example.com", 443)
            sink = Sink()
            protocol.attach(sink)
            protocol.pause_reading()
            protocol.write(b"go")
            await asyncio.sleep(0.2)
            assert sink.data == b""
            protocol.resume_reading()
            await sink.until(lambda: bytes(sink.data) == b"payload")
            protocol.abort()
            await sink.until(lambda: "lost" in sink.events)

    run(body())


# ----------------------------------------------------------------------------- SO_MARK

SO_MARK = getattr(socket, "SO_MARK", 36)


def can_set_mark() -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, 1)
        except PermissionError:
            return False
    return True


def test_mark_none_leaves_socket_unmarked() -> None:
    async def body() -> None:
        async with proxy_and_echo() as (endpoint, echo_port):
            protocol = await dial(endpoint, "127.0.0.1", echo_port, mark=None)
            assert protocol.transport is not None
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            protocol.close()

    run(body())


@pytest.mark.skipif(os.geteuid() != 0 or not can_set_mark(), reason="needs CAP_NET_ADMIN (root)")
def test_mark_is_set_on_the_proxy_socket() -> None:
    async def body() -> None:
        async with proxy_and_echo() as (endpoint, echo_port):
            protocol = await dial(endpoint, "127.0.0.1", echo_port, mark=0x1234)
            assert protocol.transport is not None
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x1234
            protocol.close()

    run(body())


PRIVILEGE_SCRIPT = """
import asyncio
from proxyvpn.errors import PrivilegeError
from proxyvpn.relay.dial import ProxyEndpoint, TunnelProtocol, open_tunnel

async def main():
    endpoint = ProxyEndpoint("http", "p", 9, ("127.0.0.1",))
    protocol = TunnelProtocol("example.com", 443, None)
    try:
        await open_tunnel(endpoint, "example.com", 443, mark=1, timeout=2, protocol=protocol)
    except PrivilegeError as exc:
        print("PrivilegeError:", exc)
    except Exception as exc:
        print("other:", type(exc).__name__, exc)

asyncio.run(main())
"""


def test_mark_without_cap_net_admin_raises_privilege_error() -> None:
    if can_set_mark():
        # Drop the capabilities from the bounding set: the child (even as
        # uid 0) cannot regain them on exec. Linux >= 5.17 also accepts
        # CAP_NET_RAW for SO_MARK, so both must go.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("have CAP_NET_ADMIN and no setpriv(1) to drop it")
        caps = "-net_admin,-net_raw"
        cmd = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
    else:
        cmd = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*cmd, sys.executable, "-c", PRIVILEGE_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if cmd and result.returncode != 0 and "setpriv" in result.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {result.stderr.strip()}")
    assert result.stdout.strip() == "PrivilegeError: setting SO_MARK needs CAP_NET_ADMIN", (
        result.stdout + result.stderr
    )


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert, key)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    if importlib.util.find_spec("cryptography") is not None:
        _make_cert_with_cryptography(cert, key)
    elif shutil.which("openssl"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    else:
        pytest.skip("TLS test needs the cryptography package or the openssl command")
    return cert, key


def _make_cert_with_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_https_proxy_tunnel(tls_cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cert, key = tls_cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        echo = await start_echo()
        proxy = await start_proxy(
            "127.0.0.1", 0, credentials=("u", "tls-pw"), ssl_context=server_ctx
        )
        endpoint = ProxyEndpoint(
            "https", "localhost", port_of(proxy), ("127.0.0.1",), ("u", "tls-pw")
        )
        try:
            protocol = await dial(endpoint, "127.0.0.1", port_of(echo), ssl_context=client_ctx)
            assert protocol.transport is not None
            assert protocol.transport.get_extra_info("ssl_object") is not None
            sink = Sink()
            protocol.attach(sink)
            payload = random.Random(3).randbytes(512 * 1024)
            protocol.write(payload)
            await sink.until(lambda: len(sink.data) >= len(payload))
            assert bytes(sink.data) == payload
            protocol.write_eof()  # TLS cannot half-close: only remembered
            assert protocol.eof_written and not protocol.transport.is_closing()
            protocol.close()
            await sink.until(lambda: "lost" in sink.events)

            # Wrong name for the certificate: refused before any CONNECT.
            wrong = ProxyEndpoint("https", "wrong.example", endpoint.port, endpoint.addresses)
            with pytest.raises(ProxyUnreachableError, match="TLS handshake with wrong.example"):
                await dial(wrong, "127.0.0.1", port_of(echo), ssl_context=client_ctx)
            # Default context: the self-signed certificate is not trusted.
            with pytest.raises(ProxyUnreachableError, match="certificate verify failed"):
                await dial(endpoint, "127.0.0.1", port_of(echo))
        finally:
            proxy.close()
            echo.close()

    caplog.set_level(logging.WARNING, logger="asyncio")
    run(body())
    assert "has no effect when using ssl" not in caplog.text


def test_https_proxy_ending_the_tunnel(tls_cert: tuple[Path, Path]) -> None:
    """Over TLS the destination's close ends the whole tunnel (no half-close)."""
    cert, key = tls_cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"one-shot")
        await writer.drain()
        writer.close()

    async def body() -> None:
        target = await asyncio.start_server(handle, "127.0.0.1", 0)
        proxy = await start_proxy("127.0.0.1", 0, ssl_context=server_ctx)
        endpoint = ProxyEndpoint("https", "localhost", port_of(proxy), ("127.0.0.1",))
        protocol = await dial(endpoint, "127.0.0.1", port_of(target), ssl_context=client_ctx)
        sink = Sink()
        protocol.attach(sink)
        await sink.until(lambda: "lost" in sink.events)
        assert bytes(sink.data) == b"one-shot"
        proxy.close()
        target.close()

    run(body())


# ----------------------------------------------------------------------------- miniproxy


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()  # the proxy closes after an error answer
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status_line", "header"),
    [
        (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
         b"HTTP/1.1 405 Method Not Allowed", b"Allow: CONNECT"),
        (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n",
         b"HTTP/1.1 407 Proxy Authentication Required",
         b'Proxy-Authenticate: Basic realm="proxyvpn"'),
        (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n",
         b"HTTP/1.1 407 Proxy Authentication Required",
         b'Proxy-Authenticate: Basic realm="proxyvpn"'),
        (b"CONNECT nonsense HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 Bad Request", b"Content-Length: 0"),
        (b"CONNECT a:1 HTTP/2.0\r\n\r\n", b"HTTP/1.1 505 HTTP Version Not Supported", b""),
        (b"CONNECT a:1 HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n",
         b"HTTP/1.1 431 Request Header Fields Too Large", b""),
    ],
)  # fmt: skip
def test_miniproxy_error_answers(request_bytes: bytes, status_line: bytes, header: bytes) -> None:
    async def body() -> None:
        proxy = await start_proxy("127.0.0.1", 0, credentials=("u", "p"))
        try:
            answer = await raw_request(port_of(proxy), request_bytes)
        finally:
            proxy.close()
        head = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == status_line
        if header:
            assert header in head[1:]

    run(body())


def test_miniproxy_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyvpn.miniproxy")

    async def body() -> int:
        async with proxy_and_echo(credentials=("u", "access-pw")) as (endpoint, echo_port):
            protocol = await dial(endpoint, "127.0.0.1", echo_port)
            sink = Sink()
            protocol.attach(sink)
            protocol.write(b"12345")
            protocol.write_eof()
            await sink.until(lambda: "lost" in sink.events)
            async with asyncio.timeout(3):
                while "CONNECT 127.0.0.1" not in caplog.text:
                    await asyncio.sleep(0.01)
            return echo_port

    echo_port = run(body())
    lines = [r.getMessage() for r in caplog.records if r.name == "proxyvpn.miniproxy"]
    access = [line for line in lines if f"CONNECT 127.0.0.1:{echo_port} 200" in line]
    assert len(access) == 1, lines
    # up = client -> target (5 bytes), down = echo + "<EOF>" (10 bytes)
    assert " up=5 down=10 " in access[0]
    assert access[0].startswith("127.0.0.1:")
    assert "access-pw" not in caplog.text


@pytest.mark.parametrize(
    ("listen", "connect_to", "sig"),
    [
        ("127.0.0.1:0", "127.0.0.1", signal.SIGTERM),
        pytest.param("[::1]:0", "::1", signal.SIGINT, marks=needs_ipv6),
    ],
)
def test_miniproxy_command_line(
    tmp_path: Path, listen: str, connect_to: str, sig: signal.Signals
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("cli-secret\n")
    log_file = tmp_path / "proxy.log"

    async def body() -> None:
        echo = await start_echo()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxyvpn.relay.miniproxy", "--listen", listen,
            "--user", "u", "--password-file", str(password_file), "--log", str(log_file),
            "--deny", "10.0.0.1:25",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(10):
                line = (await proc.stdout.readline()).decode()
            assert line.startswith("listening on ")
            port = int(line.rsplit(":", 1)[1])
            if ":" in connect_to:
                assert line.strip() == f"listening on [::1]:{port}"
            endpoint = ProxyEndpoint("http", "localhost", port, (connect_to,), ("u", "cli-secret"))
            protocol = await dial(endpoint, "127.0.0.1", port_of(echo))
            await echo_to_the_end(protocol, b"via cli")
            with pytest.raises(ProxyError) as info:
                await dial(endpoint, "10.0.0.1", 25)
            assert info.value.status == 403
            # A tunnel still open at shutdown is closed and logged, not leaked.
            still_open = await dial(endpoint, "127.0.0.1", port_of(echo))
            open_sink = Sink()
            still_open.attach(open_sink)
            still_open.write(b"abc")
            await open_sink.until(lambda: bytes(open_sink.data) == b"abc")
            proc.send_signal(sig)
            async with asyncio.timeout(10):
                assert await proc.wait() == 0
            await open_sink.until(lambda: "eof" in open_sink.events)  # the proxy's FIN
            still_open.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            echo.close()

    run(body(), limit=30)
    text = log_file.read_text()
    assert " 200 up=7 down=12 " in text
    assert " 403 " in text
    assert " 200 up=3 down=3 " in text
    assert "Traceback" not in text and "Exception in callback" not in text
    assert "cli-secret" not in text
    assert base64.b64encode(b"u:cli-secret").decode() not in text
