"""The cgroup watcher: keeps the nft cgroup sets current while `up` runs.

inotify on every directory of the cgroup2 tree (IN_CREATE/IN_DELETE of subdirectories,
renames as delete + create); each burst of events becomes one nft batch of element
additions and deletions, which the kernel applies atomically. Rules are never touched,
and a socket's cgroup is fixed when the socket is created, so established flows keep
their verdict. Which element goes into which set is decided by the pure
proxyvpn.plan.selection.CgroupTracker; this module only does the I/O.

A removed cgroup can no longer be named by path, and nft only accepts paths (it stat()s
them for the id), so we hold an O_PATH descriptor for every cgroup in a set and name it as
/proc/self/fd/N: the descriptor keeps the inode, and with it the id, alive.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Iterable

from proxyvpn.errors import ProxyVpnError
from proxyvpn.plan import nft as nft_plan
from proxyvpn.plan.selection import CgroupTracker, Change, ResolvedSelection, nft_cgroup_ref
from proxyvpn.system import cgroups, nft

log = logging.getLogger("proxyvpn.cgroups")

IN_MODIFY = 0x002
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
_EVENT = struct.Struct("iIII")


class WatchError(ProxyVpnError):
    """The cgroup watcher could not start."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    """inotify_event records -> (wd, mask, name)."""
    out, offset = [], 0
    while offset + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
        offset += _EVENT.size
        name = buf[offset:offset + length].split(b"\0", 1)[0].decode(errors="surrogateescape")
        offset += length
        out.append((wd, mask, name))
    return out


class CgroupWatcher:
    """Watches the cgroup2 tree below `root` and applies set changes; start()/stop()."""

    def __init__(self, root: str, sel: ResolvedSelection,
                 held: Iterable[tuple[str, int]] = ()) -> None:
        self.root = root.rstrip("/") or "/"
        self._tracker = CgroupTracker(sel, held)
        self._libc = _libc()
        self._fd = -1
        self._wds: dict[int, str] = {}
        """watch descriptor -> watched directory (relative path)."""
        self._fds: dict[str, int] = {}
        """relative path -> O_PATH descriptor of a cgroup in some set."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        """nft batches applied (tests and the debug log)."""

    # ------------------------------------------------------------- lifetime

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the whole tree, then reconcile the sets with a fresh scan."""
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise WatchError(f"cannot watch cgroups: inotify_init1: "
                             f"{os.strerror(ctypes.get_errno())}")
        try:
            for path in self._tracker.held:
                self._open(path)
            self._watch_tree("/")
            self._apply(self._tracker.reconcile(cgroups.scan(self.root)))
        except BaseException:
            self.stop()
            raise
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)
        log.info("cgroup watcher: %d directories watched, %d cgroups selected",
                 len(self._wds), len(self._tracker.held))

    def stop(self) -> None:
        """Stop watching and close every descriptor; the sets go with the table."""
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self._loop = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._wds.clear()

    # ------------------------------------------------------------- inotify

    def _abs(self, rel: str) -> str:
        return self.root if rel == "/" else self.root.rstrip("/") + rel

    def _add_watch(self, rel: str) -> bool:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(self._abs(rel)), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False  # removed before we got to it
            if err == errno.ENOSPC:
                raise WatchError("cannot watch cgroups: inotify watch limit reached "
                                 "(raise fs.inotify.max_user_watches)")
            raise WatchError(f"cannot watch cgroup {rel}: {os.strerror(err)}")
        self._wds[wd] = rel
        return True

    def _watch_tree(self, rel: str) -> list[tuple[str, int]]:
        """Watch `rel` and every directory below it; returns the cgroups found below it
        (path, id), which may have appeared before their parent's watch existed."""
        found: list[tuple[str, int]] = []
        stack = [rel]
        while stack:
            current = stack.pop()
            if not self._add_watch(current):
                continue
            try:
                entries = list(os.scandir(self._abs(current)))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        child = cgroups.relative(self.root, entry.path)
                        found.append((child, entry.inode()))
                        stack.append(child)
                except OSError:
                    continue
        return found

    def _on_readable(self) -> None:
        changes: list[Change] = []
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not buf:
                break
            changes += self._handle(parse_events(buf))
        self._apply(changes)

    def _handle(self, events: list[tuple[int, int, str]]) -> list[Change]:
        changes: list[Change] = []
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("cgroup watcher: event queue overflowed; rescanning")
                self._wds.clear()
                self._watch_tree("/")
                changes += self._tracker.reconcile(cgroups.scan(self.root))
                continue
            if mask & IN_IGNORED:
                self._wds.pop(wd, None)
                continue
            parent = self._wds.get(wd)
            if parent is None or not mask & IN_ISDIR or not name:
                continue
            path = (parent.rstrip("/") + "/" + name)
            if mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    cid = os.stat(self._abs(path)).st_ino
                except OSError:
                    continue  # already gone again
                changes += self._tracker.created(path, cid)
                for child, child_id in self._watch_tree(path):
                    changes += self._tracker.created(child, child_id)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                changes += self._tracker.removed(path)
        return changes

    # ------------------------------------------------------------- nft

    def _open(self, path: str) -> int | None:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(self._abs(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
            self._fds[path] = fd
        return fd

    def _apply(self, changes: list[Change]) -> None:
        if not changes:
            return
        usable: list[tuple[Change, int]] = []
        retired: list[int] = []
        for change in changes:
            fd = self._fds.get(change.path)
            if change.add and (fd is None or os.fstat(fd).st_ino != change.id):
                if fd is not None:
                    retired.append(fd)  # the old cgroup of that name; its delete came first
                    del self._fds[change.path]
                fd = self._open(change.path)
            if fd is None or os.fstat(fd).st_ino != change.id:
                # Gone before we could name it (an add), or never named (a delete of an
                # element from the plan whose cgroup vanished before start): ids are never
                # reused, so a stale element is harmless.
                log.debug("cgroup %s: cannot name id %d to nft; skipped", change.path, change.id)
                continue
            usable.append((change, fd))
        if usable:
            text = nft_plan.element_commands(
                (change, nft_cgroup_ref(f"/proc/self/fd/{fd}")) for change, fd in usable)
            try:
                nft.load_text(text, tuple(sorted({fd for _, fd in usable})))
                self.batches += 1
                for change, _ in usable:
                    log.info("cgroup %s (id %d) %s %s", change.path, change.id,
                             "added to" if change.add else "removed from", change.set)
            except nft.NftError as exc:
                log.warning("cgroup watcher: nft refused %d set change(s): %s", len(usable), exc)
                self._tracker.undo(change for change, _ in usable)
        for fd in retired:
            os.close(fd)
        held = self._tracker.held
        for path in [p for p in self._fds if p not in held]:
            os.close(self._fds.pop(path))
