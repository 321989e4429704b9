"""The cgroup watcher: keeps the nft cgroup sets current while `up` runs.

inotify on the directories of the cgroup2 tree that can matter (every one with
--only-cgroup/--skip-cgroup patterns; without, the root and the exec directory's subtree,
see selection.needs_watch): IN_CREATE/IN_DELETE of subdirectories, renames as delete +
create. Each burst of events becomes one nft batch of element additions and deletions,
which the kernel applies atomically. Rules are never touched,
and a socket's cgroup is fixed when the socket is created, so established flows keep
their verdict. Which element goes into which set is decided by the pure
proxyvpn.plan.selection.CgroupTracker; this module only does the I/O.

The tracker only keeps a batch's changes once nft accepted it. Anything failing while
events are handled (a watch that cannot be added, nft refusing or failing to run) never
escapes the event callback: the tracker is rolled back to what nft holds, the failure is
logged once, loudly, and a full rescan (re-watch the tree, reconcile the sets with it) is
scheduled, with backoff, until one succeeds.

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
from collections.abc import Callable, Iterable

from proxyvpn.errors import ProxyVpnError
from proxyvpn.plan import nft as nft_plan
from proxyvpn.plan.selection import (
    MAX_LEVEL,
    CgroupTracker,
    Change,
    ResolvedSelection,
    needs_watch,
    nft_cgroup_ref,
    unanchored_skips,
)
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


MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"


class WatchError(ProxyVpnError):
    """The cgroup watcher could not start (or could not watch a directory)."""


def watch_limit_message(watched: int, path: str = MAX_USER_WATCHES) -> str:
    """One line for ENOSPC from inotify_add_watch: which sysctl to raise, and to what."""
    try:
        with open(path) as f:
            limit = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        limit = 0
    now = f" (now {limit})" if limit else ""
    suggest = max(limit * 2, 65536)
    return (f"cannot watch cgroups: the inotify watch limit fs.inotify.max_user_watches"
            f"{now} is reached ({watched} cgroup directories watched by this process); "
            f"raise it, e.g. sysctl -w fs.inotify.max_user_watches={suggest}")


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

    RETRY_FIRST = 0.1
    """Seconds before the first rescan after a failure; doubles up to RETRY_MAX."""
    RETRY_MAX = 30.0

    def __init__(self, root: str, sel: ResolvedSelection,
                 held: Iterable[tuple[str, int]] = ()) -> None:
        self.root = root.rstrip("/") or "/"
        self._sel = sel
        self._tracker = CgroupTracker(sel, held)
        self._libc = _libc()
        self._fd = -1
        self._wds: dict[int, str] = {}
        """watch descriptor -> watched directory (relative path)."""
        self._fds: dict[str, int] = {}
        """relative path -> O_PATH descriptor of a cgroup in some set."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch_error: str | None = None
        """Set by _watch_tree when a directory could not be watched (the scan goes on)."""
        self._retry: asyncio.TimerHandle | None = None
        self._delay = self.RETRY_FIRST
        self.failing = False
        """A failure was logged and no rescan has succeeded since."""
        self.batches = 0
        """nft batches applied (tests and the debug log)."""
        self.rescans = 0
        """Full rescans done after a failure or a queue overflow."""

    # ------------------------------------------------------------- lifetime

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the tree (the part that matters), then reconcile the sets with what the
        watches found. WatchError (one line) when that is not possible."""
        for pattern in unanchored_skips(self._sel):
            log.warning("--skip-cgroup %r is not anchored with ^: it matches anywhere in a "
                        "cgroup path, so anyone who can create a cgroup (e.g. in their "
                        "delegated systemd subtree) can name one to match it and escape "
                        "capture and the killswitch; anchor it, e.g. '^/system\\.slice/'",
                        pattern)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise WatchError(f"cannot watch cgroups: inotify_init1: "
                             f"{os.strerror(ctypes.get_errno())}")
        try:
            for path in self._tracker.held:
                self._open(path)
            self._watch_error = None
            found = self._watch_tree("/")
            if self._watch_error is not None:
                raise WatchError(self._watch_error)
            self._tracker.begin()
            try:
                self._apply(self._tracker.reconcile(dict(found)))
            except BaseException:
                self._tracker.rollback()
                raise
            self._tracker.commit()
            self._report_too_deep()
        except BaseException:
            self.stop()
            raise
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)
        log.info("cgroup watcher: %d directories watched, %d cgroups selected",
                 len(self._wds), len(self._tracker.held))

    def stop(self) -> None:
        """Stop watching and close every descriptor; the sets go with the table."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
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
                raise WatchError(watch_limit_message(len(self._wds)))
            raise WatchError(f"cannot watch cgroup {rel}: {os.strerror(err)}")
        self._wds[wd] = rel
        return True

    def _watch_tree(self, rel: str) -> list[tuple[str, int]]:
        """Watch `rel` and every directory below it that needs a watch; returns the cgroups
        found in the watched directories (path, id), which may have appeared before their
        parent's watch existed. A directory that cannot be watched is still listed (and
        the first such error kept in _watch_error for the caller): the scan stays whole."""
        found: list[tuple[str, int]] = []
        stack = [rel]
        while stack:
            current = stack.pop()
            if not needs_watch(self._sel, current):
                continue
            try:
                if not self._add_watch(current):
                    continue
            except WatchError as exc:
                if self._watch_error is None:
                    self._watch_error = str(exc)
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
        """The event callback: never raises (asyncio would log it and carry on with the
        events lost); a failure schedules a rescan instead."""
        events: list[tuple[int, int, str]] = []
        try:
            while True:
                try:
                    buf = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                if not buf:
                    break
                events += parse_events(buf)
        except Exception as exc:  # the events read so far are handled, the rest rescanned
            self._failed(f"reading inotify events: {exc}")
        self._transaction(lambda: self._handle(events), "applying cgroup events")

    def _handle(self, events: list[tuple[int, int, str]]) -> list[Change]:
        changes: list[Change] = []
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("cgroup watcher: event queue overflowed; rescanning")
                changes += self._rescan_changes()
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

    def _rescan_changes(self) -> list[Change]:
        """Re-watch the tree (adding a watch twice is harmless: same descriptor) and
        reconcile the tracker with what it holds now."""
        self.rescans += 1
        return self._tracker.reconcile(dict(self._watch_tree("/")))

    # ------------------------------------------------------------- failures

    def _transaction(self, produce: Callable[[], list[Change]], what: str) -> bool:
        """Compute changes and apply them as one nft batch; the tracker keeps them only if
        nft accepted them. Never raises. True when everything (watches too) worked."""
        self._watch_error = None
        self._tracker.begin()
        try:
            self._apply(produce())
        except Exception as exc:
            self._tracker.rollback()
            self._prune_fds()
            self._failed(f"{what}: {exc}")
            return False
        self._tracker.commit()
        self._prune_fds()
        self._report_too_deep()
        if self._watch_error is not None:
            self._failed(self._watch_error)
            return False
        return True

    def _failed(self, why: str) -> None:
        """Log (loudly, once per run of failures) and schedule a rescan with backoff."""
        if not self.failing:
            self.failing = True
            log.error("cgroup watcher: %s; the cgroup sets may be out of date until a "
                      "rescan succeeds (retrying with backoff, up to every %gs)",
                      why, self.RETRY_MAX)
        else:
            log.debug("cgroup watcher: still failing: %s", why)
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(self._delay, self._retry_rescan)
            self._delay = min(self._delay * 2, self.RETRY_MAX)

    def _retry_rescan(self) -> None:
        self._retry = None
        if self._fd < 0:
            return
        if self._transaction(self._rescan_changes, "rescanning cgroups"):
            if self.failing:
                log.warning("cgroup watcher: rescan succeeded, the cgroup sets are in sync "
                            "again (%d cgroups selected)", len(self._tracker.held))
            self.failing = False
            self._delay = self.RETRY_FIRST

    def _report_too_deep(self) -> None:
        for path, kinds in self._tracker.pop_too_deep():
            flags = " and ".join(f"--{kind}-cgroup" for kind in kinds)
            log.warning("cgroup %s matches %s but is deeper than level %d and no ancestor "
                        "matches, so it cannot be selected; match an ancestor instead",
                        path, flags, MAX_LEVEL)

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

    def _prune_fds(self) -> None:
        held = self._tracker.held
        for path in [p for p in self._fds if p not in held]:
            os.close(self._fds.pop(path))

    def _apply(self, changes: list[Change]) -> None:
        """One nft batch for `changes`; raises (NftError, OSError) when it failed, with the
        descriptors as they were."""
        if not changes:
            return
        usable: list[tuple[Change, int]] = []
        retired: dict[str, int] = {}
        unnamed: list[Change] = []
        try:
            for change in changes:
                fd = self._fds.get(change.path)
                if change.add and (fd is None or os.fstat(fd).st_ino != change.id):
                    if fd is not None:
                        # The old cgroup of that name; its delete came first.
                        retired.setdefault(change.path, fd)
                        del self._fds[change.path]
                    fd = self._open(change.path)
                if fd is None or os.fstat(fd).st_ino != change.id:
                    # Gone before we could name it (an add), or never named (a delete of
                    # an element from the plan whose cgroup vanished before start): ids
                    # are never reused, so a stale element is harmless.
                    log.debug("cgroup %s: cannot name id %d to nft; skipped",
                              change.path, change.id)
                    if change.add:
                        unnamed.append(change)
                    continue
                usable.append((change, fd))
            if usable:
                text = nft_plan.element_commands(
                    (change, nft_cgroup_ref(f"/proc/self/fd/{fd}")) for change, fd in usable)
                nft.load_text(text, tuple(sorted({fd for _, fd in usable})))
        except BaseException:
            # The sets are unchanged: so are the descriptors naming what they hold.
            for path, old in retired.items():
                new = self._fds.pop(path, None)
                if new is not None:
                    os.close(new)
                self._fds[path] = old
            raise
        if usable:
            self.batches += 1
            for change, _ in usable:
                log.info("cgroup %s (id %d) %s %s", change.path, change.id,
                         "added to" if change.add else "removed from", change.set)
        for change in unnamed:
            self._tracker.forget(change.path, change.id)
        for fd in retired.values():
            os.close(fd)
