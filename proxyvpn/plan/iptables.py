"""The iptables/ip6tables ruleset: the third firewall backend, for hosts without nftables.

Same semantics as the nftables table (proxyvpn.plan.nft), in chains we own:

* mangle PROXYVPN (jumped to from mangle OUTPUT): marks the TCP packets to capture. The
  mangle OUTPUT chain re-routes a packet whose mark changed, as nft's `type route` does.
* mangle PROXYVPN_POST (from mangle POSTROUTING, killswitch only): drops captured packets
  that did not end up in the TUN (after a crash the TUN is gone but the mark and the ip
  rule remain). The filter table has no POSTROUTING hook, hence mangle; and, as in nft,
  REJECT is not allowed there, hence DROP.
* filter PROXYVPN (from filter OUTPUT, killswitch only): everything not captured may only
  reach the proxy port, the allowed resolvers, the excluded networks, DHCP and neighbour
  discovery; the rest is rejected (TCP reset, else ICMP administratively prohibited).

Each family is one iptables-restore --noflush document. iptables-restore commits it table
by table (each COMMIT is one transaction), so the filter table (the killswitch) comes
first: if the mangle part then fails, nothing is captured yet, everything is blocked, and
the rollback removes the filter part. `-N` of a chain that exists fails its table's
transaction; the loader checks for our chains before it starts, so we never merge into a
chain left behind by someone else. The jumps are inserted at position 1: an ACCEPT earlier
in OUTPUT would otherwise bypass the killswitch. What the killswitch allows RETURNs to
OUTPUT instead of being accepted, so the host's own rules still apply to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxyvpn.config import Config
from proxyvpn.plan.nft import _LOCAL4, _LOCAL6, _collapse, _sorted_unique, _split

CHAIN = "PROXYVPN"
"""Our chain in both the mangle and the filter table."""
POST_CHAIN = "PROXYVPN_POST"
"""Our chain in mangle POSTROUTING (the crash guard of the killswitch)."""
TABLES = ("filter", "mangle")
"""The tables we may add chains to, in the order the restore documents list them
(killswitch before capture: fail closed)."""

# Router solicitation, neighbour solicitation and advertisement (RFC 4861).
_ND_TYPES6 = ("133", "135", "136")
# MLD reports and dones, to link-scope groups only (why: nft.py's _MLD_TYPES).
_MLD_TYPES6 = ("131", "132", "143")


@dataclass(frozen=True)
class IptFamily:
    """What one family (iptables or ip6tables) gets: our chains, their rules, the jumps."""

    family: int
    """4 (iptables) or 6 (ip6tables)."""
    chains: tuple[str, ...]
    """Our chains as "table/chain", e.g. "mangle/PROXYVPN"."""
    jumps: tuple[str, ...]
    """Jump rules we insert, as "table/builtin/target", e.g. "mangle/OUTPUT/PROXYVPN"."""
    rules: tuple[str, ...]
    """Rules of our chains as "table/-A CHAIN ...", in order."""


def tool(family: int) -> str:
    """`iptables` or `ip6tables`."""
    return "ip6tables" if family == 6 else "iptables"


def _host(value: str) -> str:
    net = ipaddress.ip_network(value, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _capture_rules(config: Config, family: int, proxies: Sequence[str],
                   dns: Sequence[str]) -> list[str]:
    tun = config.tun_name
    if family == 4:
        local: Iterable[str] = (*_LOCAL4, str(ipaddress.ip_interface(config.tun_cidr).network))
    else:
        local = (*_LOCAL6, str(ipaddress.ip_interface(config.tun_cidr6).network))
    ret = f"-A {CHAIN} {{}} -j RETURN"
    rules = [
        # Only TCP can be relayed through CONNECT; everything else keeps its route.
        ret.format("! -p tcp"),
        # Replies of connections other hosts opened to us leave the way they came in.
        ret.format("-m conntrack --ctdir REPLY"),
        # Our relay sockets carry the bypass mark (SO_MARK) and must never loop back.
        ret.format(f"-m mark --mark {config.bypass_mark:#x}"),
        ret.format("-o lo"),
        ret.format(f"-o {tun}"),
    ]
    rules += [ret.format(f"-d {_host(n)}") for n in local]
    rules += [ret.format(f"-d {a}") for a in proxies]
    rules += [ret.format(f"-d {n}") for n in _collapse(config.excludes, family)]
    # DNS over TCP to an allowed resolver goes direct, like DNS over UDP does.
    rules += [ret.format(f"-d {a} -p tcp --dport 53") for a in dns]
    rules.append(f"-A {CHAIN} -j MARK --set-mark {config.capture_mark:#x}")
    return rules


def _killswitch_rules(config: Config, family: int, proxies: Sequence[str],
                      dns: Sequence[str]) -> list[str]:
    # RETURN, not ACCEPT: what we allow goes back to OUTPUT, where the host's own rules
    # (ufw, firewalld) still judge it -- as in nftables, where our table's accept does
    # not override another table's drop. Only what we block ends here.
    acc = f"-A {CHAIN} {{}} -j RETURN"
    rules = [
        acc.format("-o lo"),
        # Captured: re-routed to the TUN by the mangle chain, though -o here still names
        # the original device; PROXYVPN_POST makes sure they reach the TUN.
        acc.format(f"-m mark --mark {config.capture_mark:#x}"),
        acc.format(f"-o {config.tun_name}"),
        # Answers on connections other hosts opened to us (an sshd session): see nft.py.
        acc.format("-m conntrack --ctdir REPLY"),
    ]
    if config.proxy is not None:
        rules += [acc.format(f"-d {a} -p tcp --dport {config.proxy.port}") for a in proxies]
    for proto in ("udp", "tcp"):
        rules += [acc.format(f"-d {a} -p {proto} --dport 53") for a in dns]
    rules += [acc.format(f"-d {n}") for n in _collapse(config.excludes, family)]
    # DHCP must keep working or the lease (and the route to the proxy) expires; neighbour
    # discovery, or IPv6 on the LAN breaks.
    if family == 4:
        rules.append(acc.format("-p udp --sport 68 --dport 67"))
        rejected = "icmp-admin-prohibited"
    else:
        # To the DHCP servers' group only, from the client port (see nft.py).
        rules.append(acc.format("-d ff02::1:2 -p udp --sport 546 --dport 547"))
        rules += [acc.format(f"-p ipv6-icmp --icmpv6-type {t}") for t in _ND_TYPES6]
        rules += [acc.format(f"-d ff02::/16 -p ipv6-icmp --icmpv6-type {t}") for t in _MLD_TYPES6]
        rejected = "icmp6-adm-prohibited"
    rules += [
        # A TCP reset makes blocked connections fail at once instead of timing out.
        f"-A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {CHAIN} -j REJECT --reject-with {rejected}",
    ]
    return rules


def build_families(config: Config, proxy_ips: Sequence[str], dns_bypass: Sequence[str], *,
                   ipv6: bool | None = None) -> tuple[IptFamily, ...]:
    """The chains, rules and jumps per family; a family with nothing to do is left out
    (IPv6 without capture and without the killswitch)."""
    capture_v6 = config.ipv6 if ipv6 is None else ipv6
    proxies = dict(zip((4, 6), (_sorted_unique(p) for p in _split(proxy_ips)), strict=True))
    dns = dict(zip((4, 6), (_sorted_unique(d) for d in _split(dns_bypass)), strict=True))
    out = []
    for family in (4, 6):
        chains: list[str] = []
        jumps: list[str] = []
        rules: list[str] = []
        if family == 4 or capture_v6:
            chains.append(f"mangle/{CHAIN}")
            jumps.append(f"mangle/OUTPUT/{CHAIN}")
            rules += [f"mangle/{r}" for r in _capture_rules(config, family, proxies[family],
                                                              dns[family])]
            if config.killswitch:
                chains.append(f"mangle/{POST_CHAIN}")
                jumps.append(f"mangle/POSTROUTING/{POST_CHAIN}")
                rules.append(f"mangle/-A {POST_CHAIN} -m mark --mark {config.capture_mark:#x} "
                             f"! -o {config.tun_name} -j DROP")
        if config.killswitch:
            chains.append(f"filter/{CHAIN}")
            jumps.append(f"filter/OUTPUT/{CHAIN}")
            rules += [f"filter/{r}" for r in _killswitch_rules(config, family, proxies[family],
                                                                dns[family])]
        if chains:
            out.append(IptFamily(family, tuple(chains), tuple(jumps), tuple(rules)))
    return tuple(out)


def _by_table(items: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {t: [] for t in TABLES}
    for item in items:
        table, rest = item.split("/", 1)
        grouped[table].append(rest)
    return grouped


def restore_text(chains: Sequence[str], jumps: Sequence[str], rules: Sequence[str]) -> str:
    """The iptables-restore --noflush document that creates our chains and jumps."""
    chains_by, rules_by, jumps_by = _by_table(chains), _by_table(rules), _by_table(jumps)
    lines: list[str] = []
    for table in TABLES:
        if not chains_by[table]:
            continue
        lines.append(f"*{table}")
        lines += [f"-N {c}" for c in chains_by[table]]
        lines += rules_by[table]
        for jump in jumps_by[table]:
            builtin, target = jump.split("/")
            lines.append(f"-I {builtin} 1 -j {target}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def delete_text(chains: Sequence[str], jumps: Sequence[str]) -> str:
    """The iptables-restore --noflush document that removes exactly our jumps and chains
    (what the undo runs when all of them are present; it skips what is already gone)."""
    chains_by, jumps_by = _by_table(chains), _by_table(jumps)
    lines: list[str] = []
    for table in TABLES:
        if not chains_by[table] and not jumps_by[table]:
            continue
        lines.append(f"*{table}")
        for jump in jumps_by[table]:
            builtin, target = jump.split("/")
            lines.append(f"-D {builtin} -j {target}")
        for chain in chains_by[table]:
            # A chain must be empty and unreferenced before -X deletes it.
            lines += [f"-F {chain}", f"-X {chain}"]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"
