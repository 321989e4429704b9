"""Sans-IO CONNECT handshake: request bytes and the incremental response parser."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyvpn.errors import ProxyProtocolError
from proxyvpn.relay import connect
from proxyvpn.relay.connect import (
    MAX_HEADER_BYTES,
    ConnectResponse,
    ConnectResponseParser,
    build_connect_request,
    decode_basic_credentials,
    encode_basic_credentials,
    format_authority,
    parse_authority,
)

# ----------------------------------------------------------------------------- request


def test_request_without_credentials_is_exact() -> None:
    assert build_connect_request("example.com", 443, None) == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )


def test_request_with_credentials_matches_rfc7617_example() -> None:
    # RFC 7617 §2: "Aladdin" / "open sesame" -> QWxhZGRpbjpvcGVuIHNlc2FtZQ==
    assert build_connect_request("10.1.2.3", 8443, ("Aladdin", "open sesame")) == (
        b"CONNECT 10.1.2.3:8443 HTTP/1.1\r\n"
        b"Host: 10.1.2.3:8443\r\n"
        b"Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n"
        b"\r\n"
    )


def test_credentials_are_utf8_encoded() -> None:
    # RFC 7617 §2.1 example: "test" / "123£" -> dGVzdDoxMjPCow==
    assert encode_basic_credentials("test", "123\u00a3") == "Basic dGVzdDoxMjPCow=="
    request = build_connect_request("h", 1, ("j\u00fcrgen", "p\u00e4ss"))
    token = request.split(b"Basic ")[1].split(b"\r\n")[0]
    assert base64.b64decode(token).decode("utf-8") == "j\u00fcrgen:p\u00e4ss"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2001:db8::1", b"[2001:db8::1]:443"),
        ("[2001:db8::1]", b"[2001:db8::1]:443"),
        ("::1", b"[::1]:443"),
        ("::ffff:192.0.2.1", b"[::ffff:192.0.2.1]:443"),
        ("fe80::1%eth0", b"[fe80::1%25eth0]:443"),
    ],
)
def test_ipv6_literal_hosts_are_bracketed(host: str, expected: bytes) -> None:
    request = build_connect_request(host, 443, None)
    assert request == b"CONNECT " + expected + b" HTTP/1.1\r\nHost: " + expected + b"\r\n\r\n"


@pytest.mark.parametrize(
    "host",
    [
        "evil.com\r\nX-Injected: 1",
        "evil.com\n",
        "evil.com\r",
        "evil\x00.com",
        "two words",
        "",
        "caf\u00e9.example",  # callers must pass IDNA A-labels
        "not:ipv6",
        "[example.com]",
        "exa]mple.com",
    ],
)
def test_bad_hosts_are_rejected(host: str) -> None:
    with pytest.raises(ValueError):
        build_connect_request(host, 443, None)


@pytest.mark.parametrize("port", [0, -1, 65536, True, 443.0])
def test_bad_ports_are_rejected(port: object) -> None:
    with pytest.raises(ValueError):
        build_connect_request("example.com", port, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "credentials",
    [
        ("user\r\nX-Injected: 1", "pw"),
        ("user", "pw\r\nX: y"),
        ("user", "pw\n"),
        ("user\x00", "pw"),
        ("user", "p\x00w"),
        ("us:er", "pw"),  # RFC 7617 §2: a colon cannot be in the user-id
    ],
)
def test_bad_credentials_are_rejected_without_echoing_them(
    credentials: tuple[str, str],
) -> None:
    with pytest.raises(ValueError) as info:
        build_connect_request("example.com", 443, credentials)
    assert "pw" not in str(info.value)


def test_password_may_contain_colon() -> None:
    request = build_connect_request("h", 1, ("u", "a:b:c"))
    token = request.split(b"Basic ")[1].split(b"\r\n")[0]
    assert decode_basic_credentials("Basic " + token.decode()) == ("u", "a:b:c")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com:443", ("example.com", 443)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
        ("[fe80::1%25eth0]:80", ("fe80::1%eth0", 80)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ],
)
def test_parse_authority(value: str, expected: tuple[str, int]) -> None:
    assert parse_authority(value) == expected
    assert format_authority(*expected) == value


@pytest.mark.parametrize(
    "value",
    ["example.com", "example.com:", ":80", "2001:db8::1:80", "[2001:db8::1]80", "[nope]:80",
     "h:0", "h:70000", "h:8o", "a b:80", "[::1]:+1"],
)  # fmt: skip
def test_parse_authority_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(value)


@pytest.mark.parametrize(
    "value", ["Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(), ""]
)
def test_decode_basic_credentials_rejects(value: str) -> None:
    assert decode_basic_credentials(value) is None


_user = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":"))
_password = st.text(st.characters(blacklist_categories=("Cc", "Cs")))


@given(_user, _password)
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    assert decode_basic_credentials(encode_basic_credentials(user, password)) == (user, password)


# ----------------------------------------------------------------------------- parser


def parse_all(raw: bytes) -> ConnectResponse:
    """Feed in one piece; the header block must be complete."""
    response = ConnectResponseParser().feed(raw)
    assert response is not None
    return response


@pytest.mark.parametrize(
    ("raw", "status", "reason", "ok"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", 200, "Connection established", True),
        (b"HTTP/1.0 200 OK\r\n\r\n", 200, "OK", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, "No Content", True),
        (b"HTTP/1.1 299 Whatever\r\n\r\n", 299, "Whatever", True),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", 403, "Forbidden", False),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", 407,
         "Proxy Authentication Required", False),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 502, "Bad Gateway", False),
        (b"HTTP/1.1 300 Multiple\r\n\r\n", 300, "Multiple", False),
        (b"HTTP/1.1 200\r\n\r\n", 200, "", True),  # reason omitted entirely
        (b"HTTP/1.1 200 \r\n\r\n", 200, "", True),  # empty reason
        (b"HTTP/1.1 503 Service \xe9 Unavailable\r\n\r\n", 503, "Service \u00e9 Unavailable", False),
    ],
)  # fmt: skip
def test_status_and_reason(raw: bytes, status: int, reason: str, ok: bool) -> None:
    response = parse_all(raw)
    assert (response.status, response.reason, response.ok) == (status, reason, ok)
    assert response.leftover == b""


def test_headers_are_parsed_in_order_and_trimmed() -> None:
    response = parse_all(
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="proxy"\r\n'
        b"Via:1.1 squid  \r\n"
        b"X-Empty:\r\n"
        b"via: second\r\n"
        b"\r\n"
    )
    assert response.headers == (
        ("Proxy-Authenticate", 'Basic realm="proxy"'),
        ("Via", "1.1 squid"),
        ("X-Empty", ""),
        ("via", "second"),
    )
    assert response.header("proxy-authenticate") == 'Basic realm="proxy"'
    assert response.header("VIA") == "1.1 squid"
    assert response.header("missing") is None


def test_obs_fold_continues_previous_value() -> None:
    response = parse_all(b"HTTP/1.1 200 OK\r\nX-Long: one\r\n  two\r\n\tthree\r\n\r\n")
    assert response.headers == (("X-Long", "one two three"),)


def test_leftover_bytes_after_header_block_are_kept() -> None:
    response = parse_all(b"HTTP/1.1 200 OK\r\nVia: x\r\n\r\nEARLY\r\n\r\nMORE")
    assert response.ok
    assert response.leftover == b"EARLY\r\n\r\nMORE"


def test_large_leftover_is_not_counted_against_the_header_limit() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB of tunnel data in the same read
    response = parse_all(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
    assert response.leftover == payload


RESPONSES = [
    b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x/1\r\n\r\n",
    b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="p"\r\n'
    b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\n\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
]


@pytest.mark.parametrize("head", RESPONSES)
def test_split_at_every_byte_boundary(head: bytes) -> None:
    expected = parse_all(head + b"TUNNEL")
    assert expected.leftover == b"TUNNEL"
    raw = head + b"TUNNEL"
    for cut in range(len(raw) + 1):
        parser = ConnectResponseParser()
        first = parser.feed(raw[:cut])
        if cut < len(head):
            assert first is None, cut
            second = parser.feed(raw[cut:])
            assert second == expected, cut
        else:
            # The first piece already holds the whole block: what came with it
            # is leftover, the rest would go straight to the tunnel.
            assert first is not None
            assert (first.status, first.headers) == (expected.status, expected.headers)
            assert first.leftover == raw[len(head) : cut]


@pytest.mark.parametrize("head", RESPONSES)
def test_byte_by_byte_completes_exactly_at_the_blank_line(head: bytes) -> None:
    parser = ConnectResponseParser()
    results = [parser.feed(head[i : i + 1]) for i in range(len(head))]
    assert all(r is None for r in results[:-1])
    final = results[-1]
    assert final is not None and final.leftover == b""
    assert final == parse_all(head)
    assert parser.done
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


@given(st.lists(st.integers(min_value=0, max_value=120), max_size=12))
def test_any_chunking_gives_the_same_response(cuts: list[int]) -> None:
    raw = RESPONSES[1] + b"payload bytes"
    points = sorted({min(c, len(raw)) for c in cuts}) + [len(raw)]
    parser = ConnectResponseParser()
    got: list[ConnectResponse] = []
    start = 0
    for point in points:
        if got:
            break
        result = parser.feed(raw[start:point])
        start = point
        if result is not None:
            got.append(result)
    assert len(got) == 1
    response = got[0]
    # Leftover in the completing chunk plus whatever was never fed = payload.
    assert response.leftover + raw[start:] == b"payload bytes"
    assert response.status == 407
    assert response.header("Proxy-Authenticate") == 'Basic realm="p"'


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\nVia: x\n\nDATA",
        b"HTTP/1.1 200 OK\r\nVia: x\n\nDATA",
        b"HTTP/1.1 200 OK\nVia: x\n\r\nDATA",
    ],
)
def test_bare_lf_line_endings_are_tolerated(raw: bytes) -> None:
    response = parse_all(raw)
    assert response.status == 200
    assert response.headers == (("Via", "x"),)
    assert response.leftover == b"DATA"


def test_interim_1xx_responses_are_skipped() -> None:
    response = parse_all(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\nX"
    )
    assert (response.status, response.headers, response.leftover) == (200, (), b"X")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed status line"),
        (b"<html>\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1  200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1\r\n\r\n", "malformed status line"),
        (b"http/1.1 200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/2 200\r\n\r\n", "unsupported version"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "unsupported version"),
        (b"HTTP/0.9 200 OK\r\n\r\n", "unsupported version"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "out-of-range"),
        (b"HTTP/1.1 600 High\r\n\r\n", "out-of-range"),
        (b"HTTP/1.1 200 OK\r\nNoColonHere\r\n\r\n", "without a colon"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "malformed header name"),
        (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", "malformed header name"),
        (b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n", "malformed header name"),
        (b"HTTP/1.1 200 OK\r\n folded: first\r\n\r\n", "continuation"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "bare CR"),
        (b"HTTP/1.1 200 O\x01K\r\n\r\n", "control character"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "NUL"),
        (b"\r\n\r\n", "malformed status line"),
        (b"\n\n", "malformed status line"),
    ],
)
def test_malformed_responses_raise(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        ConnectResponseParser().feed(raw)


def test_oversized_header_block_without_end_raises_as_soon_as_it_crosses_the_limit() -> None:
    parser = ConnectResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\n") is None
    filler = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    fed = len(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProxyProtocolError, match="exceeds"):
        while True:
            parser.feed(filler)
            fed += len(filler)
            assert fed <= MAX_HEADER_BYTES + len(filler), "limit not enforced"


def test_oversized_complete_header_block_raises() -> None:
    pad = b"X-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="exceeds"):
        ConnectResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + pad + b"\r\n")


def test_header_block_of_exactly_the_limit_is_accepted() -> None:
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    end = b"\r\n\r\n"
    raw = start + b"a" * (MAX_HEADER_BYTES - len(start) - len(end)) + end
    assert len(raw) == MAX_HEADER_BYTES
    response = ConnectResponseParser().feed(raw + b"tail")
    assert response is not None and response.leftover == b"tail"
    with pytest.raises(ProxyProtocolError):
        ConnectResponseParser().feed(raw[:-4] + b"a" + end)


def test_endless_interim_responses_hit_the_limit() -> None:
    parser = ConnectResponseParser()
    with pytest.raises(ProxyProtocolError, match="exceeds"):
        for _ in range(MAX_HEADER_BYTES):
            assert parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n") is None


def test_custom_limit() -> None:
    with pytest.raises(ProxyProtocolError):
        ConnectResponseParser(max_header_bytes=16).feed(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.6\r\n", b"X", b"HTTP/1.1 2000 OK\r\n",
                                   b"HTTP/2 200\n", b"\x16\x03\x01\x02\x00"])
def test_a_response_that_cannot_be_http_fails_before_any_blank_line(first):
    """Not only once the head is complete: a server speaking something else would leave
    the dial waiting for a blank line until its timeout."""
    with pytest.raises(ProxyProtocolError):
        ConnectResponseParser().feed(first)


def test_early_check_accepts_a_status_line_split_anywhere_and_interim_responses():
    wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\ndata"
    for cut in range(1, len(wire)):
        parser = ConnectResponseParser()
        assert parser.feed(wire[:cut]) is None or cut >= wire.index(b"data")
        if not parser.done:
            response = parser.feed(wire[cut:])
            assert response is not None and response.status == 200
            assert response.leftover == b"data"


def test_the_same_answer_again_is_not_parsed_again(monkeypatch) -> None:
    """A proxy answers every CONNECT with the same bytes: the second parser hands out
    the response the first one made (it is immutable) instead of parsing them again."""
    raw = b"HTTP/1.1 200 Tunnel open for the memo test\r\nVia: 1.1 memo\r\n\r\n"
    first = ConnectResponseParser().feed(raw)
    monkeypatch.setattr(connect, "_parse_head", lambda head: pytest.fail("parsed again"))
    again = ConnectResponseParser().feed(raw)
    assert again is first and again.status == 200 and again.header("via") == "1.1 memo"


def test_tunnel_bytes_after_an_answer_are_never_handed_to_another_tunnel() -> None:
    raw = b"HTTP/1.1 200 OK, memo and leftover\r\n\r\n"
    assert ConnectResponseParser().feed(raw + b"first bytes").leftover == b"first bytes"
    assert ConnectResponseParser().feed(raw).leftover == b""
    assert ConnectResponseParser().feed(raw + b"other").leftover == b"other"
    split = ConnectResponseParser()
    assert split.feed(raw[:10]) is None
    assert split.feed(raw[10:] + b"late").leftover == b"late"


def test_an_answer_that_failed_fails_again() -> None:
    raw = b"HTTP/1.1 200 memo\r\nbad header line\r\n\r\n"
    for _ in range(2):
        with pytest.raises(ProxyProtocolError, match="without a colon"):
            ConnectResponseParser().feed(raw)
