"""sysctls through /proc/sys, with sysctl(8)'s dotted names.

/proc/sys/net follows the network namespace of the calling process, so this reads and
writes the namespace proxyvpn runs in (what `ip netns exec` tests rely on).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("proxyvpn.system")

PROC_SYS = Path("/proc/sys")


def sysctl_path(key: str) -> Path:
    """/proc/sys path of a dotted key. As in sysctl(8), dots separate levels and a "/" in
    the key stands for a dot inside one level (an interface named eth0.100)."""
    if not key or key.startswith(".") or ".." in key:
        raise ValueError(f"bad sysctl key {key!r}")
    return PROC_SYS.joinpath(*(part.replace("/", ".") for part in key.split(".")))


def read_sysctl(key: str) -> str | None:
    """The current value (stripped), or None when the key does not exist or is unreadable."""
    try:
        return sysctl_path(key).read_text().strip()
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None


def write_sysctl(key: str, value: str) -> None:
    """Write a value. Raises OSError (ENOENT when the key - or its interface - is gone)."""
    path = sysctl_path(key)
    with open(path, "w") as fh:
        fh.write(f"{value}\n")
    log.debug("sysctl %s = %s", key, value)
