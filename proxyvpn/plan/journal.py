"""Is a recorded journal one that proxyvpn's planner could have written? Pure, no I/O.

The journal (state.json) lives in a directory owned by the user who ran `up`, while
`down` replays its undo with CAP_NET_ADMIN, or as root under sudo. Anything in it may
therefore be forged, and `op_from_dict` alone would rebuild any op: `nft delete table inet
firewalld`, addresses on eth0, kernel.core_pattern. So before anything is undone every
recorded op is held against what `plan.build.build_plan` can produce (the ranges
`config.build_config` accepts), and one op that does not fit refuses the whole journal.

What is allowed, op by op (the undo is what runs, so the fields it uses are what matter):

* LoadNftTable: only our table, `inet proxyvpn`;
* LoadIptables: only our chains (PROXYVPN, PROXYVPN_POST) and the jumps to them, and
  only the tables those chains are in as tables we created;
* CreateTun, LinkUp, SetAddress, AddRoute: only on the recorded TUN (a valid interface
  name); routes only `default` and never in the kernel's tables;
* AddRule: fwmark, table and priority in the ranges `--capture-mark`, `--table` and
  `--rule-priority` accept (never table 0/253/254/255, never priority 0/32766/32767),
  and one table, mark and priority for the whole journal, as in a plan;
* SetSysctl: only the TUN's rp_filter and disable_ipv6, with the values the planner
  writes and a `previous` (what the undo writes back) the key can hold;
* nothing else: the Delete*/Del* ops are undos, never recorded.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from proxyvpn.plan import iptables, nft
from proxyvpn.plan.build import iface_sysctl
from proxyvpn.plan.ops import (
    AddRoute,
    AddRule,
    CreateTun,
    LinkUp,
    LoadIptables,
    LoadNftTable,
    Op,
    SetAddress,
    SetSysctl,
    op_from_dict,
)

KERNEL_TABLES = frozenset({0, 253, 254, 255})
"""unspec, default, main, local: never ours (config refuses them as --table)."""
KERNEL_PRIORITIES = frozenset({0, 32766, 32767})
"""The kernel's own rules (local, main, default)."""

TABLE_RANGE = range(1, 0xFFFFFFFF)
"""--table: 1 .. 2**32-2 (config.build_config)."""
PRIORITY_RANGE = range(1, 32766)
"""--rule-priority: 1 .. 32765, below main's 32766 (config.build_config)."""
MARK_RANGE = range(1, 0x100000000)
"""--capture-mark: 1 .. 2**32-1 (config.build_config)."""
MTU_RANGE = range(1280, 65536)
"""--mtu (config.build_config)."""

OWN_CHAINS = frozenset({f"mangle/{iptables.CHAIN}", f"mangle/{iptables.POST_CHAIN}",
                        f"filter/{iptables.CHAIN}"})
"""Every chain plan.iptables.build_families can create, as "table/chain"."""
OWN_JUMPS = frozenset({f"mangle/OUTPUT/{iptables.CHAIN}",
                       f"mangle/POSTROUTING/{iptables.POST_CHAIN}",
                       f"filter/OUTPUT/{iptables.CHAIN}"})
"""Every jump to them, as "table/builtin/target"."""

# Per-interface sysctl leaf -> (value the planner writes, values `previous` may hold).
# rp_filter is 0/1/2 and disable_ipv6 0/1: the undo writes `previous` back as root, so it
# must be one of those small integers and nothing else.
_SYSCTLS: dict[tuple[str, str], tuple[str, frozenset[str]]] = {
    ("net.ipv4.conf", "rp_filter"): ("2", frozenset({"0", "1", "2"})),
    ("net.ipv6.conf", "disable_ipv6"): ("0", frozenset({"0", "1"})),
}

# The planner's rule (plan/build.py _SAFE_NAME) and the kernel's (config._check_tun_name:
# at most 15 characters, no "/", ":", whitespace; "+" and "*" are wildcards in iptables
# and nft): a name that passes both cannot address anything but one interface.
_IFNAME = re.compile(r"[A-Za-z0-9_.@=-]{1,15}")


def valid_ifname(name: object) -> bool:
    """A name `up` accepts for its TUN (and so the only kind a journal may hold)."""
    return isinstance(name, str) and bool(_IFNAME.fullmatch(name)) and name not in (".", "..")


def _show(value: object) -> str:
    """A recorded value for an error message: repr (no control characters reach the
    terminal) and short (a forged field may be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: object, allowed: range) -> bool:
    # bool is an int in Python, and JSON true would otherwise pass as 1.
    return isinstance(value, int) and not isinstance(value, bool) and value in allowed


def _str_items(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def _check_nft(op: LoadNftTable, tun: str | None) -> str | None:
    if (op.family, op.name) != (nft.FAMILY, nft.TABLE):
        return f"table {_show(op.family)} {_show(op.name)} is not {nft.FAMILY} {nft.TABLE}"
    return None


def _check_iptables(op: LoadIptables, tun: str | None) -> str | None:
    if reason := _check_family(op.family):
        return reason
    if not (_str_items(op.chains) and _str_items(op.jumps) and _str_items(op.new_tables)):
        return "chains, jumps and new tables must be lists of names"
    if not op.chains or not set(op.chains) <= OWN_CHAINS:
        return f"chains {_show(sorted(set(op.chains) - OWN_CHAINS))} are not proxyvpn's"
    if not set(op.jumps) <= OWN_JUMPS:
        return f"jumps {_show(sorted(set(op.jumps) - OWN_JUMPS))} are not proxyvpn's"
    # The planner only claims a table it put one of its chains in (plan/build.py).
    ours = {c.split("/", 1)[0] for c in op.chains}
    if not set(op.new_tables) <= ours:
        return f"tables {_show(sorted(set(op.new_tables) - ours))} were not created for it"
    return None


def _check_dev(dev: object, tun: str | None) -> str | None:
    if tun is None:
        return "no TUN is recorded"
    if dev != tun:
        return f"device {_show(dev)} is not the TUN {_show(tun)}"
    return None


def _check_tun(op: CreateTun, tun: str | None) -> str | None:
    if not _is_int(op.mtu, MTU_RANGE) or not isinstance(op.offload, bool):
        return "mtu or offload out of range"
    return _check_dev(op.name, tun)


def _check_link_up(op: LinkUp, tun: str | None) -> str | None:
    return _check_dev(op.dev, tun)


def _check_address(op: SetAddress, tun: str | None) -> str | None:
    try:
        ipaddress.ip_interface(op.cidr if isinstance(op.cidr, str) else "")
    except ValueError:
        return f"address {_show(op.cidr)} is not address/prefix"
    return _check_dev(op.dev, tun)


def _check_sysctl(op: SetSysctl, tun: str | None) -> str | None:
    if tun is None:
        return "no TUN is recorded"
    for (prefix, leaf), (value, previous) in _SYSCTLS.items():
        if op.key == iface_sysctl(prefix, tun, leaf):
            restores = op.previous is None or (isinstance(op.previous, str)
                                               and op.previous in previous)
            if op.value != value or not restores:
                return (f"{op.key} = {_show(op.value)} (previous {_show(op.previous)}) is not "
                        "a value proxyvpn sets or restores")
            return None
    return f"sysctl {_show(op.key)} is not one proxyvpn sets"


def _check_table(table: object) -> str | None:
    if not _is_int(table, TABLE_RANGE) or table in KERNEL_TABLES:
        return f"routing table {_show(table)} is not one proxyvpn may use"
    return None


def _check_family(family: object) -> str | None:
    if family not in (4, 6) or isinstance(family, bool):
        return f"family {_show(family)} is not 4 or 6"
    return None


def _check_route(op: AddRoute, tun: str | None) -> str | None:
    if reason := _check_family(op.family):
        return reason
    if op.dst != "default":
        return f"route {_show(op.dst)} is not the default route"
    return _check_table(op.table) or _check_dev(op.dev, tun)


def _check_rule(op: AddRule, tun: str | None) -> str | None:
    if reason := _check_family(op.family):
        return reason
    if not _is_int(op.fwmark, MARK_RANGE):
        return f"fwmark {_show(op.fwmark)} is not one proxyvpn may use"
    if not _is_int(op.priority, PRIORITY_RANGE) or op.priority in KERNEL_PRIORITIES:
        return f"rule priority {_show(op.priority)} is not one proxyvpn may use"
    return _check_table(op.table)


_CHECKS: dict[type[Op], Callable[[Any, str | None], str | None]] = {
    LoadNftTable: _check_nft,
    LoadIptables: _check_iptables,
    CreateTun: _check_tun,
    LinkUp: _check_link_up,
    SetAddress: _check_address,
    SetSysctl: _check_sysctl,
    AddRoute: _check_route,
    AddRule: _check_rule,
}
"""The op kinds build_plan produces, and the check for each."""


def check_op(op: Op, tun: str | None) -> str | None:
    """Why `op` is not one the planner produces for TUN `tun`, or None when it is."""
    check = _CHECKS.get(type(op))
    if check is None:
        return f"{type(op).__name__} is never recorded by `proxyvpn up`"
    return check(op, tun)


def acts_on_tun(op: Op) -> bool:
    """Whether undoing `op` acts on the TUN link itself (deletes it, or changes its
    addresses or per-interface sysctls) rather than on tables, rules or routes."""
    return isinstance(op, (CreateTun, LinkUp, SetAddress, SetSysctl))


def journal_tun_name(applied: object, recorded: object) -> object:
    """The TUN name a raw journal's ops are checked against (:func:`journal_ops`):
    state["tun"], else the name in its CreateTun. Unvalidated: for a check that has to
    look at the link before anything is undone."""
    if recorded is not None or not isinstance(applied, (list, tuple)):
        return recorded
    return next((op.get("name") for op in applied
                 if isinstance(op, dict) and op.get("kind") == "CreateTun"), None)


def _valid_tun(name: object) -> str | None:
    """The journal's TUN name (journal_tun_name) if it is a valid one; else ValueError."""
    if name is not None and not valid_ifname(name):
        raise ValueError(f"the recorded TUN {_show(name)} is not a valid interface name")
    return name if isinstance(name, str) else None


def _check_consistent(ops: tuple[Op, ...]) -> None:
    """One plan has one routing table, one capture mark and one rule priority (all
    families share them): a journal mixing several was not written by one `up`."""
    tables = {op.table for op in ops if isinstance(op, (AddRoute, AddRule))}
    if len(tables) > 1:
        raise ValueError(f"routes and rules use several tables {_show(sorted(tables))}")
    rules = {(op.fwmark, op.priority) for op in ops if isinstance(op, AddRule)}
    if len(rules) > 1:
        raise ValueError("the ip rules use several fwmarks or priorities")


def journal_ops(applied: object, recorded_tun: object = None) -> tuple[Op, ...]:
    """The ops of a journal (state["applied"]) if every one of them is one proxyvpn's
    planner could have produced for the recorded TUN (state["tun"]); else ValueError
    naming the first that is not (in words fit for the user: no field is secret, and
    recorded values are shown short and escaped)."""
    if not isinstance(applied, (list, tuple)):
        raise ValueError("the list of applied operations is missing or not a list")
    ops: list[Op] = []
    for number, data in enumerate(applied, 1):
        if not isinstance(data, dict):
            raise ValueError(f"operation {number} is not an object")
        try:
            ops.append(op_from_dict(data))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"operation {number}: {str(exc)[:80]}") from None
    result = tuple(ops)
    tun = _valid_tun(journal_tun_name(applied, recorded_tun))
    for number, op in enumerate(result, 1):
        reason = check_op(op, tun)
        if reason is not None:
            raise ValueError(f"operation {number} ({type(op).__name__}) is not one proxyvpn "
                             f"makes: {reason}")
    _check_consistent(result)
    return result
