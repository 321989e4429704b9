"""`proxyvpn down`: stop the running instance, or undo the journal a dead one left behind.

A live `up` tears itself down on SIGTERM (it knows its TUN fd and journal); we only signal
it and wait for its lock to be released. A dead one (kill -9, a crash, a power cut of
/run's contents notwithstanding) left its journal: we replay its undo, exactly what it
says and nothing else. Running `down` again is harmless.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

from proxyvpn.errors import (
    AlreadyRunningError,
    PrivilegeError,
    ProxyVpnError,
    UntrustedStateError,
)
from proxyvpn.plan.journal import journal_tun_name
from proxyvpn.system.apply import undo_ops
from proxyvpn.system.state import StateDir

log = logging.getLogger("proxyvpn.system")

PID_MAX_LIMIT = 4 * 1024 * 1024
"""The kernel's upper bound on pids (PID_MAX_LIMIT on 64-bit)."""


def _undo_journal(store: StateDir, state: dict) -> None:
    """Undo a dead instance's journal and delete it; ProxyVpnError if anything failed
    (the journal then stays, so a later `down` retries)."""
    # Checked before anything runs (UntrustedStateError): the journal may be forged.
    recorded = state.get("tun")
    applied = state.get("applied", [])
    tun = journal_tun_name(applied, recorded)
    why = _foreign_tun(store, tun)
    if why is not None:
        log.warning("%s: leaving it, its addresses and its settings alone", why)
    errors = undo_ops(applied, recorded, where=str(store.state_file), spare_tun=why is not None)
    if errors:
        raise ProxyVpnError(
            f"could not undo everything recorded in {store.state_file}: "
            + "; ".join(errors) + " (the journal is kept; fix the cause and run `proxyvpn down` again)")
    store.discard_state()


def _foreign_tun(store: StateDir, tun: object) -> str | None:
    """Why the link named like the journal's TUN must be left alone, or None.

    Ours is not persistent: it went away with the process that made it (no journal is
    replayed while that process holds the lock), so normally there is no such link at
    all. A TUN that exists was made since, by another VPN say, and undoing our ops on it
    would delete it or its addresses. A link of that name that is not even a TUN (eth0)
    means the journal lies: UntrustedStateError, nothing is undone.
    """
    if not isinstance(tun, str):
        return None  # journal_ops refuses what needs a TUN without one
    from proxyvpn.system.netlink import Netlink

    try:
        with Netlink() as nl:
            kind = nl.link_kind(tun)
    except OSError as exc:
        # Were it ours, the kernel deletes it with its last fd anyway: deleting someone
        # else's is the harm to avoid.
        return f"could not check whether a link named {tun} exists ({exc.strerror or exc})"
    if kind is None:
        return None
    if kind != "tun":
        raise UntrustedStateError(str(store.state_file),
                                  f"its TUN {tun!r} is a {kind or 'physical'} link here")
    return f"a TUN named {tun} exists, but it is not the one proxyvpn made (that went away " \
           "with its process)"


def _stop(store: StateDir, pid: int) -> None:
    """SIGTERM `pid` if it is the proxyvpn holding our lock, else UntrustedStateError.

    The pid comes from files the state dir's owner can write, and `down` may run as root:
    unchecked, a forged pid would make root signal any process. A pidfd pins the process
    from the check to the signal, so a pid reused in between cannot be hit either.
    """
    if pid > PID_MAX_LIMIT:
        raise UntrustedStateError(str(store.lock_file), f"pid {pid} is not a process id")
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise  # ProcessLookupError: gone already
        pidfd = None  # kernel < 5.3: check and kill(2), as close together as we can
    try:
        if not store.held_by(pid):
            if store.holder_pid() is None:
                return  # it exited (and let go of the lock) since we looked
            raise UntrustedStateError(str(store.lock_file), f"pid {pid} does not hold this "
                                      "lock as a proxyvpn process")
        if pidfd is None:
            os.kill(pid, signal.SIGTERM)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_released(store: StateDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.holder_pid() is None:
            return True
        time.sleep(0.05)
    return store.holder_pid() is None


def bring_down(state_dir: Path, *, timeout: float = 10.0) -> str:
    """Stop proxyvpn or clean up after it; returns a message for the user."""
    store = StateDir(state_dir)
    pid = store.holder_pid()
    if pid == 0:
        time.sleep(0.2)  # the holder has just taken the lock and not yet written its pid
        pid = store.holder_pid()
    if pid is not None:
        if pid <= 0:
            raise ProxyVpnError(f"the lock in {state_dir} is held but the holder's pid is unknown")
        try:
            _stop(store, pid)
        except ProcessLookupError:
            pass  # it exited between our lock test and the signal
        except PermissionError:
            raise PrivilegeError(f"not allowed to stop proxyvpn (pid {pid}): it runs as "
                                 "another user") from None
        if not _wait_released(store, timeout):
            raise ProxyVpnError(f"proxyvpn (pid {pid}) did not stop within {timeout:g} s; "
                                f"it still holds {store.lock_file}")
        # A clean exit removed its journal; one left behind means its teardown failed.
        leftover = store.read()
        if leftover:
            _locked_cleanup(store, leftover)
        return f"stopped proxyvpn (pid {pid})"
    state = store.read()
    if state is None:
        return "proxyvpn is not running"
    _locked_cleanup(store, state)
    return f"cleaned up after a proxyvpn that was not running (pid {state.get('pid')})"


def _locked_cleanup(store: StateDir, state: dict) -> None:
    # Hold the lock while undoing so that an `up` starting now cannot interleave with us.
    store.acquire()
    try:
        state = store.read() or {}  # re-read under the lock: it may have changed
        if state:
            log.warning("undoing the journal of proxyvpn pid %s (%d operations)",
                        state.get("pid"), len(state.get("applied", [])))
            _undo_journal(store, state)
    except BaseException:
        store.release()
        raise
    store.remove()


def clean_stale(state_dir: Path) -> str | None:
    """For `up`: if a journal exists that no live process owns, undo it first (warning).

    Works whether or not the caller already holds the lock (`up` takes it, then calls
    this). Returns a message when something was cleaned, None otherwise; raises
    AlreadyRunningError when another live process holds the lock.
    """
    store = StateDir(state_dir)
    state = store.read()
    if state is None:
        return None
    holder = store.holder_pid()
    mine = holder == os.getpid()
    if holder is not None and not mine:
        raise AlreadyRunningError(holder, str(state_dir))
    if mine and state.get("pid") == os.getpid():
        return None  # our own journal, not stale
    log.warning("a proxyvpn that was not running (pid %s) left changes behind; undoing them",
                state.get("pid"))
    if mine:
        # The caller holds the lock: undo and drop the journal, leave the lock alone.
        _undo_journal(store, state)
    else:
        _locked_cleanup(store, state)
    return f"cleaned up after a proxyvpn that was not running (pid {state.get('pid')})"
