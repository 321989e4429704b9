"""The per-packet fast path, whichever implementation is available.

Import packet functions from here, never from ``wire`` or ``_fastpath`` directly: this
module picks the C extension ``proxyvpn._fastpath`` when it is built and the
pure-Python twin :mod:`proxyvpn.netstack.wire` otherwise (or when the environment
sets ``PROXYVPN_PURE=1``, e.g. to debug or to compare). Both have the same API and
are proven to agree byte for byte by ``tests/unit/test_fastpath_agree.py``.

``IMPL`` says which one was chosen: ``"c"`` or ``"python"``. :func:`select` gives
the same API as one object, for a caller that chooses per instance (``--pure-python``).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType, SimpleNamespace

from proxyvpn.netstack import wire

__all__ = [
    "ACK",
    "BIG_IP_LEN_MAX",
    "CWR",
    "DROP_BAD_ADDRESS",
    "DROP_BAD_IP_CHECKSUM",
    "DROP_BAD_IP_HEADER",
    "DROP_BAD_OPTIONS",
    "DROP_BAD_TCP_CHECKSUM",
    "DROP_BAD_TCP_HEADER",
    "DROP_BAD_VERSION",
    "DROP_FRAGMENT",
    "DROP_NOT_TCP",
    "DROP_REASONS",
    "DROP_TRUNCATED",
    "ECE",
    "FIN",
    "IMPL",
    "PSH",
    "READ_BATCH_MAX_BYTES",
    "RST",
    "SYN",
    "URG",
    "VNET_HDR_LEN",
    "build",
    "build_many",
    "checksum",
    "parse",
    "read_batch",
    "select",
    "write_batch",
]

_API = tuple(name for name in __all__ if name not in ("IMPL", "select"))

_log = logging.getLogger("proxyvpn.netstack")


def _select() -> tuple[ModuleType, str]:
    """Return (module, IMPL) following PROXYVPN_PURE and the extension's presence."""
    if os.environ.get("PROXYVPN_PURE") == "1":
        return wire, "python"
    try:
        from proxyvpn import _fastpath
    except ImportError as exc:
        # Not fatal: the reference path is correct, just ~30-50x slower per packet.
        _log.warning(
            "C fast path proxyvpn._fastpath is not built (%s); using the pure-Python "
            "packet path. Build it with: python setup.py build_ext --inplace",
            exc,
        )
        return wire, "python"
    return _fastpath, "c"


_impl, IMPL = _select()

FIN: int = _impl.FIN
SYN: int = _impl.SYN
RST: int = _impl.RST
PSH: int = _impl.PSH
ACK: int = _impl.ACK
URG: int = _impl.URG
ECE: int = _impl.ECE
CWR: int = _impl.CWR

DROP_TRUNCATED: int = _impl.DROP_TRUNCATED
DROP_BAD_VERSION: int = _impl.DROP_BAD_VERSION
DROP_BAD_IP_HEADER: int = _impl.DROP_BAD_IP_HEADER
DROP_FRAGMENT: int = _impl.DROP_FRAGMENT
DROP_NOT_TCP: int = _impl.DROP_NOT_TCP
DROP_BAD_IP_CHECKSUM: int = _impl.DROP_BAD_IP_CHECKSUM
DROP_BAD_TCP_HEADER: int = _impl.DROP_BAD_TCP_HEADER
DROP_BAD_TCP_CHECKSUM: int = _impl.DROP_BAD_TCP_CHECKSUM
DROP_BAD_OPTIONS: int = _impl.DROP_BAD_OPTIONS
DROP_BAD_ADDRESS: int = _impl.DROP_BAD_ADDRESS
DROP_REASONS: tuple[str, ...] = _impl.DROP_REASONS
READ_BATCH_MAX_BYTES: int = _impl.READ_BATCH_MAX_BYTES
VNET_HDR_LEN: int = _impl.VNET_HDR_LEN
BIG_IP_LEN_MAX: int = _impl.BIG_IP_LEN_MAX

checksum = _impl.checksum
parse = _impl.parse
build = _impl.build
build_many = _impl.build_many
read_batch = _impl.read_batch
write_batch = _impl.write_batch


def select(pure: bool = False) -> SimpleNamespace:
    """The whole API (every name in ``__all__`` but ``select``) as one object.

    ``pure=True`` forces the Python reference; otherwise this is the module-level
    choice (C unless PROXYVPN_PURE=1 or the extension is missing, which was already
    logged once at import).
    """
    mod, impl = (wire, "python") if pure else (_impl, IMPL)
    return SimpleNamespace(**{name: getattr(mod, name) for name in _API}, IMPL=impl)
