"""Least privilege at run time: CAP_NET_ADMIN, and nothing else.

proxyvpn gets CAP_NET_ADMIN in one of two ways:

* the installed launcher (native/launcher.c, file capability cap_net_admin=eip) started
  us as an ordinary user: effective, permitted, inheritable and ambient sets already hold
  CAP_NET_ADMIN only, and no_new_privs is set;
* root started us (`sudo proxyvpn up`, a service with User=root): we hold everything.

`drop_to_net_admin()` brings both to the same place before `up` changes anything:
effective = permitted = inheritable = ambient = {CAP_NET_ADMIN}, the bounding set
reduced to CAP_NET_ADMIN when we may change it (CAP_SETPCAP, i.e. root), and
no_new_privs set so that no child can gain privileges by executing a set-user-ID or
file-capability program. CAP_NET_ADMIN stays ambient so that the nft/iptables/ip
programs the fallbacks run inherit it (they carry no file capabilities).

As root, files are still ours by DAC ownership: creating /run/proxyvpn (root-owned /run)
needs no capability. What root loses is CAP_DAC_OVERRIDE: a --state-dir owned by
another user with mode 0700 becomes unusable to `up` (`down` does not drop privileges).

python-prctl (imported as prctl) provides the prctl(2) calls it knows; capset(2) and the
ambient set, which it does not cover (or not atomically), go through libc with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import shlex
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import prctl

from proxyvpn.errors import PrivilegeError
from proxyvpn.logs import redact_url_passwords

log = logging.getLogger("proxyvpn.privileges")

CAP_NET_ADMIN = 12
"""capability(7) number of CAP_NET_ADMIN."""
NET_ADMIN = 1 << CAP_NET_ADMIN
"""CAP_NET_ADMIN as a capability mask: 0x1000."""
CAP_SETPCAP = 8

LAUNCHER_ENV = "PROXYVPN_LAUNCHER"
"""Set by the launcher to its installed path (never passed through from the caller)."""
SECRET_ENV = ("PROXYVPN_PASSWORD", "PROXYVPN_PROXY_URL")
"""The documented secret channels: read once by the CLI, then removed (scrub_environ)."""

# prctl(2) / capset(2) constants not all exposed by python-prctl.
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_IS_SET = 1
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class CapState:
    """The capability sets of one thread, as /proc/<pid>/status shows them."""

    inheritable: int
    """CapInh mask."""
    permitted: int
    """CapPrm mask."""
    effective: int
    """CapEff mask."""
    bounding: int
    """CapBnd mask."""
    ambient: int
    """CapAmb mask."""
    no_new_privs: bool
    """NoNewPrivs: 1."""

    @property
    def net_admin_only(self) -> bool:
        """Effective, permitted, inheritable and ambient are exactly {CAP_NET_ADMIN}."""
        return (self.effective == self.permitted == self.inheritable == self.ambient
                == NET_ADMIN)

    @property
    def has_net_admin(self) -> bool:
        """CAP_NET_ADMIN is effective."""
        return bool(self.effective & NET_ADMIN)


def parse_status(text: str) -> CapState:
    """The capability lines of a /proc/<pid>/status text (pure; ValueError if absent)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
            fields[key] = value.strip()
    missing = {"CapInh", "CapPrm", "CapEff", "CapBnd"} - fields.keys()
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))} in status text")
    return CapState(
        inheritable=int(fields["CapInh"], 16),
        permitted=int(fields["CapPrm"], 16),
        effective=int(fields["CapEff"], 16),
        bounding=int(fields["CapBnd"], 16),
        ambient=int(fields.get("CapAmb", "0"), 16),
        no_new_privs=fields.get("NoNewPrivs", "0") == "1",
    )


def read_caps(pid: int | str = "self", tid: int | None = None) -> CapState:
    """The capability sets of a process (its main thread) or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    with open(path) as fh:
        return parse_status(fh.read())


def format_caps(mask: int) -> str:
    """`cap_net_admin,cap_net_raw` style names for a mask (numbers for unknown bits)."""
    names = {getattr(prctl, n): n.lower() for n in dir(prctl)
             if n.startswith("CAP_") and n not in ("CAP_LAST_CAP", "CAP_EFFECTIVE",
                                                   "CAP_PERMITTED", "CAP_INHERITABLE")}
    out = [names.get(bit, f"cap_{bit}") for bit in range(64) if mask >> bit & 1]
    return ",".join(out) or "none"


# ---------------------------------------------------------------- messages


def launcher_path() -> str | None:
    """The installed launcher (what `setcap` must be applied to), when we know it.

    The launcher tells us its path in PROXYVPN_LAUNCHER; otherwise a `proxyvpn` on PATH
    that is a compiled program (not the pip-generated Python script, on which a file
    capability would be ignored) is taken.
    """
    path = os.environ.get(LAUNCHER_ENV)
    if path and os.path.isabs(path):
        return path
    found = shutil.which("proxyvpn")
    if found:
        try:
            with open(found, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return os.path.realpath(found)
        except OSError:
            pass
    return None


def missing_cap_message(path: str | None = None) -> str:
    """The one line that tells the user how to get CAP_NET_ADMIN."""
    target = path or launcher_path() or "/path/to/proxyvpn"
    return (f"CAP_NET_ADMIN is missing: run `sudo setcap cap_net_admin=eip {target}` "
            "or use sudo")


def ensure_net_admin() -> None:
    """PrivilegeError (one line, with the setcap command) unless CAP_NET_ADMIN is effective."""
    if not read_caps().has_net_admin:
        raise PrivilegeError(missing_cap_message())


# ---------------------------------------------------------------- the drop


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(rc: int, what: str) -> int:
    if rc == -1:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(err)}")
    return rc


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    lib = _lib()
    return lib.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                     ctypes.c_ulong(0), ctypes.c_ulong(0))


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of the calling thread, all three sets in one call (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_lib().capset(ctypes.byref(header), data), "capset")


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return prctl.CAP_LAST_CAP


def drop_to_net_admin() -> CapState:
    """Keep CAP_NET_ADMIN and nothing else; returns the resulting state.

    Call it before starting threads: capabilities belong to threads, and new threads
    inherit the creator's. Every thread is verified afterwards; PrivilegeError if one
    still holds more, or if CAP_NET_ADMIN was missing to begin with.
    """
    before = read_caps()
    if not before.permitted & NET_ADMIN:
        raise PrivilegeError(missing_cap_message())
    # 1. The bounding set (needs CAP_SETPCAP, so only for root): afterwards not even a
    #    set-user-ID-root program run by a child can bring another capability back.
    if before.effective & (1 << CAP_SETPCAP):
        for cap in range(last_cap() + 1):
            if cap != CAP_NET_ADMIN and _prctl(_PR_CAPBSET_READ, cap) == 1:
                _check(_prctl(_PR_CAPBSET_DROP, cap), f"dropping capability {cap} from the bounding set")
    # 2. As root, exec() grants the whole (now reduced) bounding set anyway; for ordinary
    #    users pI/pA decide what children get. Inheritable first, so ambient can be raised.
    _capset(NET_ADMIN, NET_ADMIN, NET_ADMIN)
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL), "clearing ambient capabilities")
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN),
           "raising CAP_NET_ADMIN into the ambient set")
    # 3. No child gains privileges by exec any more (see native/launcher.c).
    prctl.set_no_new_privs(1)
    state = verify_net_admin_only()
    if before.effective & (1 << CAP_SETPCAP) and state.bounding != NET_ADMIN:
        raise PrivilegeError(f"the bounding set still holds {format_caps(state.bounding & ~NET_ADMIN)}")
    return state


def verify_net_admin_only() -> CapState:
    """Every thread of this process holds CAP_NET_ADMIN and nothing else."""
    state = read_caps()
    for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
        thread = read_caps("self", tid)
        if not thread.net_admin_only:
            raise PrivilegeError(
                f"thread {tid} holds capabilities {format_caps(thread.permitted | thread.ambient)}, "
                "not only cap_net_admin (drop_to_net_admin must run before threads start)")
    return state


# ---------------------------------------------------------------- process hygiene


_SECRET_OPTIONS = ("--password",)
"""Options whose value is a secret (their `--opt=value` form too)."""


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv with secret option values and URL passwords replaced by *** (pure)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name in _SECRET_OPTIONS:
            if eq:
                out.append(f"{name}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_url_passwords(arg))
    return out


def set_process_name(name: str = "proxyvpn", *, title: str | None = None) -> None:
    """Name the process `name` in /proc/PID/comm (top, ps -o comm, pkill -x).

    With `title`, also rewrite the command line shown in /proc/PID/cmdline (ps -f): this
    removes a secret that was typed as an argument (--password, a URL with a password)
    from the process list from then on. It was visible until now: prefer
    --password-file or PROXYVPN_PASSWORD.
    """
    prctl.set_name(name[:15])
    if title is not None:
        prctl.set_proctitle(title)


def harden_process(*, limit_core: bool = True) -> None:
    """Keep the password in our memory away from other processes of the same user.

    Started through the launcher, proxyvpn is an ordinary process of the user who ran
    it: anything else running as that user could make it dump core (kill -SEGV) and
    read the password from the core file. Not dumpable, the kernel writes no core, and
    ptrace, /proc/PID/mem and /proc/PID/environ need CAP_SYS_PTRACE. Our /proc/self
    files then belong to root: reading the 0444 ones (status, cgroup, mounts) and our own
    /proc/self/fd still works, and nothing in proxyvpn writes to /proc/self.

    execve() makes a program dumpable again, so children (nft, the command of `proxyvpn
    exec`) are unaffected. RLIMIT_CORE 0, soft and hard, is the second lock: a change
    of credentials would reset dumpability to fs.suid_dumpable, and core handlers such as
    systemd-coredump honour the limit. Children inherit the limit, which is why `exec`,
    whose command is the user's own, passes limit_core=False.
    """
    prctl.set_dumpable(False)
    if limit_core:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def scrub_environ() -> None:
    """Forget PROXYVPN_PASSWORD / PROXYVPN_PROXY_URL after the configuration was read, so
    that no child process (nft, ip, iptables) inherits them."""
    for key in SECRET_ENV:
        os.environ.pop(key, None)


def drop_all() -> CapState:
    """Give up every capability before `proxyvpn exec` runs the user's command: the
    launcher handed CAP_NET_ADMIN on (ambient, so it would survive exec), and an app or
    shell must never hold it. Root (`sudo proxyvpn exec`) stays root: that was asked for."""
    if os.getuid() == 0:
        return read_caps()
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL), "clearing ambient capabilities")
    _capset(0, 0, 0)
    state = read_caps()
    if state.permitted or state.ambient or state.effective:
        raise PrivilegeError(f"could not drop capabilities {format_caps(state.permitted)}")
    return state


def child_preexec() -> None:
    """preexec_fn for subprocesses: they get SIGTERM if proxyvpn dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so start
    long-lived children from the main thread (short ones like nft are fine anywhere).
    """
    prctl.set_pdeathsig(signal.SIGTERM)


def confine_up(argv: Sequence[str]) -> CapState:
    """Everything `up` does about privileges, before it changes anything.

    Call it once, from the main thread, before any thread starts and after the
    configuration (and so the password) was read:

    1. CAP_NET_ADMIN must be effective, else PrivilegeError with the setcap line;
    2. drop_to_net_admin(): nothing but CAP_NET_ADMIN from here on (bounding set too,
       when root); it stays ambient because the only programs `up` runs are the
       nft/iptables fallbacks, which need it (pass child_preexec as their preexec_fn);
    3. the secret environment variables are forgotten, so no child inherits them;
    4. the process is named `proxyvpn` (comm) and its command line shown as `argv`
       with secrets redacted (a --password typed as an argument disappears from ps).
    """
    ensure_net_admin()
    state = drop_to_net_admin()
    scrub_environ()
    set_process_name("proxyvpn", title=shlex.join(["proxyvpn", *redact_argv(argv)]))
    log.debug("%s", describe())
    return state


def describe() -> str:
    """One line for --verbose logs: what we hold."""
    state = read_caps()
    return (f"capabilities: effective={format_caps(state.effective)} "
            f"ambient={format_caps(state.ambient)} no_new_privs={int(state.no_new_privs)}")
