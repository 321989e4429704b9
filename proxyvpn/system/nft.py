"""nftables through libnftables (the `nftables` Python binding), or the `nft` binary
(chosen by proxyvpn.system.firewall, applied with use()).

A ruleset is loaded as one JSON batch, which the kernel commits as a single transaction:
the table exists whole or not at all. Errors come back as NftError, an OSError whose errno
is recovered from nft's message where it names one (EEXIST, ENOENT, EPERM...).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from proxyvpn.privileges import child_preexec

log = logging.getLogger("proxyvpn.system")

# nft reports kernel errors as strerror text only; map them back to errno values.
_ERRNO_TEXT = {
    "File exists": errno.EEXIST,
    "No such file or directory": errno.ENOENT,
    "Operation not permitted": errno.EPERM,
    "Permission denied": errno.EACCES,
    "Device or resource busy": errno.EBUSY,
    "Operation not supported": errno.EOPNOTSUPP,
    "Invalid argument": errno.EINVAL,
}


class NftError(OSError):
    """An nftables command failed; .errno is set when the message names a known error."""


def _error(what: str, message: str) -> NftError:
    message = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    code = next((c for text, c in _ERRNO_TEXT.items() if text in message), errno.EIO)
    return NftError(code, f"{what}: {message or 'nft failed'}")


class _Backend:
    """Runs a JSON command document; libnftables when importable (and wanted), else
    `nft -j -f -`. Which of the two is wanted is decided in proxyvpn.system.firewall."""

    def __init__(self, use_lib: bool = True) -> None:
        self._lib: Any = None
        if not use_lib:
            return
        try:
            import nftables  # the libnftables binding (pip-nftables / python3-nftables)

            self._lib = nftables.Nftables()
            self._lib.set_json_output(True)
        except (ImportError, OSError) as exc:
            log.debug("libnftables unavailable (%s); using the nft binary", exc)
            self._lib = None

    @property
    def name(self) -> str:
        return "libnftables" if self._lib is not None else "nft"

    def run_text(self, text: str, pass_fds: tuple[int, ...] = ()) -> tuple[int, str]:
        """(rc, error text) of nft commands in nft syntax, one transaction. `pass_fds`: fds
        the text names as /proc/self/fd/N; the nft binary inherits them at the same numbers."""
        if self._lib is not None:
            self._lib.set_json_output(False)
            try:
                rc, _, error = self._lib.cmd(text)
            finally:
                self._lib.set_json_output(True)
            return rc, error or ""
        binary = shutil.which("nft") or "/usr/sbin/nft"
        try:
            proc = subprocess.run([binary, "-f", "-"], input=text, capture_output=True,
                                  text=True, timeout=30, check=False, pass_fds=pass_fds,
                                  preexec_fn=child_preexec)
        except FileNotFoundError:
            return 1, "neither libnftables nor the nft binary is available"
        return proc.returncode, proc.stderr

    def run(self, document: dict[str, Any]) -> tuple[int, Any, str]:
        """(rc, parsed JSON output or None, error text)."""
        if self._lib is not None:
            rc, output, error = self._lib.json_cmd(document)
            return rc, output or None, error or ""
        binary = shutil.which("nft") or "/usr/sbin/nft"
        try:
            proc = subprocess.run([binary, "-j", "-f", "-"], input=json.dumps(document),
                                  capture_output=True, text=True, timeout=30, check=False,
                                  preexec_fn=child_preexec)
        except FileNotFoundError:
            return 1, None, "neither libnftables nor the nft binary is available"
        output = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, output, proc.stderr


_backend: _Backend | None = None


def backend() -> _Backend:
    """The process-wide backend (libnftables keeps one context). Unless use() chose, the
    binding when it loads, else the binary: what `down` needs to remove a table."""
    global _backend
    if _backend is None:
        _backend = _Backend()
    return _backend


def use(name: str) -> None:
    """Select the process-wide backend: "libnftables" or "nft-binary" (see
    proxyvpn.system.firewall.resolve, which checked that it is available)."""
    global _backend
    if name not in ("libnftables", "nft-binary"):
        raise ValueError(f"not an nftables backend: {name!r}")
    if _backend is None or _backend.name != ("libnftables" if name == "libnftables" else "nft"):
        _backend = _Backend(use_lib=name == "libnftables")


def load(commands: Iterable[dict[str, Any]]) -> None:
    """Load a batch of libnftables JSON commands atomically; NftError on failure."""
    rc, _, error = backend().run({"nftables": list(commands)})
    if rc != 0:
        raise _error("nft rejected the ruleset", error)


def load_text(text: str, pass_fds: tuple[int, ...] = ()) -> None:
    """Load nft-syntax commands atomically (one transaction); NftError on failure."""
    rc, error = backend().run_text(text, pass_fds)
    if rc != 0:
        raise _error("nft rejected the ruleset", error)


def list_table(family: str, name: str) -> dict[str, Any] | None:
    """The table's JSON listing, or None when it does not exist."""
    rc, output, error = backend().run(
        {"nftables": [{"list": {"table": {"family": family, "name": name}}}]})
    if rc != 0:
        err = _error(f"cannot list table {family} {name}", error)
        if err.errno == errno.ENOENT:
            return None
        raise err
    return output or {"nftables": []}


def table_exists(family: str, name: str) -> bool:
    """The table is loaded."""
    return list_table(family, name) is not None


def verify(family: str, name: str, chains: Iterable[str]) -> None:
    """After a load: the table and each named chain exist (NftError otherwise)."""
    listing = list_table(family, name)
    if listing is None:
        raise NftError(errno.ENOENT, f"table {family} {name} is missing after loading it")
    present = {item["chain"]["name"] for item in listing.get("nftables", []) if "chain" in item}
    missing = [c for c in chains if c not in present]
    if missing:
        raise NftError(errno.ENOENT,
                       f"table {family} {name} lacks chain(s) {', '.join(missing)} after loading")


def delete_table(family: str, name: str) -> bool:
    """Delete the table and everything in it; False when it did not exist."""
    rc, _, error = backend().run(
        {"nftables": [{"delete": {"table": {"family": family, "name": name}}}]})
    if rc != 0:
        err = _error(f"cannot delete table {family} {name}", error)
        if err.errno == errno.ENOENT:
            return False
        raise err
    return True
