"""Secret redaction in what proxyvpn's log handler writes: messages, tracebacks, stacks,
records of other libraries (asyncio), and the credential forms of short passwords."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from proxyvpn import logs
from proxyvpn.relay.connect import encode_basic_credentials

SECRET = "hunter2-Sekr1t"


def _our_handlers() -> list[logging.Handler]:
    # Wherever setup_logging puts them: the test must fail on output, not on lookup.
    loggers = (logging.getLogger(), logging.getLogger("proxyvpn"))
    return [h for lg in loggers for h in lg.handlers if getattr(h, "_proxyvpn", False)]


@pytest.fixture
def output(monkeypatch):
    """What setup_logging's handler writes, with no secret registered before the test."""
    monkeypatch.setattr(logs, "_secrets", set())
    monkeypatch.setattr(logs, "_ordered", (), raising=False)
    monkeypatch.setattr(logs, "_word_like", set())
    pv = logging.getLogger("proxyvpn")
    saved = (pv.level, pv.propagate)
    earlier = _our_handlers()  # a CLI test's handler, writing to a stale stream
    for handler in earlier:
        for lg in (logging.getLogger(), pv):
            lg.removeHandler(handler)
    logs.setup_logging(False)
    stream = io.StringIO()
    for handler in _our_handlers():
        handler.setStream(stream)  # type: ignore[attr-defined]
    yield stream
    for handler in _our_handlers():
        for lg in (logging.getLogger(), pv):
            lg.removeHandler(handler)
    pv.setLevel(saved[0])
    pv.propagate = saved[1]
    for handler in earlier:
        logging.getLogger().addHandler(handler)


def test_message_is_redacted(output):
    logs.register_secret(SECRET)
    logging.getLogger("proxyvpn.test").warning("password is %s", SECRET)
    assert output.getvalue() == "proxyvpn: password is ***\n"


def test_exception_traceback_is_redacted(output):
    logs.register_secret(SECRET)
    try:
        raise ValueError(f"proxy said no to {SECRET}")
    except ValueError:
        logging.getLogger("proxyvpn.test").exception("connect failed")
    text = output.getvalue()
    assert "Traceback" in text and "ValueError: proxy said no to ***" in text
    assert SECRET not in text


def test_stack_info_is_redacted(output):
    logs.register_secret(SECRET)
    # The stack shows each frame's source line, comment included: hunter2-Sekr1t
    logging.getLogger("proxyvpn.test").warning("here", stack_info=True)  # hunter2-Sekr1t
    assert "Stack (most recent call last)" in output.getvalue()
    assert SECRET not in output.getvalue()


def test_asyncio_records_are_redacted(output):
    """asyncio's default exception handler logs on the "asyncio" logger, with the
    traceback of the exception: it must pass through our handler, redacted."""
    logs.register_secret(SECRET)

    async def main() -> None:
        try:
            raise ConnectionError(f"tunnel to {SECRET}")
        except ConnectionError as exc:
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"Task exception was never retrieved ({SECRET})", "exception": exc})

    asyncio.run(main())
    text = output.getvalue()
    assert "Task exception was never retrieved (***)" in text
    assert "ConnectionError: tunnel to ***" in text and SECRET not in text


def test_basic_token_and_pair_are_redacted(output):
    logs.register_credentials("alice", SECRET)
    header = encode_basic_credentials("alice", SECRET)
    token = header.removeprefix("Basic ")
    log = logging.getLogger("proxyvpn.test")
    log.warning("sent Proxy-Authorization: %s", header)
    log.warning("raw %r", f"CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: {header}\r\n".encode())
    text = output.getvalue()
    assert token not in text and SECRET not in text
    assert text.count("Proxy-Authorization: Basic ***") == 2


@pytest.mark.parametrize("password", ["x", "ab", "a@"])
def test_short_password_is_redacted_in_its_credential_forms_only(output, password):
    """A 1-2 character password is replaced where it stands as a credential -- the Basic
    token, `user:password`, a URL's userinfo -- not in every word holding its letters."""
    logs.register_credentials("alice", password)
    log = logging.getLogger("proxyvpn.test")
    token = encode_basic_credentials("alice", password).removeprefix("Basic ")
    log.warning("token %s", token)
    log.warning("pair alice:%s end", password)
    log.warning("url http://alice:%s@proxy.example:3128 end", password)
    log.warning("examples abound: xyz 0xab a@b")
    lines = output.getvalue().splitlines()
    assert lines == ["proxyvpn: token ***", "proxyvpn: pair *** end",
                     "proxyvpn: url http://alice:***@proxy.example:3128 end",
                     "proxyvpn: examples abound: xyz 0xab a@b"]


def test_percent_encoded_pair_is_redacted(output):
    logs.register_credentials("al@ice", "p/w?")
    logging.getLogger("proxyvpn.test").warning("userinfo al%40ice:p%2Fw%3F@h:1")
    assert output.getvalue() == "proxyvpn: userinfo ***@h:1\n"


def test_any_url_password_is_redacted_unregistered(output):
    log = logging.getLogger("proxyvpn.test")
    log.warning("via http://bob:pw@proxy:3128 and https://carol:p@ss@h")
    log.warning("tun http://[::1]:3128 for dave@example.com, mail:me@there")
    lines = output.getvalue().splitlines()
    assert lines[0] == "proxyvpn: via http://bob:***@h"
    assert lines[1] == "proxyvpn: tun http://[::1]:3128 for dave@example.com, mail:me@there"


@pytest.mark.parametrize("password", ["proxy", "pass", "warning"])
def test_a_password_that_is_also_a_word_leaves_other_words_alone(output, password):
    """Replaced where it stands as a token, not inside longer words: "***vpn: ***word"
    would be unreadable and would tell anyone reading the log what the password is."""
    logs.register_credentials("alice", password)
    log = logging.getLogger("proxyvpn.test")
    log.warning("the password in --proxy-url is visible; warnings follow")
    log.warning("url http://alice:%s@h:1, pair alice:%s, bare %s. and (%s)",
                password, password, password, password)
    lines = output.getvalue().splitlines()
    assert lines[0] == "proxyvpn: the password in --proxy-url is visible; warnings follow"
    assert lines[1] == "proxyvpn: url http://alice:***@h:1, pair ***, bare ***. and (***)"


def test_a_word_like_password_after_an_escape_or_a_percent_code_is_redacted(output):
    """In a repr or a percent-encoded URL the letter before the password belongs to an
    escape (\\n, \\x01) or a %XX code, not to a word."""
    logs.register_credentials("alice", "proxy")
    log = logging.getLogger("proxyvpn.test")
    log.warning("%r %r", b"user\nproxy\n", "\x01proxy")
    log.warning("query ?u=alice%3Aproxy&x=1")
    lines = output.getvalue().splitlines()
    assert "proxy" not in lines[0].removeprefix("proxyvpn: "), lines[0]
    assert lines[1] == "proxyvpn: query ?u=alice%3A***&x=1"


def test_a_password_with_digits_or_punctuation_is_redacted_wherever_it_occurs(output):
    """Only letters-only passwords get the word rule: "hunter2" inside "xhunter2y" is
    still redacted, as are the random-looking credential forms."""
    logs.register_credentials("alice", "hunter2")
    logging.getLogger("proxyvpn.test").warning("xhunter2y hunter2é alice:hunter2z")
    assert output.getvalue() == "proxyvpn: x***y ***é ***z\n"


def test_a_password_with_punctuation_at_its_ends_is_still_redacted(output):
    logs.register_credentials("alice", "!hunter2?")
    logging.getLogger("proxyvpn.test").warning("x!hunter2?y and a!hunter2?")
    assert output.getvalue() == "proxyvpn: x***y and a***\n"


def test_bare_secrets_shorter_than_the_minimum_are_not_registered(output):
    logs.register_secret("ab")
    logging.getLogger("proxyvpn.test").warning("about tabs")
    assert output.getvalue() == "proxyvpn: about tabs\n"


def test_no_credential_forms_without_a_password():
    assert logs.register_credentials("alice", "") is None
    assert "alice:" not in logs._secrets


def test_credential_forms_token_matches_the_header():
    forms = logs.credential_forms("test", "123\u00a3")
    assert "dGVzdDoxMjPCow==" in forms and "test:123\u00a3" in forms and "test:123%C2%A3" in forms


def test_setup_logging_is_idempotent(output):
    logs.setup_logging(True)
    assert len(_our_handlers()) == 1
