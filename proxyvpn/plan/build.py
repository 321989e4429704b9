"""The planner: configuration + host facts -> an ordered tuple of operations. Pure.

Order matters and is chosen to fail closed: the nftables table (with the killswitch) comes
first, so that nothing is ever captured or routed while traffic could still leak; the
policy rules come last, so that no packet is sent to the table before the TUN, its
addresses and its route exist. Undo runs in reverse: rules go first, the killswitch last.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from proxyvpn.config import Config
from proxyvpn.errors import ConfigError
from proxyvpn.plan import iptables, nft
from proxyvpn.plan.facts import HostFacts
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
)
from proxyvpn.plan.selection import (
    CgroupTracker,
    ResolvedSelection,
    nft_cgroup_ref,
    nft_safe_path,
    resolve_selection,
)

log = logging.getLogger("proxyvpn.plan")


@dataclass(frozen=True)
class Plan:
    """What `up` will do, as data: applied by proxyvpn.system.apply, printed by --dry-run."""

    ops: tuple[Op, ...]
    """Operations in application order."""
    dns_bypass: tuple[str, ...]
    """Resolvers reachable directly (UDP and TCP port 53) even with the killswitch on."""
    proxy_ips: tuple[str, ...]
    """Proxy addresses, in the order the relay should try them."""
    warnings: tuple[str, ...] = ()
    """Advice for the user (printed, never fatal)."""
    firewall: str = "libnftables"
    """The firewall backend the ops are for ("libnftables", "nft-binary", "iptables")."""
    selection: ResolvedSelection | None = None
    """Per-app routing in the nft table; None: the whole host, no selection chain."""
    cgroup2: str | None = None
    """cgroup2 mount point the cgroup sets refer to (the watcher watches below it)."""
    cgroups_held: tuple[tuple[str, int], ...] = ()
    """(path, id) of the cgroups the loaded table's sets already hold."""


def iface_sysctl(prefix: str, iface: str, leaf: str) -> str:
    """The dotted key of a per-interface sysctl, e.g. net.ipv4.conf.tun0.rp_filter; a dot in
    the interface name (eth0.100) is written "/", as sysctl(8) does."""
    return f"{prefix}.{iface.replace('.', '/')}.{leaf}"


def _norm_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        # resolv.conf may carry a zone index (fe80::1%eth0); nft sets hold plain addresses.
        return ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for value in values:
        addr = _norm_ip(value)
        if addr is not None:
            seen.setdefault(str(addr), None)
    return tuple(seen)


def dns_bypass_for(config: Config, facts: HostFacts) -> tuple[str, ...]:
    """The resolvers to let through: --dns (or the host's resolvers) plus --allow-dns.

    A loopback resolver (systemd-resolved's 127.0.0.53 stub, a local dnsmasq) needs no
    bypass - lo is never captured or blocked - but its upstreams do, so a stub is replaced
    by systemd-resolved's upstream servers when those are known.
    """
    base = config.dns or facts.resolvers
    out: list[str] = []
    for value in base:
        addr = _norm_ip(value)
        if addr is None:
            continue
        if addr.is_loopback:
            out.extend(facts.systemd_upstreams)
        else:
            out.append(str(addr))
    out.extend(config.allow_dns)
    return tuple(a for a in _unique(out) if not ipaddress.ip_address(a).is_loopback)


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@+=-]+")


def _check_conflicts(config: Config, facts: HostFacts) -> None:
    if not _SAFE_NAME.fullmatch(config.tun_name):
        # The name ends up quoted in nft rules and shell commands; keep it plain.
        raise ConfigError(f"TUN name {config.tun_name!r} may only contain letters, digits "
                          "and _ . @ + = -")
    if config.tun_name in facts.links:
        raise ConfigError(
            f"TUN name {config.tun_name!r} is already in use; pick another with --tun-name")
    if config.table in facts.tables_in_use:
        raise ConfigError(
            f"--table {config.table} already holds routes; pick a free table with --table")
    if config.rule_priority in facts.rule_priorities_in_use:
        raise ConfigError(
            f"--rule-priority {config.rule_priority} is already used by an ip rule; "
            "pick another with --rule-priority")


def _no_resolver_warning(config: Config, facts: HostFacts) -> str:
    """Why no resolver made it into the bypass, and what to do about it."""
    stubs = [r for r in (config.dns or facts.resolvers)
             if (a := _norm_ip(r)) is not None and a.is_loopback]
    if stubs and not facts.systemd_upstreams:
        why = (f"resolv.conf names only the local stub {', '.join(stubs)} and "
               "/run/systemd/resolve/resolv.conf lists no upstream server")
    elif not (config.dns or facts.resolvers):
        why = "no nameserver in /etc/resolv.conf and no --dns"
    else:
        why = "no usable resolver address"
    return (f"killswitch on and no resolver reachable ({why}): DNS will fail; "
            "pass --allow-dns IP (or --dns IP)")


def plan_selection(config: Config, facts: HostFacts,
                   ) -> tuple[ResolvedSelection | None, tuple[tuple[str, int], ...]]:
    """The resolved selection (None when there is nothing to select and no cgroup2 for
    `proxyvpn exec`) and the cgroups its sets start with."""
    if facts.firewall == "iptables":
        if config.selection.active:
            # iptables' cgroup match takes fixed paths at rule load; live regex selection
            # needs nftables sets, so per-app routing is nftables-only (README).
            raise ConfigError("per-app routing (--only-*/--skip-*) needs the nftables "
                              "backend; it is not available with --firewall-backend iptables")
        return None, ()
    sel = resolve_selection(config, facts)
    if not config.selection.active and sel.exec_cgroup is None:
        return None, ()
    tracker = CgroupTracker(sel)
    tracker.reconcile(dict(facts.cgroups))
    # Only names nft can take go in the initial table; the watcher adds the rest.
    return sel, tuple(sorted((p, i) for p, i in tracker.held.items() if nft_safe_path(p)))


def _cgroup_elements(sel: ResolvedSelection | None, held: tuple[tuple[str, int], ...],
                     root: str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if sel is None or root is None:
        return out
    tracker = CgroupTracker(sel)
    for change in tracker.reconcile(dict(held)):
        out.setdefault(change.set, []).append(nft_cgroup_ref(root.rstrip("/") + change.path))
    return out


def _firewall_ops(config: Config, facts: HostFacts, proxy_ips: tuple[str, ...],
                  dns: tuple[str, ...], ipv6: bool, sel: ResolvedSelection | None = None,
                  held: tuple[tuple[str, int], ...] = ()) -> list[Op]:
    """The marking + killswitch ops for the chosen backend: one nftables table, or one
    iptables-restore transaction per family. Both come first in the plan (fail closed)."""
    if facts.firewall != "iptables":
        elements = _cgroup_elements(sel, held, facts.cgroup2)
        ruleset = nft.build_ruleset(config, proxy_ips, dns, ipv6=ipv6, selection=sel,
                                    cgroup_elements=elements)
        text = nft.render_text(config, proxy_ips, dns, ipv6=ipv6, selection=sel,
                               cgroup_elements=elements)
        return [LoadNftTable(nft.FAMILY, nft.TABLE, tuple(ruleset), text,
                             nft.needs_text_load(sel))]
    ops: list[Op] = []
    for fam in iptables.build_families(config, proxy_ips, dns, ipv6=ipv6):
        tables = sorted({c.split("/", 1)[0] for c in fam.chains})
        present = facts.iptables_tables
        # Unknown (a dry run without privileges): claim nothing, so nothing is removed.
        new = () if present is None else tuple(t for t in tables
                                                if f"{fam.family}/{t}" not in present)
        ops.append(LoadIptables(fam.family, fam.chains, fam.jumps,
                                iptables.restore_text(fam.chains, fam.jumps, fam.rules), new))
    return ops


def build_plan(config: Config, facts: HostFacts) -> Plan:
    """Turn configuration and facts into a Plan. Raises ConfigError for conflicts with the
    host (TUN name, routing table or rule priority already taken)."""
    _check_conflicts(config, facts)
    warnings: list[str] = []
    ipv6 = config.ipv6 and facts.ipv6_enabled
    if config.ipv6 and not facts.ipv6_enabled:
        warnings.append("IPv6 is disabled on this host: only IPv4 TCP is captured")

    proxy_ips = _unique(facts.proxy_ips)
    if not facts.ipv6_enabled:
        # An IPv6 proxy address is unreachable without IPv6; the relay must not try it.
        proxy_ips = tuple(a for a in proxy_ips if ipaddress.ip_address(a).version == 4)
    if config.proxy is None:
        warnings.append("no proxy given: this plan has no proxy address (dry run only)")
    elif not proxy_ips:
        raise ConfigError(f"proxy host {config.proxy.host!r} has no usable address "
                          "(IPv6 is disabled); pass --proxy-ip")

    sel, held = plan_selection(config, facts)
    dns = dns_bypass_for(config, facts)
    if config.killswitch and not dns:
        warnings.append(_no_resolver_warning(config, facts))

    tun = config.tun_name
    ops: list[Op] = [*_firewall_ops(config, facts, proxy_ips, dns, ipv6, sel, held), CreateTun(tun, config.mtu, config.offload)]
    if ipv6 and facts.sysctls.get("net.ipv6.conf.default.disable_ipv6") == "1":
        # A new interface inherits default.disable_ipv6; with it set the kernel refuses the
        # TUN's IPv6 address and route. Only then do we touch it, and only on our TUN.
        ops.append(SetSysctl(iface_sysctl("net.ipv6.conf", tun, "disable_ipv6"), "0", "1"))
    ops.append(SetAddress(tun, config.tun_cidr))
    if ipv6:
        ops.append(SetAddress(tun, config.tun_cidr6))
    ops.append(LinkUp(tun))
    # Replies we write to the TUN are addressed to the app's address on another interface
    # and come from the remote server, whose route points out of eth0: strict reverse-path
    # filtering (rp_filter=1) would drop them. The kernel uses max(all, iface), so loose
    # mode (2) on our own interface is enough whatever `all` says, and nothing global
    # changes. The TUN is new, so its "previous" value is what it inherits from default.
    key = iface_sysctl("net.ipv4.conf", tun, "rp_filter")
    previous = facts.sysctls.get(key, facts.sysctls.get("net.ipv4.conf.default.rp_filter"))
    ops.append(SetSysctl(key, "2", previous))
    families = (4, 6) if ipv6 else (4,)
    for family in families:
        ops.append(AddRoute(family, config.table, tun))
    for family in families:
        ops.append(AddRule(family, config.capture_mark, config.table, config.rule_priority))

    plan = Plan(tuple(ops), dns, proxy_ips, tuple(warnings), facts.firewall, sel,
                facts.cgroup2 if sel is not None else None, held)
    log.debug("plan: %d operations, dns bypass %s, proxy %s", len(plan.ops), dns, proxy_ips)
    return plan
