"""The cgroup v2 filesystem: where it is mounted, what cgroups exist, and moving this
process into one (for `proxyvpn exec`). Reads need no privileges; moving needs write
access to the target's cgroup.procs (root, or a delegated subtree)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from proxyvpn.errors import ConfigError

MOUNTS = Path("/proc/self/mounts")


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal (\040...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_cgroup2_mount(text: str) -> str | None:
    """The first cgroup2 mount point in a /proc/self/mounts text, or None."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return _unescape(fields[1])
    return None


def cgroup2_mount(mounts: Path = MOUNTS) -> str | None:
    """Where cgroup v2 is mounted in this mount namespace (hybrid layouts put it at
    /sys/fs/cgroup/unified), or None."""
    try:
        return parse_cgroup2_mount(mounts.read_text(errors="replace"))
    except OSError:
        return None


def parse_cpu_max(text: str) -> float | None:
    """The CPUs a cgroup's cpu.max allows ("50000 100000": 0.5), or None for no limit."""
    fields = text.split()
    try:
        quota, period = fields[0], int(fields[1]) if len(fields) > 1 else 100_000
        return None if quota == "max" else int(quota) / period
    except (IndexError, ValueError, ZeroDivisionError):
        return None


def own_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> str | None:
    """This process's cgroup v2 path ("/system.slice/x.service"), or None."""
    try:
        for line in proc_cgroup.read_text(errors="replace").splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    except OSError:
        pass
    return None


def cpu_limit(root: str, cgroup: str) -> float | None:
    """The tightest cpu.max quota (in CPUs) on ``cgroup`` and its ancestors, or None.
    A systemd CPUQuota= lands here; sched_getaffinity() does not see it."""
    parts = [p for p in cgroup.split("/") if p]
    limits = []
    for depth in range(len(parts), -1, -1):
        try:
            limit = parse_cpu_max(Path(root, *parts[:depth], "cpu.max").read_text())
        except OSError:
            continue  # the root has no cpu.max; a controller may not be enabled
        if limit is not None:
            limits.append(limit)
    return min(limits, default=None)


def usable_cpus() -> float:
    """How many CPUs this process can use: its affinity, capped by a cgroup CPU quota."""
    cpus: float = len(os.sched_getaffinity(0))
    root, cgroup = cgroup2_mount(), own_cgroup()
    if root is not None and cgroup is not None:
        limit = cpu_limit(root, cgroup)
        if limit is not None:
            cpus = min(cpus, limit)
    return cpus


def relative(root: str, directory: str) -> str:
    """A cgroup directory as a path relative to the cgroup2 root: "/a/b" ("/" for root)."""
    rel = os.path.relpath(directory, root)
    return "/" if rel == "." else "/" + rel.replace(os.sep, "/")


def scan(root: str) -> dict[str, int]:
    """Every cgroup below the root (not the root itself): relative path -> cgroup id (the
    directory's inode number, which is what `socket cgroupv2` compares)."""
    out: dict[str, int] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # removed while we walked: its removal event (or none) follows
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    out[relative(root, entry.path)] = entry.inode()
                    stack.append(entry.path)
            except OSError:
                continue
    return out


def enter(directory: Path) -> bool:
    """Create `directory` (and its parents) if missing and move this process into it.
    True when it had to be created. ConfigError with one line when that is not allowed."""
    created = False
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            created = True
        (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        why = exc.strerror or str(exc)
        hint = (": run as root, or delegate that cgroup directory to this user"
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "")
        raise ConfigError(f"cannot move into cgroup {directory}: {why}{hint}") from None
    return created
