"""Applying a plan: a write-ahead journal, one `[#]` log line per op, rollback on failure.

Before each operation runs it is appended to state.json (written atomically), so a crash
at any point leaves a journal that covers every change; undo is idempotent ("already
gone" counts as success), so recording an op that then never ran costs nothing.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from proxyvpn.errors import ApplyError, UntrustedStateError
from proxyvpn.plan.build import Plan
from proxyvpn.plan.journal import acts_on_tun, journal_ops
from proxyvpn.plan.ops import (
    AddRoute,
    AddRule,
    CreateTun,
    DelAddress,
    DeleteIptables,
    DeleteLink,
    DeleteNftTable,
    DelRoute,
    DelRule,
    LinkUp,
    LoadIptables,
    LoadNftTable,
    Op,
    SetAddress,
    SetSysctl,
)
from proxyvpn.system import iptables, nft
from proxyvpn.system.netlink import Netlink
from proxyvpn.system.state import STATE_VERSION, StateDir
from proxyvpn.system.sysctl import write_sysctl
from proxyvpn.system.tun import TunHandle, open_tun

log = logging.getLogger("proxyvpn.system")

GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})
"""Errors that mean "what we wanted to remove is already gone": success for an undo."""

PREEXISTING_ERRNOS = frozenset({errno.EEXIST, errno.EBUSY})
"""Errors that mean "it existed before we tried": the failed op changed nothing, and
undoing it would destroy something that is not ours."""


class _Executor:
    """Runs ops against the kernel; owns the netlink socket and the TUN handles it opened."""

    def __init__(self) -> None:
        self._nl: Netlink | None = None
        self.tuns: dict[str, TunHandle] = {}
        self._handlers: dict[type[Op], Callable[[Any], None]] = {
            LoadNftTable: self._load_nft,
            DeleteNftTable: self._delete_nft,
            LoadIptables: lambda op: iptables.load(op.family, op.text, op.chains, op.jumps),
            DeleteIptables: self._delete_iptables,
            CreateTun: self._create_tun,
            DeleteLink: self._delete_link,
            LinkUp: lambda op: self.nl.link_up(op.dev),
            SetAddress: lambda op: self.nl.add_address(op.dev, op.cidr),
            DelAddress: lambda op: self.nl.del_address(op.dev, op.cidr),
            SetSysctl: lambda op: write_sysctl(op.key, op.value),
            AddRoute: lambda op: self.nl.add_route(op.family, op.table, op.dev, op.dst),
            DelRoute: lambda op: self.nl.del_route(op.family, op.table, op.dev, op.dst),
            AddRule: lambda op: self.nl.add_rule(op.family, op.fwmark, op.table, op.priority),
            DelRule: lambda op: self.nl.del_rule(op.family, op.fwmark, op.table, op.priority),
        }

    @property
    def nl(self) -> Netlink:
        if self._nl is None:
            self._nl = Netlink()
        return self._nl

    def run(self, op: Op) -> None:
        handler = self._handlers.get(type(op))
        if handler is None:
            raise TypeError(f"no handler for operation {type(op).__name__}")
        handler(op)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def _load_nft(self, op: LoadNftTable) -> None:
        try:
            if op.load_text:
                nft.load_text(op.text)
            else:
                nft.load(op.ruleset)
        except nft.NftError as exc:
            if exc.errno == errno.EEXIST:
                raise nft.NftError(errno.EEXIST, (
                    f"table {op.family} {op.name} already exists: another proxyvpn is running "
                    f"or one died without `proxyvpn down` (remove it with "
                    f"`nft delete table {op.family} {op.name}`)")) from exc
            raise
        chains = [c["add"]["chain"]["name"] for c in op.ruleset
                  if "chain" in c.get("add", {})]
        nft.verify(op.family, op.name, chains)

    def _delete_nft(self, op: DeleteNftTable) -> None:
        if not nft.delete_table(op.family, op.name):
            raise nft.NftError(errno.ENOENT, f"table {op.family} {op.name} does not exist")

    def _delete_iptables(self, op: DeleteIptables) -> None:
        if not iptables.remove(op.family, op.chains, op.jumps, op.new_tables):
            raise iptables.IptablesError(errno.ENOENT, f"chains {', '.join(op.chains)} "
                                         "do not exist")

    def _create_tun(self, op: CreateTun) -> None:
        self.tuns[op.name] = open_tun(op.name, op.mtu, op.offload)

    def _delete_link(self, op: DeleteLink) -> None:
        handle = self.tuns.pop(op.name, None)
        if handle is not None:
            # Our TUN is not persistent: closing its fd is what deletes it.
            handle.close()
        self.nl.delete_link(op.name)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _undo(ops: Sequence[Op], executor: _Executor) -> list[str]:
    """Undo `ops` in reverse order, logging each; returns messages for real failures."""
    errors: list[str] = []
    for op in reversed(ops):
        undo = op.undo()
        if undo is None:
            continue
        log.info("[#] %s", undo.command())
        try:
            executor.run(undo)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                log.debug("already gone: %s (%s)", undo.summary(), _cause(exc))
                continue
            errors.append(f"{undo.summary()}: {_cause(exc)}")
            log.error("undo failed: %s: %s", undo.summary(), _cause(exc))
        except Exception as exc:  # keep going: one failure must not strand the rest
            errors.append(f"{undo.summary()}: {_cause(exc)}")
            log.error("undo failed: %s: %s", undo.summary(), _cause(exc))
    return errors


def undo_ops(op_dicts: object, recorded_tun: object = None, *,
             where: str = "the journal", spare_tun: bool = False) -> list[str]:
    """Undo recorded ops (state["applied"], for the TUN state["tun"]) in reverse.
    "Already gone" is success; real failures are returned as messages and do not stop
    the rest. With `spare_tun`, ops on the TUN link itself are skipped: the link of that
    name is not the one the journal's process made (see plan.journal.acts_on_tun).

    The journal's directory belongs to whoever ran `up` and this may run as root, so
    every op is first checked against what the planner can produce (plan.journal): if
    one is not, UntrustedStateError and nothing at all is undone.
    """
    try:
        ops = journal_ops(op_dicts, recorded_tun)
    except ValueError as exc:
        raise UntrustedStateError(where, str(exc)) from None
    if spare_tun:
        ops = tuple(op for op in ops if not acts_on_tun(op))
    executor = _Executor()
    try:
        return _undo(ops, executor)
    finally:
        executor.close()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Applied:
    """A plan in effect. Holds the TUN open (it lives as long as this object's fd)."""

    def __init__(self, ops: Sequence[Op], state: StateDir, executor: _Executor) -> None:
        self.ops = tuple(ops)
        """The operations applied, in order."""
        self.state = state
        """The state directory whose journal records them."""
        self._executor = executor
        self._torn_down = False

    @property
    def tun(self) -> TunHandle | None:
        """The TUN handle opened by the plan's CreateTun (None if the plan had none)."""
        return next(iter(self._executor.tuns.values()), None)

    def abandon(self) -> None:
        """Leave everything applied, as a crash would, except the TUN (it goes with its
        fd): the killswitch keeps blocking, the journal stays for `proxyvpn down` or the
        next `up`, and the lock is let go. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self._close()
        self.state.release()

    def _close(self) -> None:
        """Close the TUN (the kernel then deletes it) and the executor's sockets."""
        for handle in self._executor.tuns.values():
            handle.close()
        self._executor.tuns.clear()
        self._executor.close()

    def teardown(self) -> list[str]:
        """Undo everything in reverse order, then remove the journal (kept as
        state.last.json with keep_logs). Idempotent. Returns undo failures; with any, the
        journal stays in place for `proxyvpn down` to retry."""
        if self._torn_down:
            return []
        self._torn_down = True
        try:
            errors = _undo(self.ops, self._executor)
        finally:
            self._close()
        if errors:
            log.error("teardown incomplete (%d errors); the journal stays in %s: run "
                      "`proxyvpn down` to retry", len(errors), self.state.path)
            self.state.release()
        else:
            self.state.remove()
        return errors


def apply_plan(plan: Plan, state: StateDir, extra: dict[str, Any]) -> Applied:
    """Apply `plan` in order, journaling each op in `state` before running it.

    `extra` goes into the state file (proxy display URL, tun, killswitch...). On failure
    everything applied so far - including the failed op, unless it failed because its
    object already existed - is undone in reverse, the journal is removed, and ApplyError
    is raised (KeyboardInterrupt/SystemExit are re-raised after the rollback).
    """
    state.acquire()
    if plan.firewall in ("libnftables", "nft-binary"):
        nft.use(plan.firewall)
    doc: dict[str, Any] = {"version": STATE_VERSION, "pid": os.getpid(), "started": _now(),
                           "firewall": plan.firewall}
    for key, value in extra.items():
        # Never let a secret reach the disk, whatever a caller passes.
        if key in ("password", "credentials"):
            continue
        doc[key] = value.display() if hasattr(value, "display") else value
    doc["version"] = STATE_VERSION
    doc["applied"] = []
    executor = _Executor()
    done: list[Op] = []
    current: Op | None = None
    # One try around the whole loop: a signal (SIGTERM raises KeyboardInterrupt, see
    # app.run_up) may land between two ops as well as inside one.
    try:
        for op in plan.ops:
            current = op
            doc["applied"].append(op.to_dict())
            state.write(doc)
            log.info("[#] %s", op.command())
            executor.run(op)
            done.append(op)
            current = None
    except BaseException as exc:
        _rollback(current, exc, done, doc, state, executor)
        raise  # only reached for KeyboardInterrupt and friends
    # Do not hold a netlink socket (and pyroute2's private event loop) while the engine
    # runs its own asyncio loop; teardown opens a fresh one.
    executor.close()
    return Applied(done, state, executor)


def _rollback(op: Op | None, exc: BaseException, done: list[Op], doc: dict[str, Any],
              state: StateDir, executor: _Executor) -> None:
    """Undo `done` and `op` (the op that was being applied; None between two ops)."""
    # A second Ctrl+C / SIGTERM must not cut the rollback short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    preexisting = isinstance(exc, OSError) and exc.errno in PREEXISTING_ERRNOS
    to_undo = done if preexisting or op is None else [*done, op]
    what = op.summary() if op is not None else "between two operations"
    log.error("failed: %s: %s; rolling back %d operation(s)", what, _cause(exc),
              len(to_undo))
    try:
        errors = _undo(to_undo, executor)
    finally:
        for handle in executor.tuns.values():
            handle.close()
        executor.tuns.clear()
        executor.close()
    cause = _cause(exc)
    if errors:
        doc["applied"] = [o.to_dict() for o in to_undo]
        state.write(doc)
        state.release()
        cause += f"; rollback incomplete ({'; '.join(errors)}): run `proxyvpn down`"
    else:
        state.remove()
    if isinstance(exc, Exception):
        error = ApplyError(op if op is not None else "the state file", cause)
        # The nft op's command is the whole ruleset; the message names it briefly.
        error.args = (f"failed to apply `{what}`: {cause}",)
        raise error from exc
