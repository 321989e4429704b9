"""Logging setup: stdlib logging, subsystem loggers, a per-flow adapter, secret redaction."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never let this string reach a log line (defence in depth: we also never log it)."""
    if value and len(value) >= 3:
        _secrets.add(value)


class RedactSecrets(logging.Filter):
    """Replaces registered secrets in every record with ***."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            if any(secret in message for secret in _secrets):
                for secret in _secrets:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, ()
        return True


def setup_logging(verbose: bool) -> None:
    """One stderr handler on the "proxyvpn" logger; -v shows DEBUG."""
    root = logging.getLogger("proxyvpn")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if any(getattr(h, "_proxyvpn", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._proxyvpn = True  # type: ignore[attr-defined]
    fmt = "%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else "proxyvpn: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactSecrets())
    root.addHandler(handler)
    root.propagate = False


class FlowLogger(logging.LoggerAdapter):
    """Prefixes each message with the flow: `[10.0.0.2:5512 -> 1.2.3.4:443] ...`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['flow']}] {msg}", kwargs
