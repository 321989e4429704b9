"""A small HTTP CONNECT proxy, for ``proxyvpn demo`` and for tests.

Only CONNECT (RFC 9110 §9.3.6) is implemented; any other method gets 405.
Optional Basic authentication (RFC 7617; 407 with a ``Proxy-Authenticate``
challenge, RFC 9110 §11.7.1), an optional deny list of ``host:port`` targets
(403), 502 when the target refuses, 504 when it does not answer in time.
Each tunnel is relayed with asyncio streams: ``drain()`` makes a direction wait
whenever the other side's write buffer is above its high-water mark, so a fast
sender cannot make the proxy buffer without bound. Half-close is forwarded
(a FIN from one side becomes ``write_eof`` on the other).

One access-log line per request on logger ``proxyvpn.miniproxy``:
client, target, status, bytes up (client -> target) and down. The
Proxy-Authorization header and passwords are never logged.

Run as ``python -m proxyvpn.relay.miniproxy --listen HOST:PORT``; it prints
``listening on HOST:PORT`` per bound socket and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import signal
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxyvpn.relay.connect import (
    decode_basic_credentials,
    format_authority,
    parse_authority,
)

__all__ = ["main", "start_proxy"]

log = logging.getLogger("proxyvpn.miniproxy")

#: Largest request head accepted (request line + fields), as for responses.
MAX_REQUEST_HEAD = 16 * 1024
#: Time a client gets to send its complete request head (slowloris guard).
HEAD_TIMEOUT = 30.0
#: Time the target gets to accept the TCP connection before we answer 504.
CONNECT_TIMEOUT = 10.0
#: Read size for relaying.
CHUNK = 64 * 1024

_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class _Reject(Exception):
    """Answer the client with ``status`` and close."""

    def __init__(self, status: int, why: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.extra = extra


@dataclass(frozen=True)
class _Config:
    """What one server instance enforces."""

    credentials: tuple[str, str] | None
    deny: frozenset[tuple[str, int]]
    active: set[asyncio.Task[None]] = field(default_factory=set, compare=False)
    """Connection handlers still running (Server.close() leaves them alone)."""


@dataclass
class _Counter:
    """Bytes relayed in one direction."""

    n: int = 0


@dataclass
class _Request:
    """A parsed CONNECT request head."""

    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)


def _normalise(host: str, port: int) -> tuple[str, int]:
    """Deny-list key: host names are case-insensitive (RFC 9110 §4.2.3)."""
    return host.lower(), port


async def _read_head(reader: asyncio.StreamReader) -> _Request:
    """Read and validate the request head; raise _Reject for anything unusable."""
    size = 0
    lines: list[str] = []
    while True:
        try:
            raw = await reader.readline()
        except ValueError:  # a single line longer than the stream limit
            raise _Reject(431, "request line too long") from None
        if not raw:
            raise ConnectionResetError("client closed before sending a request")
        size += len(raw)
        if size > MAX_REQUEST_HEAD:
            raise _Reject(431, "request head too large")
        line = raw.rstrip(b"\r\n")
        if not line:
            if not lines:
                continue  # RFC 9112 §2.2: ignore empty lines before the request line
            break
        lines.append(line.decode("latin-1"))
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _Reject(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _Reject(505, f"unsupported version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _Reject(400, "malformed header line")
        headers.setdefault(name.lower(), value.strip())
    return _Request(method=method, target=target, headers=headers)


def _check_auth(config: _Config, request: _Request) -> None:
    """Enforce Basic auth (RFC 7617) if configured; raise _Reject(407) otherwise."""
    if config.credentials is None:
        return
    challenge = (("Proxy-Authenticate", 'Basic realm="proxyvpn"'),)
    value = request.headers.get("proxy-authorization")
    if value is None:
        raise _Reject(407, "no credentials", challenge)
    offered = decode_basic_credentials(value)
    if offered is None:
        raise _Reject(407, "malformed credentials", challenge)
    user, password = config.credentials
    # Constant-time comparison of both parts; `&` (not `and`) so both always run.
    good = hmac.compare_digest(offered[0].encode(), user.encode()) & hmac.compare_digest(
        offered[1].encode(), password.encode()
    )
    if not good:
        raise _Reject(407, "wrong credentials", challenge)


async def _respond(
    writer: asyncio.StreamWriter, status: int, extra: Iterable[tuple[str, str]] = ()
) -> None:
    """Send a status line and fields; error responses carry an empty body."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".rstrip()]
    lines += [f"{name}: {value}" for name, value in extra]
    if status != 200:
        # RFC 9110 §9.3.6: a 2xx to CONNECT has no body; for errors say so
        # explicitly and close, so the client never waits for a body.
        lines += ["Content-Length: 0", "Connection: close"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: _Counter
) -> None:
    """Copy one direction until EOF, then forward the half-close.

    ``drain()`` waits while ``writer``'s buffer is above its high-water mark;
    meanwhile we stop reading, the reader's buffer fills, and asyncio pauses
    that socket -- back-pressure reaches the sender through TCP flow control.
    """
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        count.n += len(data)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    else:
        # TLS has no half-close (close_notify ends the session): close after
        # flushing, which also ends the other direction, as proxies usually do.
        writer.close()


async def _close(*writers: asyncio.StreamWriter) -> None:
    """Close streams, ignoring errors from already-broken connections.

    All are closed before any wait, so a cancellation while waiting cannot
    leave one of them open.
    """
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _handle(
    config: _Config, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one client connection: one CONNECT, then relay until both sides end."""
    peer = writer.get_extra_info("peername")
    client = format_authority(peer[0], peer[1]) if peer else "?"
    target = "-"
    status = 0
    up, down = _Counter(), _Counter()
    started = time.monotonic()
    upstream: asyncio.StreamWriter | None = None
    task = asyncio.current_task()
    if task is not None:
        config.active.add(task)
    try:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                request = await _read_head(reader)
            target = request.target
            if request.method != "CONNECT":
                raise _Reject(405, f"method {request.method}", (("Allow", "CONNECT"),))
            try:
                host, port = parse_authority(request.target)
            except ValueError:
                raise _Reject(400, "malformed CONNECT target") from None
            _check_auth(config, request)
            if _normalise(host, port) in config.deny:
                raise _Reject(403, "target denied")
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    up_reader, upstream = await asyncio.open_connection(host, port)
            except TimeoutError:
                raise _Reject(504, "target did not answer") from None
            except OSError as exc:
                raise _Reject(502, f"target unreachable: {exc}") from None
        except _Reject as reject:
            status = reject.status
            log.debug("%s CONNECT %s rejected: %s", client, target, reject.why)
            await _respond(writer, reject.status, reject.extra)
            return
        except TimeoutError:
            status = 408
            return
        status = 200
        await _respond(writer, 200)
        tasks = [
            asyncio.create_task(_pipe(reader, upstream, up)),
            asyncio.create_task(_pipe(up_reader, writer, down)),
        ]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("%s CONNECT %s ended: %s", client, target, task.exception())
    except OSError as exc:  # includes ConnectionResetError from a vanished peer
        log.debug("%s: connection error: %s", client, exc)
    except asyncio.CancelledError:
        # Shutdown. This task is a server callback nobody awaits; ending it
        # "cancelled" only makes asyncio 3.11's stream machinery log an error.
        log.debug("%s: closing on shutdown", client)
    finally:
        if task is not None:
            config.active.discard(task)
        # Nobody awaits this task (see above), so a cancellation arriving
        # while we close must not escape either.
        with contextlib.suppress(asyncio.CancelledError):
            await _close(writer, *([upstream] if upstream is not None else []))
        log.info(
            "%s CONNECT %s %d up=%d down=%d %.3fs",
            client,
            target,
            status,
            up.n,
            down.n,
            time.monotonic() - started,
        )


async def start_proxy(
    host: str,
    port: int,
    *,
    credentials: tuple[str, str] | None = None,
    deny: Iterable[str] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.base_events.Server:
    """Start the proxy listening on ``host:port`` and return the server.

    ``credentials`` = (user, password) turns on Basic authentication;
    ``deny`` holds ``host:port`` targets answered with 403; ``ssl_context`` makes it
    an HTTPS proxy (TLS from the client to the proxy). ``port`` 0 picks a free
    port: read it from ``server.sockets``. An IPv6 ``host`` may be given with
    or without brackets.
    """
    server, _ = await _start(host, port, credentials, deny, ssl_context)
    return server


async def _start(
    host: str,
    port: int,
    credentials: tuple[str, str] | None,
    deny: Iterable[str],
    ssl_context: ssl.SSLContext | None,
) -> tuple[asyncio.base_events.Server, _Config]:
    """start_proxy, also returning the config that tracks live connections."""
    denied = frozenset(_normalise(*parse_authority(item)) for item in deny)
    config = _Config(credentials=credentials, deny=denied)
    bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    server = await asyncio.start_server(
        lambda r, w: _handle(config, r, w), bind, port, ssl=ssl_context
    )
    return server, config


# --------------------------------------------------------------------------- CLI


def _parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` for argparse; port 0 is allowed here."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [V6]:PORT, got {value!r}")
    return host, int(port)


def _parse_deny(value: str) -> str:
    """Validate a deny-list entry early so typos fail at start-up."""
    try:
        parse_authority(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxyvpn.relay.miniproxy",
        description="A small HTTP CONNECT proxy (demo and tests).",
    )
    parser.add_argument("--listen", required=True, type=_parse_listen, metavar="HOST:PORT")
    parser.add_argument("--user", help="require Basic auth with this user name")
    parser.add_argument(
        "--password-file", help="file whose first line is the password (never on argv)"
    )
    parser.add_argument(
        "--deny", action="append", default=[], type=_parse_deny, metavar="HOST:PORT"
    )
    parser.add_argument("--log", metavar="FILE", help="write the log here instead of stderr")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS (an HTTPS proxy)")
    parser.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert")
    return parser


async def _serve(args: argparse.Namespace, credentials: tuple[str, str] | None) -> None:
    """Run until SIGTERM or SIGINT."""
    context: ssl.SSLContext | None = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    host, port = args.listen
    server, config = await _start(host, port, credentials, args.deny, context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for sock in server.sockets:
        name = sock.getsockname()
        print(f"listening on {format_authority(name[0], name[1])}", flush=True)
    async with server:
        await stop.wait()
        log.info("stopping: closing %d open tunnel(s)", len(config.active))
        server.close()
        # Python 3.11's Server.wait_closed() does not wait for live
        # connections; end them ourselves so each logs its access line.
        for task in list(config.active):
            task.cancel()
        await asyncio.gather(*config.active, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if bool(args.user) != bool(args.password_file):
        parser.error("--user and --password-file go together")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    credentials: tuple[str, str] | None = None
    if args.user:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        except OSError as exc:
            parser.error(f"cannot read --password-file: {exc.strerror}")
        credentials = (args.user, password)
    logging.basicConfig(
        filename=args.log,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(_serve(args, credentials))
    except OSError as exc:
        print(f"miniproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
