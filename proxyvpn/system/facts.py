"""Reading the host facts the planner needs. Safe without privileges: netlink dumps,
/proc/sys reads, resolv.conf and getaddrinfo all work as an ordinary user, so a dry run
does too. Changes nothing.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import pwd
import socket
from pathlib import Path

from proxyvpn.config import Config
from proxyvpn.errors import ConfigError
from proxyvpn.plan.build import iface_sysctl
from proxyvpn.plan.facts import HostFacts
from proxyvpn.plan.selection import EXEC_MODES, exec_path
from proxyvpn.system import cgroups, firewall, iptables
from proxyvpn.system.netlink import Netlink
from proxyvpn.system.sysctl import PROC_SYS, read_sysctl

log = logging.getLogger("proxyvpn.system")

RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")

# The sysctls the plan may change or whose value a new interface inherits.
_SYSCTLS = (
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
    "net.ipv6.conf.all.disable_ipv6",
    "net.ipv6.conf.default.disable_ipv6",
)


def parse_resolv_conf(text: str) -> tuple[str, ...]:
    """The `nameserver` addresses, in order, valid IPs only (a zone index is kept)."""
    out: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            if fields[1] not in out:
                out.append(fields[1])
    return tuple(out)


def read_resolvers(path: Path) -> tuple[str, ...]:
    """Nameservers of a resolv.conf file; a missing or unreadable file gives ()."""
    try:
        return parse_resolv_conf(path.read_text(errors="replace"))
    except OSError:
        return ()


def resolve_proxy(config: Config) -> tuple[str, ...]:
    """--proxy-ip values, or the proxy host's addresses (getaddrinfo order, deduplicated)."""
    if config.proxy_ips:
        return config.proxy_ips
    if config.proxy is None:
        return ()
    host = config.proxy.host
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, config.proxy.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"proxy host {host!r} does not resolve: {exc.strerror}; "
                          "pass --proxy-ip to skip resolution") from None
    out: list[str] = []
    for family, *_, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
            if address not in out:
                out.append(address)
    if not out:
        raise ConfigError(f"proxy host {host!r} does not resolve: no IPv4 or IPv6 address")
    return tuple(out)


def _lookup(names: tuple[str, ...], getter) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        if name.isdigit():
            continue
        with contextlib.suppress(KeyError):  # the planner reports unknown names
            out[name] = getter(name)
    return out


def read_cgroups(config: Config, root: str | None) -> tuple[tuple[str, int], ...]:
    """The cgroups the plan's sets may start with: the whole tree when a pattern needs
    it, else only the exec leaves."""
    if root is None:
        return ()
    sel = config.selection
    if sel.only_cgroups or sel.skip_cgroups:
        return tuple(sorted(cgroups.scan(root).items()))
    out = []
    for mode in EXEC_MODES:
        rel = exec_path(config.exec_cgroup, mode)
        try:
            out.append((rel, Path(root + rel).stat().st_ino))
        except OSError:
            continue
    return tuple(out)


def read_facts(config: Config, *, resolv_conf: Path = RESOLV_CONF,
               systemd_resolv_conf: Path = SYSTEMD_RESOLV_CONF) -> HostFacts:
    """Everything build_plan needs, read from this host (this network namespace)."""
    proxy_ips = resolve_proxy(config)
    keys = [*_SYSCTLS, iface_sysctl("net.ipv4.conf", config.tun_name, "rp_filter")]
    sysctls = {k: v for k in keys if (v := read_sysctl(k)) is not None}
    ipv6_enabled = ((PROC_SYS / "net" / "ipv6").is_dir()
                    and sysctls.get("net.ipv6.conf.all.disable_ipv6", "0") != "1")
    try:
        with Netlink() as nl:
            links = nl.link_names()
            tables = nl.route_tables()
            default_routes = nl.default_routes()
            rules = nl.rules()
    except OSError as exc:
        raise ConfigError(f"cannot read the routing state: {exc.strerror or exc}") from None
    # A rule identical to ours is a leftover of a proxyvpn that died; the journal cleanup
    # (clean_stale / `proxyvpn down`) removes it, so it does not count as a conflict.
    ours = (config.rule_priority, config.capture_mark, config.table)
    priorities = frozenset(r[1] for r in rules if r[1:] != ours)
    backend = firewall.resolve(config.firewall_backend)
    # Which iptables tables exist, so that the undo can remove the ones `up` creates.
    ipt_tables = iptables.existing_tables() if backend == "iptables" else None
    root = cgroups.cgroup2_mount()
    sel = config.selection
    facts = HostFacts(
        resolvers=read_resolvers(resolv_conf),
        systemd_upstreams=read_resolvers(systemd_resolv_conf),
        proxy_ips=proxy_ips,
        default_routes=default_routes,
        links=links,
        tables_in_use=tables,
        rule_priorities_in_use=priorities,
        sysctls=sysctls,
        ipv6_enabled=ipv6_enabled,
        firewall=backend,
        iptables_tables=ipt_tables,
        cgroup2=root,
        cgroups=read_cgroups(config, root),
        users=_lookup(sel.only_users + sel.skip_users, lambda n: pwd.getpwnam(n).pw_uid),
        groups=_lookup(sel.only_groups + sel.skip_groups, lambda n: grp.getgrnam(n).gr_gid),
    )
    log.debug("host facts: %s", facts)
    return facts
