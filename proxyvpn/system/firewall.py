"""Which firewall backend to use: the one place that turns --firewall-backend into a
concrete backend.

    libnftables  the `nftables` Python binding of libnftables (one JSON batch, in process)
    nft-binary   the same JSON batch through `nft -j -f -`
    iptables     iptables-restore / ip6tables-restore (chains PROXYVPN; proxyvpn.plan.iptables)

`auto` takes the first that is available in that order; `nft` the first of the two
nftables ones. A forced backend that is not available is a ConfigError, before anything
changes. Probing needs no privileges (an import and a PATH lookup), so a dry run shows the
backend `up` would use.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from proxyvpn.errors import ConfigError

log = logging.getLogger("proxyvpn.system")

CONCRETE = ("libnftables", "nft-binary", "iptables")
"""The backends a request resolves to."""

_ORDER = {
    "auto": CONCRETE,
    "nft": ("libnftables", "nft-binary"),
    "libnftables": ("libnftables",),
    "nft-binary": ("nft-binary",),
    "iptables": ("iptables",),
}

_WHAT = {
    "libnftables": "the libnftables Python module (python3-nftables / pip nftables) with "
                   "libnftables1",
    "nft-binary": "the nft binary (package nftables)",
    "iptables": "iptables-nft-restore and ip6tables-nft-restore (package iptables; "
                "iptables-legacy cannot be used: it needs CAP_NET_RAW, which proxyvpn drops)",
}


def libnftables_available() -> bool:
    """The binding imports and its shared library loads."""
    try:
        import nftables

        nftables.Nftables()
    except (ImportError, OSError) as exc:
        log.debug("libnftables unavailable: %s", exc)
        return False
    return True


def nft_binary() -> str | None:
    """Path of the nft binary, or None."""
    return shutil.which("nft") or shutil.which("/usr/sbin/nft")


def iptables_binary(family: int, what: str) -> str | None:
    """Path of the nf_tables flavour of `iptables-WHAT` / `ip6tables-WHAT`, or None.

    iptables-legacy opens a raw socket, so with only CAP_NET_ADMIN (all proxyvpn keeps,
    see proxyvpn.privileges) it fails with "Permission denied (you must be root)":
    only iptables-nft can work, so only it is looked for, under either name."""
    base = "ip6tables" if family == 6 else "iptables"
    for name in (f"{base}-nft-{what}", f"{base}-{what}"):
        path = shutil.which(name) or shutil.which(f"/usr/sbin/{name}")
        if path and (name != f"{base}-{what}" or _is_nft_flavour(path)):
            return path
    return None


def _is_nft_flavour(path: str) -> bool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "nf_tables" in out.stdout


def iptables_binaries() -> tuple[str, str] | None:
    """Paths of iptables-restore and ip6tables-restore (nf_tables flavour), or None unless
    both exist (the killswitch must cover IPv6 too)."""
    v4, v6 = iptables_binary(4, "restore"), iptables_binary(6, "restore")
    return (v4, v6) if v4 and v6 else None


def available(backend: str) -> bool:
    """Whether a concrete backend can be used on this host."""
    if backend == "libnftables":
        return libnftables_available()
    if backend == "nft-binary":
        return nft_binary() is not None
    if backend == "iptables":
        return iptables_binaries() is not None
    raise ValueError(f"unknown firewall backend {backend!r}")


def resolve(requested: str) -> str:
    """The concrete backend for a --firewall-backend value (see the module docstring)."""
    try:
        candidates = _ORDER[requested]
    except KeyError:
        raise ConfigError(f"unknown firewall backend {requested!r}") from None
    for backend in candidates:
        if available(backend):
            log.debug("firewall backend: %s (requested %s)", backend, requested)
            return backend
    needed = " or ".join(_WHAT[b] for b in candidates)
    raise ConfigError(f"--firewall-backend {requested}: not available on this host; "
                      f"install {needed}")
