"""The state directory: a lock that says "proxyvpn is running" and a journal of what it changed.

Layout of <dir> (mode 0700, owned by the user running proxyvpn):

* lock        flock()ed (exclusively, non-blocking) by the running `up` for its whole
              lifetime; holds that process's pid as text. The kernel drops the lock when the
              process dies, however it dies, so "held" means "alive" - no pid guessing.
* state.json  {"version": 1, "pid", "started", "proxy" (password masked), "tun",
              "applied": [op dicts in application order], ...}; replaced atomically
              (temporary file 0600, fsync, rename) before every operation is applied.
* state.last.json  the journal of the last clean teardown, kept with --keep-logs (renamed
              so that it is never mistaken for changes still in place).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from proxyvpn.errors import AlreadyRunningError, ConfigError, PrivilegeError

log = logging.getLogger("proxyvpn.system")

STATE_VERSION = 1
DEFAULT_STATE_DIR = Path("/run/proxyvpn")


def _usable(path: Path, *, explicit: bool) -> Path | None:
    """Create `path` (0700) if missing and check it is ours and private.

    Returns the path, or None when a default candidate cannot be used; an explicit
    --state-dir that cannot be used is a ConfigError.
    """
    def refuse(reason: str) -> None:
        if explicit:
            raise ConfigError(f"state dir {path}: {reason}")
        log.debug("state dir %s not usable: %s", path, reason)

    try:
        path.mkdir(mode=0o700, parents=explicit)
    except FileExistsError:
        pass
    except OSError as exc:
        refuse(f"cannot create it: {exc.strerror}")
        return None
    try:
        st = path.lstat()
    except OSError as exc:
        refuse(f"cannot stat it: {exc.strerror}")
        return None
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        refuse("not a directory (symbolic links are refused)")
        return None
    # root may clean up after any user (`sudo proxyvpn down --state-dir ...`); anyone else
    # only trusts a directory they own, or another user could plant a forged journal.
    if st.st_uid != euid and euid != 0:
        refuse(f"owned by uid {st.st_uid}, not by you (uid {euid})")
        return None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        refuse("writable by group or others; chmod 700 it")
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        refuse("not writable")
        return None
    return path


def resolve_state_dir(config_state_dir: Path | None) -> Path:
    """The state directory to use: --state-dir if given, else /run/proxyvpn when we can
    create or write it, else $XDG_RUNTIME_DIR/proxyvpn. Creates it (0700) if needed."""
    if config_state_dir is not None:
        found = _usable(Path(config_state_dir), explicit=True)
        assert found is not None
        return found
    candidates = [DEFAULT_STATE_DIR]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(Path(runtime) / "proxyvpn")
    for candidate in candidates:
        found = _usable(candidate, explicit=False)
        if found is not None:
            return found
    raise ConfigError(
        f"no usable state directory: {DEFAULT_STATE_DIR} is not writable and "
        "XDG_RUNTIME_DIR is not set; pass --state-dir")


def _process_name(proc: Path) -> str | None:
    """/proc/PID/comm (readable by everyone), or None when the process is gone."""
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return None


class StateDir:
    """Lock and journal in one state directory (see the module docstring)."""

    def __init__(self, path: Path, *, keep: bool = False) -> None:
        self.path = Path(path)
        """The directory."""
        self.keep = keep
        """--keep-logs: keep the journal (as state.last.json) after a clean teardown."""
        self.lock_file = self.path / "lock"
        self.state_file = self.path / "state.json"
        self.last_file = self.path / "state.last.json"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ lock

    @property
    def locked(self) -> bool:
        """This object holds the lock."""
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the lock for the lifetime of the process (or until remove()/release()).

        AlreadyRunningError when a live process holds it.
        """
        if self._lock_fd is not None:
            return
        for _ in range(5):
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunningError(self._recorded_pid(), str(self.path)) from None
            # The previous holder may have unlinked the file between our open() and
            # flock(): then we locked an orphan inode and must retry on the new file.
            try:
                same = os.stat(self.lock_file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)
        raise AlreadyRunningError(None, str(self.path))

    def release(self) -> None:
        """Drop the lock (the lock file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder_pid(self) -> int | None:
        """Pid of the live process holding the lock (tested with flock, not by pid), or
        None when nobody holds it. 0 when it is held but the pid is not recorded yet."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise PrivilegeError(f"cannot read {self.lock_file}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._recorded_pid() or 0
        finally:
            os.close(fd)  # closing also drops the test lock if we got it
        return None

    def held_by(self, pid: int) -> bool:
        """Process `pid` is the proxyvpn holding our lock: it has this lock file open with
        an flock on it (/proc/PID/fdinfo shows the locks of each descriptor).

        The recorded pid is only text the directory's owner can write. Where the process's
        descriptors are not ours to read (a setcap'd `up` is not dumpable, so its own user
        cannot; another user's process) its name must be the "proxyvpn" that
        privileges.confine_up gives it - the kernel then still refuses a signal we may not
        send. Root can always read them, so root relies on the lock alone.
        """
        try:
            ours = os.stat(self.lock_file, follow_symlinks=False)
        except OSError:
            return False
        proc = Path("/proc", str(pid))
        try:
            fds = os.listdir(proc / "fd")
        except PermissionError:
            return _process_name(proc) == "proxyvpn"
        except OSError:
            return False  # gone
        for fd in fds:
            try:
                st = os.stat(proc / "fd" / fd)
                if (st.st_dev, st.st_ino) != (ours.st_dev, ours.st_ino):
                    continue
                info = (proc / "fdinfo" / fd).read_text()
            except OSError:
                continue  # closed meanwhile
            if any(line.startswith("lock:") and " FLOCK " in line for line in info.splitlines()):
                return True
        return False

    def _recorded_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            text = self.lock_file.read_text().strip()
            if text:
                return int(text)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            pid = (self.read() or {}).get("pid")
            return int(pid) if pid else None
        return None

    # ------------------------------------------------------------ journal

    def write(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically and durably (tmp 0600, fsync, rename, fsync dir)."""
        data = json.dumps(state, indent=2, sort_keys=True).encode() + b"\n"
        tmp = self.path / f".state.json.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self) -> dict[str, Any] | None:
        """The journal, or None when there is none. ConfigError when it is unreadable."""
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.state_file}: {exc.strerror}") from None
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{self.state_file} is not valid JSON: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"{self.state_file} has an unknown format (want version "
                              f"{STATE_VERSION})")
        return state

    def discard_state(self) -> None:
        """Delete state.json (after its changes were undone)."""
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def remove(self) -> None:
        """End of life: delete (or with keep, retire) the journal, release and delete the lock."""
        if self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.state_file, self.last_file)
        else:
            self.discard_state()
        if self._lock_fd is not None:
            # Unlink while still holding the lock: a process that opened the old file
            # notices the orphan inode in acquire() and retries.
            with contextlib.suppress(FileNotFoundError):
                self.lock_file.unlink()
            self.release()

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r}, locked={self.locked})"

