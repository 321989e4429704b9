"""Operations: the unit of change. Each is a frozen, serialisable value that knows its
equivalent shell command (for --dry-run and the `[#]` log) and its undo.

Ops are pure data: nothing here touches the system. `proxyvpn.system.apply` executes them.
The state file records them with `to_dict()` and `down` rebuilds them with `op_from_dict()`,
so every field must survive a JSON round trip unchanged (no tuples inside dicts).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Any

from proxyvpn.plan.iptables import delete_text

OP_KINDS: dict[str, type[Op]] = {}
"""kind name -> Op class, filled by `_register`; op_from_dict looks kinds up here."""


def _register(cls: type[Op]) -> type[Op]:
    OP_KINDS[cls.__name__] = cls
    return cls


def _ip(family: int) -> str:
    """`ip` or `ip -6`: the prefix of an iproute2 command for the family."""
    return "ip -6" if family == 6 else "ip"


def _q(word: str) -> str:
    return shlex.quote(word)


@dataclass(frozen=True)
class Op:
    """Base class of all operations."""

    def command(self) -> str:
        """The equivalent shell command (what --dry-run prints and apply logs)."""
        raise NotImplementedError

    def summary(self) -> str:
        """A one-line description for error messages (the command unless it is long)."""
        return self.command()

    def undo(self) -> Op | None:
        """The operation that reverses this one, or None when nothing needs undoing."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with a "kind" field; inverse of `op_from_dict`."""
        out: dict[str, Any] = {"kind": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def op_from_dict(data: dict[str, Any]) -> Op:
    """Rebuild an op from `Op.to_dict()` output (state file, --json). ValueError if unknown."""
    kind = data.get("kind")
    cls = OP_KINDS.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown operation kind {kind!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"operation {kind} lacks field {f.name!r}")
            continue
        value = data[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


# ---------------------------------------------------------------- nftables


@_register
@dataclass(frozen=True)
class LoadNftTable(Op):
    """Load our whole nftables table in one atomic batch (marking + killswitch)."""

    family: str = "inet"
    """nftables family of the table; "inet" covers IPv4 and IPv6 in one table."""
    name: str = "proxyvpn"
    """Table name; we own everything inside it and delete it as a whole."""
    ruleset: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    """libnftables JSON commands (the items of {"nftables": [...]}), applied as one batch."""
    text: str = ""
    """The same ruleset in nft syntax, for the dry run and the log."""
    load_text: bool = False
    """Load `text` rather than the JSON: set when the ruleset has `socket cgroupv2`
    matches, which libnftables 1.0.x's JSON parser does not know."""

    def command(self) -> str:
        return f"nft -f - <<'EOF'\n{self.text.rstrip()}\nEOF"

    def summary(self) -> str:
        return f"nft -f - (table {self.family} {self.name}, {len(self.ruleset)} commands)"

    def undo(self) -> Op:
        return DeleteNftTable(self.family, self.name)


@_register
@dataclass(frozen=True)
class DeleteNftTable(Op):
    """Delete our nftables table and everything in it."""

    family: str = "inet"
    """nftables family of the table."""
    name: str = "proxyvpn"
    """Table name."""

    def command(self) -> str:
        return f"nft delete table {self.family} {_q(self.name)}"


# ---------------------------------------------------------------- iptables


def _ipt_restore(family: int) -> str:
    return "ip6tables-restore" if family == 6 else "iptables-restore"


@_register
@dataclass(frozen=True)
class LoadIptables(Op):
    """Create our iptables (or ip6tables) chains and the jumps to them in one
    `iptables-restore --noflush` transaction (the iptables firewall backend)."""

    family: int
    """4 (iptables) or 6 (ip6tables)."""
    chains: tuple[str, ...]
    """Our chains, "table/chain"; the undo flushes and deletes exactly these."""
    jumps: tuple[str, ...]
    """Jumps we insert, "table/builtin/target"; the undo deletes exactly these."""
    text: str = ""
    """The iptables-restore --noflush document (what is loaded, and what --dry-run shows)."""
    new_tables: tuple[str, ...] = ()
    """Tables that did not exist before (iptables-nft creates them on first use); the
    undo removes them again when nothing but empty built-in chains is left in them."""

    def command(self) -> str:
        return f"{_ipt_restore(self.family)} --noflush <<'EOF'\n{self.text.rstrip()}\nEOF"

    def summary(self) -> str:
        return (f"{_ipt_restore(self.family)} --noflush (chains "
                f"{', '.join(self.chains)})")

    def undo(self) -> Op:
        return DeleteIptables(self.family, self.chains, self.jumps, self.new_tables)


@_register
@dataclass(frozen=True)
class DeleteIptables(Op):
    """Remove our jumps and chains (whichever are still there) in one transaction."""

    family: int
    """4 or 6."""
    chains: tuple[str, ...]
    """Our chains, "table/chain"."""
    jumps: tuple[str, ...]
    """Our jumps, "table/builtin/target"."""
    new_tables: tuple[str, ...] = ()
    """Tables we created; removed when left holding only empty built-in chains."""

    def command(self) -> str:
        text = delete_text(self.chains, self.jumps).rstrip()
        return f"{_ipt_restore(self.family)} --noflush <<'EOF'\n{text}\nEOF"

    def summary(self) -> str:
        return (f"{_ipt_restore(self.family)} --noflush (delete chains "
                f"{', '.join(self.chains)})")


# ---------------------------------------------------------------- links


@_register
@dataclass(frozen=True)
class CreateTun(Op):
    """Create the TUN device (IFF_TUN|IFF_NO_PI) and set its MTU.

    The device is not persistent: it exists as long as proxyvpn holds its file descriptor,
    so a crash removes it (and every address and route on it) by itself.
    """

    name: str
    """Interface name (at most 15 characters)."""
    mtu: int
    """MTU; large values let the kernel hand us big segments (fewer syscalls per byte)."""
    offload: bool = True
    """IFF_VNET_HDR + TSO/checksum offload: 64 KiB segments both ways (system/tun.py)."""

    def command(self) -> str:
        vnet = " vnet_hdr" if self.offload else ""
        return (f"ip tuntap add dev {_q(self.name)} mode tun{vnet} && "
                f"ip link set dev {_q(self.name)} mtu {self.mtu} txqueuelen 10000")

    def undo(self) -> Op:
        return DeleteLink(self.name)


@_register
@dataclass(frozen=True)
class DeleteLink(Op):
    """Delete a network interface (ours: the TUN)."""

    name: str
    """Interface name."""

    def command(self) -> str:
        return f"ip link delete dev {_q(self.name)}"


@_register
@dataclass(frozen=True)
class LinkUp(Op):
    """Bring an interface up. No undo: the link is ours and is deleted on teardown."""

    dev: str
    """Interface name."""

    def command(self) -> str:
        return f"ip link set dev {_q(self.dev)} up"


# ---------------------------------------------------------------- addresses


def _family_of(cidr: str) -> int:
    return ipaddress.ip_interface(cidr).version


@_register
@dataclass(frozen=True)
class SetAddress(Op):
    """Add an address to an interface (IPv6 without duplicate address detection)."""

    dev: str
    """Interface name."""
    cidr: str
    """address/prefix, e.g. 10.255.255.1/30 or fd70:7076::1/126."""

    def command(self) -> str:
        family = _family_of(self.cidr)
        # nodad: the TUN has no neighbours; DAD would only delay the address by ~1 s.
        suffix = " nodad" if family == 6 else ""
        return f"{_ip(family)} address add {self.cidr} dev {_q(self.dev)}{suffix}"

    def undo(self) -> Op:
        return DelAddress(self.dev, self.cidr)


@_register
@dataclass(frozen=True)
class DelAddress(Op):
    """Remove an address from an interface."""

    dev: str
    """Interface name."""
    cidr: str
    """address/prefix as it was added."""

    def command(self) -> str:
        return f"{_ip(_family_of(self.cidr))} address del {self.cidr} dev {_q(self.dev)}"


# ---------------------------------------------------------------- sysctls


@_register
@dataclass(frozen=True)
class SetSysctl(Op):
    """Write a sysctl (dotted name, sysctl(8) style), remembering the value it replaces."""

    key: str
    """Dotted key, e.g. net.ipv4.conf.tun0.rp_filter (dots inside an interface name are
    written as "/", as sysctl(8) does)."""
    value: str
    """Value to write."""
    previous: str | None = None
    """Value before the change (restored by the undo); None: nothing to restore."""

    def command(self) -> str:
        return f"sysctl -w {_q(f'{self.key}={self.value}')}"

    def undo(self) -> Op | None:
        if self.previous is None or self.previous == self.value:
            return None
        return SetSysctl(self.key, self.previous)


# ---------------------------------------------------------------- routes and rules


@_register
@dataclass(frozen=True)
class AddRoute(Op):
    """Add a device route to a routing table (ours: default dev TUN table T)."""

    family: int
    """4 or 6."""
    table: int
    """Routing table id."""
    dev: str
    """Output interface."""
    dst: str = "default"
    """Destination prefix, or "default"."""

    def command(self) -> str:
        return f"{_ip(self.family)} route add {self.dst} dev {_q(self.dev)} table {self.table}"

    def undo(self) -> Op:
        return DelRoute(self.family, self.table, self.dev, self.dst)


@_register
@dataclass(frozen=True)
class DelRoute(Op):
    """Delete a device route from a routing table."""

    family: int
    """4 or 6."""
    table: int
    """Routing table id."""
    dev: str
    """Output interface."""
    dst: str = "default"
    """Destination prefix, or "default"."""

    def command(self) -> str:
        return f"{_ip(self.family)} route del {self.dst} dev {_q(self.dev)} table {self.table}"


@_register
@dataclass(frozen=True)
class AddRule(Op):
    """Add a policy routing rule: packets carrying `fwmark` look up `table`."""

    family: int
    """4 or 6."""
    fwmark: int
    """Firewall mark to match (exact, mask 0xffffffff)."""
    table: int
    """Routing table to look up."""
    priority: int
    """Rule priority (lower is consulted first; must be below main's 32766)."""

    def command(self) -> str:
        return (f"{_ip(self.family)} rule add fwmark {self.fwmark:#x} lookup {self.table} "
                f"priority {self.priority}")

    def undo(self) -> Op:
        return DelRule(self.family, self.fwmark, self.table, self.priority)


@_register
@dataclass(frozen=True)
class DelRule(Op):
    """Delete a policy routing rule matching all of fwmark, table and priority."""

    family: int
    """4 or 6."""
    fwmark: int
    """Firewall mark of the rule."""
    table: int
    """Table of the rule."""
    priority: int
    """Priority of the rule."""

    def command(self) -> str:
        return (f"{_ip(self.family)} rule del fwmark {self.fwmark:#x} lookup {self.table} "
                f"priority {self.priority}")
