"""The HTTP CONNECT handshake, sans-IO.

This module never touches a socket: it turns a destination into the bytes of a
CONNECT request and turns the proxy's bytes into a validated
:class:`ConnectResponse`. Untrusted bytes from the proxy are parsed here, once,
into a typed form; nothing downstream ever looks at raw header bytes
(DESIGN.md, style rule 7).

References:

- RFC 9110 §9.3.6 (CONNECT): the request target is authority-form
  ``host:port``; any 2xx response means the tunnel is open and the connection
  carries the tunnelled bytes right after the header block; a client MUST ignore
  Content-Length / Transfer-Encoding in a 2xx response to CONNECT.
- RFC 9112 (HTTP/1.1 message syntax): status line (§4), field lines (§5),
  line endings (§2.2), obsolete line folding (§5.2).
- RFC 7617 (Basic authentication): ``base64(utf8(user-id ":" password))``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

from proxyvpn.errors import ProxyProtocolError

__all__ = [
    "MAX_HEADER_BYTES",
    "ConnectResponse",
    "ConnectResponseParser",
    "build_connect_request",
    "connect_request",
    "decode_basic_credentials",
    "encode_basic_credentials",
    "format_authority",
    "parse_authority",
]

#: Upper bound on a response header block. Real proxies answer CONNECT with a
#: few hundred bytes; the bound keeps a hostile or broken proxy from making us
#: buffer without limit before the tunnel even exists.
MAX_HEADER_BYTES = 16 * 1024

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
# The SP before an empty reason is commonly omitted ("HTTP/1.1 200"); accept it.
_VERSION = re.compile(rb"HTTP/(\d+)(?:\.(\d+))?(?= |$)")
_STATUS_REST = re.compile(rb" (\d{3})(?: (.*))?")
# Reason phrase: HTAB / SP / VCHAR / obs-text, i.e. no other control characters.
_BAD_REASON_CHARS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Host names we are willing to put on a request line: printable ASCII without
# whitespace (a space would split the request line, CR/LF would inject headers).
_BAD_HOST_CHARS = re.compile(r"[^\x21-\x7e]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------- request


def format_authority(host: str, port: int) -> str:
    """Return the authority-form ``host:port`` (RFC 9110 §9.3.6, RFC 3986 §3.2.2).

    IPv6 literals are written in brackets (``[2001:db8::1]:443``) because their
    colons would otherwise be ambiguous with the port separator. A zone id is
    percent-encoded as ``%25`` (RFC 6874). Raises ValueError for a host that
    cannot appear on a request line or a port outside 1..65535.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    if not host:
        raise ValueError("host must not be empty")
    if _BAD_HOST_CHARS.search(host):
        # Covers CR, LF, NUL, spaces and non-ASCII: callers pass IDNA A-labels.
        raise ValueError(f"host contains a character not allowed on a request line: {host!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if ":" in host or bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not an IPv6 address") from None
        return f"[{host.replace('%', '%25')}]:{port}"
    if "[" in host or "]" in host:
        raise ValueError(f"brackets are only allowed around an IPv6 address: {host!r}")
    return f"{host}:{port}"


def encode_basic_credentials(user: str, password: str) -> str:
    """Return the ``Basic ...`` credentials for a Proxy-Authorization field.

    RFC 7617 §2: the user-id must not contain a colon (the first colon separates
    it from the password) and neither part may contain control characters;
    §2.1: the charset is UTF-8. Raises ValueError without echoing the secret.
    """
    if ":" in user:
        raise ValueError("proxy user name must not contain ':' (RFC 7617 §2)")
    if _CONTROL_CHARS.search(user) or _CONTROL_CHARS.search(password):
        raise ValueError("proxy credentials must not contain control characters (RFC 7617 §2)")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def decode_basic_credentials(value: str) -> tuple[str, str] | None:
    """Parse a ``Basic`` Proxy-Authorization value into ``(user, password)``.

    Returns None for any other scheme or for malformed credentials; the scheme
    name is case-insensitive (RFC 9110 §11.1). Used by the built-in proxy.
    """
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    if not sep:
        return None
    return user, password


def build_connect_request(host: str, port: int, credentials: tuple[str, str] | None) -> bytes:
    """Return the bytes of a CONNECT request for ``host:port``.

    RFC 9110 §9.3.6: the request target is authority-form and the Host field
    carries the same authority. With ``credentials`` a ``Proxy-Authorization:
    Basic`` field is added (RFC 7617). Raises ValueError for a host or
    credentials containing CR, LF, NUL (or other characters that could split
    the request); the error message never contains the password.
    """
    return connect_request(format_authority(host, port), credentials)


def connect_request(authority: str, credentials: tuple[str, str] | None) -> bytes:
    """:func:`build_connect_request` for an ``authority`` that :func:`format_authority`
    returned (a tunnel keeps it as its target: formatted once per connection)."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if credentials is not None:
        user, password = credentials
        lines.append(f"Proxy-Authorization: {encode_basic_credentials(user, password)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_authority(value: str) -> tuple[str, int]:
    """Parse an authority-form target ``host:port`` / ``[v6]:port``.

    The inverse of :func:`format_authority`, used on the proxy side and for
    deny lists. Returns the host without brackets. Raises ValueError.
    """
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1 : close + 2] != ":":
            raise ValueError(f"malformed authority {value!r}")
        host, port_text = value[1:close], value[close + 2 :]
        try:
            ipaddress.IPv6Address(host.replace("%25", "%"))
        except ValueError:
            raise ValueError(f"malformed IPv6 literal in {value!r}") from None
        host = host.replace("%25", "%")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host or "[" in host or "]" in host:
            raise ValueError(f"malformed authority {value!r}, expected host:port")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"malformed port in {value!r}")
    port = int(port_text)
    if not 1 <= port <= 65535 or _BAD_HOST_CHARS.search(host) or not host:
        raise ValueError(f"malformed authority {value!r}")
    return host, port


# --------------------------------------------------------------------------- response


@dataclass(frozen=True)
class ConnectResponse:
    """The proxy's final answer to CONNECT, validated."""

    status: int
    """Three-digit status code, 200..599 (interim 1xx responses are skipped)."""
    reason: str
    """Reason phrase as sent (may be empty), decoded as ISO-8859-1."""
    headers: tuple[tuple[str, str], ...]
    """Header fields in order received: (name as sent, value with OWS trimmed)."""
    leftover: bytes
    """Bytes received after the header block. For a 2xx they are the first bytes
    of the tunnelled flow (RFC 9110 §9.3.6) and must be delivered, not dropped."""

    @property
    def ok(self) -> bool:
        """True for any 2xx: RFC 9110 §9.3.6 says every 2xx means tunnel mode."""
        return 200 <= self.status < 300

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


_KNOWN_ANSWERS: dict[bytes, ConnectResponse] = {}
"""Whole answers already parsed, by their bytes. A proxy answers every CONNECT with the
same few dozen bytes (squid: ``HTTP/1.1 200 Connection established``, then the blank
line), in one read: parsing them again cost ~5 µs per connection, ~2 % of proxyvpn's
CPU in the connection-rate test. Parsing is a function of the bytes alone, and a
ConnectResponse is immutable, so the one parsed first is handed out again. Only
answers that came whole in one read, with no tunnel bytes after them, are kept."""

_KNOWN_MAX = 64
"""Answers kept at most: a proxy whose answers vary (a Date field) fills this once."""


class ConnectResponseParser:
    """Incremental parser for the proxy's response to CONNECT.

    Feed it whatever the socket delivered, as often as needed; it returns None
    until the header block is complete, then a :class:`ConnectResponse` whose
    ``leftover`` holds everything after the block. The parser is then done:
    later bytes are tunnel payload and must not be fed to it.

    Tolerances (RFC 9112 §2.2 allows a recipient to accept a bare LF as a line
    terminator): bare LF line endings, an omitted reason phrase, obs-fold
    continuation lines (RFC 9112 §5.2: replaced by a space). Interim 1xx
    responses are consumed and skipped (RFC 9110 §15.2). Everything else that
    is not a well-formed HTTP/1.x response raises ProxyProtocolError.
    """

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        """Create a parser that rejects header blocks over ``max_header_bytes``."""
        self._max = max_header_bytes
        self._buf = bytearray()
        # Where the search for the blank line resumes: re-scanning the whole
        # buffer on every byte would make byte-by-byte delivery quadratic.
        self._scan_from = 0
        # Bytes of interim 1xx responses already consumed; they count toward
        # the limit so an endless stream of 100 Continue cannot pin us.
        self._consumed = 0
        self._done = False
        self._status_ok = False  # the current response's status line was checked

    @property
    def done(self) -> bool:
        """True once a final response has been returned."""
        return self._done

    @property
    def buffered(self) -> int:
        """Bytes received so far that are not yet part of a complete header block."""
        return len(self._buf)

    def feed(self, data: bytes) -> ConnectResponse | None:
        """Add ``data``; return the response once its header block is complete."""
        if self._done:
            raise RuntimeError("ConnectResponseParser.feed() after the response was complete")
        whole = not self._buf and not self._consumed and self._max == MAX_HEADER_BYTES
        if whole:
            known = _KNOWN_ANSWERS.get(bytes(data))
            if known is not None:
                self._done = True
                return known
        self._buf += data
        while True:
            end = self._find_end_of_head()
            if end is None:
                self._check_status_line()
                if self._consumed + len(self._buf) > self._max:
                    raise ProxyProtocolError(
                        f"proxy response header block exceeds {self._max} bytes"
                    )
                return None
            if self._consumed + end > self._max:
                raise ProxyProtocolError(f"proxy response header block exceeds {self._max} bytes")
            head = bytes(self._buf[:end])
            rest = bytes(self._buf[end:])
            status, reason, headers = _parse_head(head)
            if 100 <= status < 200:
                # RFC 9110 §15.2: a client must accept interim responses before
                # the final one; they carry no body, so just move past them.
                self._consumed += end
                self._buf = bytearray(rest)
                self._scan_from = 0
                self._status_ok = False
                continue
            self._done = True
            self._buf = bytearray()
            response = ConnectResponse(status=status, reason=reason, headers=headers,
                                       leftover=rest)
            if whole and not rest and len(_KNOWN_ANSWERS) < _KNOWN_MAX:
                _KNOWN_ANSWERS[bytes(data)] = response
            return response

    def _check_status_line(self) -> None:
        """Refuse a response that cannot be HTTP as soon as that shows, not only once a
        blank line comes: a server that speaks something else (an SSH banner on the
        proxy port) would otherwise hold the connection until the dial timeout."""
        if self._status_ok:
            return
        buf = self._buf
        newline = buf.find(b"\n")
        if newline < 0:
            start = bytes(buf[:5])
            if start != b"HTTP/"[:len(start)]:
                raise ProxyProtocolError(f"proxy did not answer in HTTP: {_show(bytes(buf))}")
            return
        line = bytes(buf[:newline])
        _parse_status_line(line[:-1] if line.endswith(b"\r") else line)
        self._status_ok = True

    def _find_end_of_head(self) -> int | None:
        """Index just past the empty line ending the head, or None if not yet seen."""
        # The terminator is LF followed by an empty line: "\n\r\n" or "\n\n".
        # Resume two bytes back so a terminator split across feeds is found.
        start = max(0, self._scan_from - 2)
        self._scan_from = len(self._buf)
        best: int | None = None
        for terminator in (b"\n\r\n", b"\n\n"):
            idx = self._buf.find(terminator, start)
            if idx >= 0:
                end = idx + len(terminator)
                if best is None or end < best:
                    best = end
        return best


def _parse_head(head: bytes) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    """Validate one complete header block (status line + fields + blank line)."""
    lines = head.split(b"\n")
    # The block ends with LF [CR] LF, so the last two split items are the blank
    # line and the empty remainder; drop them.
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines[:-2]]
    if not lines:
        raise ProxyProtocolError("proxy sent an empty response")
    for line in lines:
        if b"\r" in line:
            # RFC 9112 §2.2: a bare CR is not a line ending; refuse rather than guess.
            raise ProxyProtocolError("proxy response contains a bare CR")
    status, reason = _parse_status_line(lines[0])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: obs-fold continues the previous field value.
            if not headers:
                raise ProxyProtocolError(
                    "proxy response starts its headers with a continuation line"
                )
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {_decode_value(line)}".strip())
            continue
        name_bytes, colon, value_bytes = line.partition(b":")
        if not colon:
            raise ProxyProtocolError(f"proxy response header line without a colon: {_show(line)}")
        if not _TOKEN.fullmatch(name_bytes):
            # RFC 9112 §5.1: no whitespace is allowed between name and colon.
            raise ProxyProtocolError(
                f"malformed header name in proxy response: {_show(name_bytes)}"
            )
        headers.append((name_bytes.decode("ascii"), _decode_value(value_bytes)))
    return status, reason, tuple(headers)


def _parse_status_line(line: bytes) -> tuple[int, str]:
    """Parse ``HTTP/1.x SP 3DIGIT [SP reason]`` into (status, reason)."""
    version = _VERSION.match(line)
    if version is None:
        raise ProxyProtocolError(f"malformed status line from proxy: {_show(line)}")
    if version.group(1) != b"1" or version.group(2) is None:
        raise ProxyProtocolError(
            f"proxy answered with unsupported version {_show(version.group(0))}, expected HTTP/1.x"
        )
    rest = _STATUS_REST.fullmatch(line, version.end())
    if rest is None:
        raise ProxyProtocolError(f"malformed status line from proxy: {_show(line)}")
    status = int(rest.group(1))
    if not 100 <= status <= 599:
        raise ProxyProtocolError(f"proxy sent out-of-range status code {status}")
    reason_bytes = rest.group(2) or b""
    if _BAD_REASON_CHARS.search(reason_bytes):
        raise ProxyProtocolError(f"control character in proxy reason phrase: {_show(line)}")
    return status, reason_bytes.decode("latin-1")


def _decode_value(value: bytes) -> str:
    """Trim OWS (RFC 9110 §5.5) and decode a field value as ISO-8859-1."""
    if b"\x00" in value:
        # RFC 9110 §5.5: NUL in a field value must be rejected or replaced.
        raise ProxyProtocolError("NUL in proxy response header value")
    return value.strip(b" \t").decode("latin-1")


def _show(raw: bytes, limit: int = 80) -> str:
    """A short, printable rendering of untrusted bytes for error messages."""
    text = repr(raw[:limit])[2:-1]
    return text + ("..." if len(raw) > limit else "")
