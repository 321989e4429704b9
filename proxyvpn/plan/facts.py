"""Host facts: what the planner needs to know about the system, as plain values.

`proxyvpn.system.facts.read_facts` fills this from the running host; tests build it by
hand, which is what keeps the planner pure and its output reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DefaultRoute:
    """One default route of the main table (diagnostics; the plan does not depend on it)."""

    family: int
    """4 or 6."""
    gateway: str | None
    """Next hop address, None for a device route."""
    dev: str | None
    """Output interface name, None when unknown."""


@dataclass(frozen=True)
class HostFacts:
    """Everything the planner reads from the host. All fields are plain, hashable-ish data."""

    resolvers: tuple[str, ...] = ()
    """Nameservers from /etc/resolv.conf, in file order."""
    systemd_upstreams: tuple[str, ...] = ()
    """Nameservers from /run/systemd/resolve/resolv.conf (systemd-resolved's upstreams)."""
    proxy_ips: tuple[str, ...] = ()
    """Addresses of the proxy: --proxy-ip values, or what the proxy host resolved to."""
    default_routes: tuple[DefaultRoute, ...] = ()
    """Default routes of the main table."""
    links: frozenset[str] = frozenset()
    """Names of the interfaces that exist."""
    tables_in_use: frozenset[int] = frozenset()
    """Routing tables holding at least one route (IPv4 or IPv6)."""
    rule_priorities_in_use: frozenset[int] = frozenset()
    """Priorities of the existing policy routing rules (IPv4 and IPv6)."""
    sysctls: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Current values of the sysctls the plan may change or inherit from (dotted keys)."""
    ipv6_enabled: bool = True
    """IPv6 is available (the kernel has it and net.ipv6.conf.all.disable_ipv6 is 0)."""
    firewall: str = "libnftables"
    """The firewall backend in use: "libnftables", "nft-binary" or "iptables" (resolved
    from --firewall-backend by proxyvpn.system.firewall)."""
    iptables_tables: frozenset[str] | None = None
    """With the iptables backend: the tables that exist, as "4/mangle", "6/filter"...
    (what iptables-save lists); None when unknown (no privileges, as in a dry run)."""
    cgroup2: str | None = None
    """Where the cgroup v2 filesystem is mounted (from /proc/self/mounts); None: not mounted
    in this mount namespace, so no cgroup rules (and no `proxyvpn exec` rules)."""
    cgroups: tuple[tuple[str, int], ...] = ()
    """Existing cgroups as (path relative to the cgroup2 root, e.g. "/user.slice", cgroup
    id = inode number). Read only when a cgroup selection or the exec cgroups need it."""
    users: Mapping[str, int] = field(default_factory=dict, hash=False)
    """uid of each user name the selection names (unknown names are absent)."""
    groups: Mapping[str, int] = field(default_factory=dict, hash=False)
    """gid of each group name the selection names (unknown names are absent)."""
