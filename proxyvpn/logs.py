"""Logging setup: stdlib logging, subsystem loggers, a per-flow adapter, secret redaction.

Redaction works on the final text of each line, as our handler's formatter produced it:
the message, and the traceback and stack that follow it, are all covered. The handler
sits on the root logger, so records of other libraries (asyncio's "Task exception was
never retrieved", with its traceback) go through it too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import urllib.parse
from collections.abc import MutableMapping
from typing import Any

from proxyvpn.relay.connect import encode_basic_credentials

MIN_BARE_SECRET = 3
"""A password shorter than this is not replaced wherever it stands alone: "x" or "ab"
would turn every such token (0x, "a b") into *** and make logs unreadable, and a
password that short can be guessed anyway. Its credential forms (register_credentials)
are replaced whatever its length, as is any scheme://user:password@ in a line."""

_secrets: set[str] = set()
_ordered: tuple[str, ...] = ()
"""_secrets, longest first: "alice:hunter2" must go before "hunter2" leaves "alice:***"."""
_word_like: set[str] = set()
"""Bare passwords of letters only ("proxy", "pass"): replaced only where they stand as a
word of their own, not inside "proxyvpn" or "password" (see _secrets_pattern)."""

_URL_USERINFO = re.compile(r"(://[^:/@\s\[]*):.*@")
"""The password of scheme://user:password@host: greedy up to the last @ of the line, so
that an unencoded @ in the password is covered too (over-redacting is the safe side).
No [ in the user: http://[::1]:3128 has none."""

# Where a word-like password counts as standing alone: not glued to a letter, digit,
# _ or - ... unless what precedes is an escape (repr's \n, \x01) or a %XX encoding.
_WORD_START = r"(?:(?<![\w-])|(?<=\\[a-z])|(?<=\\x[0-9a-fA-F]{2})|(?<=%[0-9A-Fa-f]{2}))"
_WORD_END = r"(?![\w-])"


def _add(value: str) -> None:
    global _ordered
    _secrets.add(value)
    _ordered = tuple(sorted(_secrets, key=len, reverse=True))


def register_secret(value: str | None) -> None:
    """Never let this string reach a log line (defence in depth: we also never log it)."""
    if value and len(value) >= MIN_BARE_SECRET:
        if value.isalpha():
            _word_like.add(value)
        _add(value)


def register_credentials(user: str, password: str) -> None:
    """The password (as register_secret), and the forms a user:password pair takes on
    its way to the proxy, whatever the password's length: `user:password`, its
    percent-encoded URL form, and the base64 token of the Proxy-Authorization field."""
    if not password:
        return  # a user name alone is no secret
    register_secret(password)
    for form in credential_forms(user, password):
        _add(form)


def credential_forms(user: str, password: str) -> set[str]:
    """`user:password`, `user:password` percent-encoded, and the Basic token (pure)."""
    pair = f"{user}:{password}"
    forms = {pair, f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"}
    # Credentials the encoder refuses are never sent (and the configuration refused them).
    with contextlib.suppress(ValueError):
        forms.add(encode_basic_credentials(user, password).removeprefix("Basic "))
    return forms


@functools.lru_cache(maxsize=4)
def _secrets_pattern(ordered: tuple[str, ...], word_like: frozenset[str]) -> re.Pattern[str]:
    """One regex for all secrets, longest first. A word-like password (letters only) is
    matched only where it stands as a word: with the password "proxy", "user:proxy@",
    "alice%3Aproxy" and "is proxy." are redacted but "proxyvpn" and "--proxy-url" stay,
    which would otherwise read "***vpn" on every line and tell the reader the password.
    Any other secret (digits or punctuation in it, the credential forms) is replaced
    wherever it occurs."""
    return re.compile("|".join(
        _WORD_START + re.escape(secret) + _WORD_END if secret in word_like else re.escape(secret)
        for secret in ordered))


def redact_url_passwords(text: str) -> str:
    """`text` with the password of every scheme://user:password@ replaced by *** (pure)."""
    return _URL_USERINFO.sub(r"\1:***@", text) if "://" in text else text


def redact(text: str) -> str:
    """`text` with every registered secret and every URL password replaced by ***."""
    text = redact_url_passwords(text)
    # Most lines hold no secret: a substring test each is far cheaper than the regex.
    if any(secret in text for secret in _ordered):
        text = _secrets_pattern(_ordered, frozenset(_word_like)).sub("***", text)
    return text


class RedactingFormatter(logging.Formatter):
    """A Formatter whose whole output -- message, exception text, stack -- is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactSecrets(logging.Filter):
    """Replaces registered secrets in the message of every record with ***, so that a
    handler after ours (one a test or an embedding program adds) sees it redacted too.
    Tracebacks are redacted by RedactingFormatter, which writes the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def setup_logging(verbose: bool) -> None:
    """One stderr handler on the root logger; -v shows DEBUG of the "proxyvpn" loggers."""
    logging.getLogger("proxyvpn").setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if any(getattr(h, "_proxyvpn", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._proxyvpn = True  # type: ignore[attr-defined]
    fmt = "%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else "proxyvpn: %(message)s"
    handler.setFormatter(RedactingFormatter(fmt))
    handler.addFilter(RedactSecrets())
    root.addHandler(handler)


class FlowLogger(logging.LoggerAdapter):
    """Prefixes each message with the flow: `[10.0.0.2:5512 -> 1.2.3.4:443] ...`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[{extra['flow']}] {msg}", kwargs
