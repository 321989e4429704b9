"""The nftables ruleset: table inet proxyvpn, as libnftables JSON and as nft text.

Both forms come from one model (sets and chains made of statements that know their JSON
and their text), so the dry run shows exactly what `up` loads. The JSON is one batch:
libnftables commits it as a single transaction, so the table appears whole or not at all.

Chains (locally generated packets only):

* capture (output hook, type route, priority mangle): marks the TCP packets to capture
  with the capture mark; being a route chain, the kernel routes the packet again after a
  mark change, so the `fwmark` rule sends it to our table and the TUN.
* killswitch (output hook, type filter, only with --killswitch): everything not captured
  may only reach the proxy, the allowed resolvers and the excluded networks. Caveat: the
  output hook's `oifname` is fixed before the hook runs, so it still names the ORIGINAL
  device of a re-routed packet; captured packets are therefore accepted by their mark
  here, and
* selection (a regular chain, only with per-app routing or a cgroup2 filesystem): both
  capture and killswitch jump to it; `accept` there leaves unselected traffic alone (not
  marked, not blocked), `return` hands selected traffic back (see proxyvpn.plan.selection).
* killswitch_post (postrouting hook, type filter, only with --killswitch), where oifname
  is the device the packet really leaves by, drops captured packets that did not end up
  in the TUN - after a crash the TUN and its route are gone while the mark and the rule
  remain, and without this chain they would leave directly. (reject is not allowed in
  postrouting, hence drop.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxyvpn.config import Config
from proxyvpn.plan.selection import (
    EXEC_LEVEL,
    MAX_LEVEL,
    ResolvedSelection,
    level_set,
)

FAMILY = "inet"
TABLE = "proxyvpn"

# Destinations that never leave the host or must not be sent to a proxy: loopback,
# link-local, multicast, broadcast. The TUN's own network is added per config.
_LOCAL4 = ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
_LOCAL6 = ("::1/128", "fe80::/10", "ff00::/8")

# Neighbour discovery must pass the killswitch or IPv6 on the LAN (and so the route to
# the proxy) breaks; router solicitations keep SLAAC working.
_ND_TYPES = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")
# Multicast listener reports, to link-scope groups only: a switch that snoops MLD stops
# forwarding the neighbour solicitations for our solicited-node group (and so IPv6 on the
# LAN breaks) once it hears no report from us.
_MLD_TYPES = ("mld-listener-report", "mld-listener-done", "mld2-listener-report")
_LINK_SCOPE_MULTICAST6 = "ff02::/16"


@dataclass(frozen=True)
class Stmt:
    """One nftables statement in both syntaxes."""

    json: dict[str, Any]
    """The libnftables JSON statement object."""
    text: str
    """The same statement in nft syntax."""


@dataclass(frozen=True)
class NftSet:
    """A named set of addresses."""

    name: str
    """Set name, referenced as @name."""
    type: str
    """"ipv4_addr", "ipv6_addr" or "cgroupsv2"."""
    interval: bool
    """Holds prefixes (flags interval) rather than single addresses."""
    elements: tuple[str, ...]
    """Addresses or prefixes (normalised, sorted, non-overlapping); for cgroupsv2, cgroup
    references as nft resolves them (selection.nft_cgroup_ref)."""


@dataclass(frozen=True)
class NftChain:
    """A base chain and its rules."""

    name: str
    """Chain name."""
    hook: str
    """Netfilter hook: "output" or "postrouting"; "" for a regular chain (jump target)."""
    type: str
    """Chain type: "route" or "filter"."""
    prio: int
    """Numeric priority (what the JSON carries)."""
    prio_name: str
    """Symbolic priority (what the text shows): "mangle" or "filter"."""
    rules: tuple[tuple[Stmt, ...], ...]
    """Rules in order; each a tuple of statements."""


# ---------------------------------------------------------------- statement builders


def _meta(key: str) -> tuple[dict[str, Any], str]:
    # nft's own syntax writes the oifname key without the "meta" keyword.
    return {"meta": {"key": key}}, ("oifname" if key == "oifname" else f"meta {key}")


def _payload(protocol: str, fld: str) -> tuple[dict[str, Any], str]:
    return {"payload": {"protocol": protocol, "field": fld}}, f"{protocol} {fld}"


def _match(left: tuple[dict[str, Any], str], right_json: Any, right_text: str,
           op: str = "==") -> Stmt:
    text_op = "" if op == "==" else f"{op} "
    return Stmt({"match": {"op": op, "left": left[0], "right": right_json}},
                f"{left[1]} {text_op}{right_text}")


def _element(value: str) -> tuple[Any, str]:
    """A set element: a single address as a string, a prefix as {"prefix": ...}."""
    net = ipaddress.ip_network(value, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address), str(net.network_address)
    return ({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}},
            str(net))


def _set_element(s: NftSet, value: str) -> tuple[Any, str]:
    if s.type == "cgroupsv2":
        return value, '"' + value.replace('"', '') + '"'
    return _element(value)


def _anon_set(values: Iterable[str]) -> tuple[Any, str]:
    elems = [_element(v) for v in values]
    return {"set": [e[0] for e in elems]}, "{ " + ", ".join(e[1] for e in elems) + " }"


def _literal_set(values: Iterable[str | int]) -> tuple[Any, str]:
    """An anonymous set of literal values (ports, ids, ICMPv6 type names), as is."""
    vals = list(values)
    return {"set": vals}, "{ " + ", ".join(map(str, vals)) + " }"


def _daddr(family: int) -> tuple[dict[str, Any], str]:
    return _payload("ip" if family == 4 else "ip6", "daddr")


def _in_set(family: int, name: str) -> Stmt:
    return _match(_daddr(family), f"@{name}", f"@{name}")


def _in_literal(family: int, values: Iterable[str]) -> Stmt:
    right_json, right_text = _anon_set(values)
    return _match(_daddr(family), right_json, right_text)


def _oifname(name: str) -> Stmt:
    return _match(_meta("oifname"), name, f'"{name}"')


def _mark(mark: int) -> Stmt:
    return _match(_meta("mark"), mark, f"{mark:#x}")


def _set_mark(mark: int) -> Stmt:
    return Stmt({"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}},
                f"meta mark set {mark:#x}")


def _ct_mark(mark: int) -> Stmt:
    return _match(({"ct": {"key": "mark"}}, "ct mark"), mark, f"{mark:#x}")


def _set_ct_mark(mark: int) -> Stmt:
    return Stmt({"mangle": {"key": {"ct": {"key": "mark"}}, "value": mark}},
                f"ct mark set {mark:#x}")


def _port(protocol: str, fld: str, port: int) -> Stmt:
    return _match(_payload(protocol, fld), port, str(port))


def _skid(key: str, ids: Sequence[int]) -> Stmt:
    # meta skuid/skgid: the owner of the socket that sent the packet (its creator's fsuid /
    # fsgid), so `sg GROUP cmd` and `setpriv --regid` select a process by group.
    if len(ids) == 1:
        return _match(_meta(key), ids[0], str(ids[0]))
    return _match(_meta(key), *_literal_set(ids))


def _in_cgroup_set(level: int, name: str) -> Stmt:
    return Stmt({"match": {"op": "==", "left": {"socket": {"key": "cgroupv2", "level": level}},
                           "right": f"@{name}"}},
                f"socket cgroupv2 level {level} @{name}")


_RETURN = Stmt({"return": None}, "return")
_ACCEPT = Stmt({"accept": None}, "accept")
_COUNTER = Stmt({"counter": None}, "counter")


# ---------------------------------------------------------------- the model


def _split(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    v4, v6 = [], []
    for text in addresses:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
        (v4 if addr.version == 4 else v6).append(str(addr))
    return v4, v6


def _sorted_unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values), key=lambda v: ipaddress.ip_address(v).packed))


def _collapse(cidrs: Iterable[str], version: int) -> tuple[str, ...]:
    # An interval set refuses overlapping elements, so merge them first.
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    nets = [n for n in nets if n.version == version]
    return tuple(str(n) for n in ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]


_JUMP_SELECTION = Stmt({"jump": {"target": "selection"}}, "jump selection")


def _selection_rules(sel: ResolvedSelection) -> tuple[tuple[Stmt, ...], ...]:
    """The selection chain: accept = unselected (left alone), return = selected."""
    rules: list[tuple[Stmt, ...]] = []
    if sel.exec_cgroup:
        rules.append((_in_cgroup_set(EXEC_LEVEL, "exec_direct"), _ACCEPT))
        rules.append((_in_cgroup_set(EXEC_LEVEL, "exec_capture"), _RETURN))
    for verdict, uids, gids, patterns, kind in (
            (_ACCEPT, sel.skip_uids, sel.skip_gids, sel.skip_cgroups, "skip"),
            (_RETURN, sel.only_uids, sel.only_gids, sel.only_cgroups, "only")):
        if uids:
            rules.append((_skid("skuid", uids), verdict))
        if gids:
            rules.append((_skid("skgid", gids), verdict))
        if patterns:
            rules += [(_in_cgroup_set(n, level_set(kind, n)), verdict)
                      for n in range(1, MAX_LEVEL + 1)]
    if sel.has_only:
        rules.append((_ACCEPT,))
    return tuple(rules)


def _selection_sets(sel: ResolvedSelection,
                    elements: Mapping[str, Sequence[str]]) -> tuple[NftSet, ...]:
    return tuple(NftSet(name, "cgroupsv2", False, tuple(sorted(set(elements.get(name, ())))))
                 for name in sel.set_names())


def uses_selection(sel: ResolvedSelection | None) -> bool:
    """The table has a selection chain (something to select, or exec cgroups to honour)."""
    return sel is not None and bool(_selection_rules(sel))


def needs_text_load(sel: ResolvedSelection | None) -> bool:
    """The ruleset must be loaded as nft text: libnftables 1.0.x's JSON parser knows no
    `socket cgroupv2` (newer ones read the JSON form this module also emits)."""
    return sel is not None and bool(sel.set_names())


def build_model(config: Config, proxy_ips: Sequence[str], dns_bypass: Sequence[str], *,
                ipv6: bool | None = None, selection: ResolvedSelection | None = None,
                cgroup_elements: Mapping[str, Sequence[str]] | None = None,
                ) -> tuple[tuple[NftSet, ...], tuple[NftChain, ...]]:
    """The sets and chains of table inet proxyvpn for this configuration.

    `ipv6`: capture IPv6 TCP (default: config.ipv6). Without it IPv6 is never marked and,
    with the killswitch, blocked like any other leak. `selection`: per-app routing (None:
    the whole host, no selection chain); `cgroup_elements`: the initial contents of its
    cgroup sets (set name -> cgroup references).
    """
    select = uses_selection(selection)
    capture_v6 = config.ipv6 if ipv6 is None else ipv6
    proxy4, proxy6 = _split(proxy_ips)
    dns4, dns6 = _split(dns_bypass)
    sets = (
        NftSet("proxy4", "ipv4_addr", False, _sorted_unique(proxy4)),
        NftSet("proxy6", "ipv6_addr", False, _sorted_unique(proxy6)),
        NftSet("dns4", "ipv4_addr", False, _sorted_unique(dns4)),
        NftSet("dns6", "ipv6_addr", False, _sorted_unique(dns6)),
        NftSet("exclude4", "ipv4_addr", True, _collapse(config.excludes, 4)),
        NftSet("exclude6", "ipv6_addr", True, _collapse(config.excludes, 6)),
    )
    if selection is not None:
        sets += _selection_sets(selection, cgroup_elements or {})
    tun = config.tun_name
    tun_net4 = str(ipaddress.ip_interface(config.tun_cidr).network)
    tun_net6 = str(ipaddress.ip_interface(config.tun_cidr6).network)
    families = (4, 6) if capture_v6 else (4,)

    capture: list[tuple[Stmt, ...]] = [
        # Only TCP can be relayed through CONNECT; everything else keeps its route.
        (_match(_meta("l4proto"), "tcp", "tcp", "!="), _RETURN),
    ]
    if not capture_v6:
        capture.append((_match(_meta("nfproto"), "ipv6", "ipv6"), _RETURN))
    capture += [
        # Replies of connections other hosts opened to us (a local sshd) must leave the way
        # the request came in; only connections this host originates are captured.
        (_match(({"ct": {"key": "direction"}}, "ct direction"), "reply", "reply"), _RETURN),
        # Our own relay sockets carry the bypass mark (SO_MARK) and must never loop back.
        (_mark(config.bypass_mark), _RETURN),
        (_oifname("lo"), _RETURN),
        (_oifname(tun), _RETURN),
        (_in_literal(4, (*_LOCAL4, tun_net4)), _RETURN),
    ]
    if capture_v6:
        capture.append((_in_literal(6, (*_LOCAL6, tun_net6)), _RETURN))
    for family in families:
        capture.append((_in_set(family, f"proxy{family}"), _RETURN))
    for family in families:
        capture.append((_in_set(family, f"exclude{family}"), _RETURN))
    for family in families:
        # DNS over TCP to an allowed resolver goes direct, like DNS over UDP does.
        capture.append((_port("tcp", "dport", 53), _in_set(family, f"dns{family}"), _RETURN))
    mark = config.capture_mark
    if select:
        # The selection is made once per connection and held in its conntrack mark: after
        # the app closes its socket the kernel still sends for it (queued data, the FIN,
        # the ACK from TIME-WAIT) without an owner `meta skuid` or `socket cgroupv2` could
        # match, and those packets would leave directly with the host's own address.
        capture.append((_ct_mark(mark), _set_mark(mark), _RETURN))
        capture.append((_JUMP_SELECTION,))
        capture.append((_set_mark(mark), _set_ct_mark(mark)))
    else:
        capture.append((_set_mark(mark),))

    chains = []
    if select:
        assert selection is not None
        # Declared first: the base chains jump to it.
        chains.append(NftChain("selection", "", "", 0, "", _selection_rules(selection)))
    chains.append(NftChain("capture", "output", "route", -150, "mangle", tuple(capture)))
    if config.killswitch:
        chains.append(NftChain("killswitch", "output", "filter", 0, "filter",
                               tuple(_killswitch_rules(config, select))))
        chains.append(NftChain("killswitch_post", "postrouting", "filter", 0, "filter", (
            (_mark(config.capture_mark), _match(_meta("oifname"), config.tun_name,
                                                f'"{config.tun_name}"', "!="),
             _COUNTER, Stmt({"drop": None}, "drop")),
        )))
    return sets, tuple(chains)


def _killswitch_rules(config: Config, select: bool = False) -> list[tuple[Stmt, ...]]:
    rules: list[tuple[Stmt, ...]] = [
        (_oifname("lo"), _ACCEPT),
        # Captured: re-routed to the TUN by the capture chain, though oifname here still
        # shows the original device; killswitch_post makes sure they reach the TUN.
        (_mark(config.capture_mark), _ACCEPT),
        (_oifname(config.tun_name), _ACCEPT),
        # Answers on connections other hosts opened to this one (an sshd session): the
        # peer reached us at this address, so answering reveals nothing new; without it
        # `up` over SSH cuts the session. The capture chain leaves them uncaptured too.
        (_match(({"ct": {"key": "direction"}}, "ct direction"), "reply", "reply"), _ACCEPT),
    ]
    if select:
        # Unselected traffic is accepted there; selected traffic comes back to be held.
        rules.append((_JUMP_SELECTION,))
    if config.proxy is not None:
        # Both our relay sockets and apps configured to use the proxy only reach the proxy
        # port; nothing else at the proxy's address is allowed.
        for family in (4, 6):
            rules.append((_in_set(family, f"proxy{family}"),
                          _port("tcp", "dport", config.proxy.port), _ACCEPT))
    for family in (4, 6):
        rules.append((
            _match(_meta("l4proto"), *_literal_set(("tcp", "udp"))),
            _port("th", "dport", 53),
            _in_set(family, f"dns{family}"),
            _ACCEPT,
        ))
    for family in (4, 6):
        rules.append((_in_set(family, f"exclude{family}"), _ACCEPT))
    rules += [
        # DHCP must keep working or the lease (and the route to the proxy) expires.
        (_match(_meta("nfproto"), "ipv4", "ipv4"), _port("udp", "sport", 68),
         _port("udp", "dport", 67), _ACCEPT),
        # DHCPv6 only to the All_DHCP_Relay_Agents_and_Servers group (RFC 8415 §7.1)
        # from the client port: "udp dport 547" alone let any process reach any host.
        (_match(_payload("ip6", "daddr"), "ff02::1:2", "ff02::1:2"), _port("udp", "sport", 546),
         _port("udp", "dport", 547), _ACCEPT),
        (_match(_payload("icmpv6", "type"), *_literal_set(_ND_TYPES)), _ACCEPT),
        (_match(_payload("ip6", "daddr"), *_element(_LINK_SCOPE_MULTICAST6)),
         _match(_payload("icmpv6", "type"), *_literal_set(_MLD_TYPES)), _ACCEPT),
        # A TCP reset makes blocked connections fail at once instead of timing out.
        (_match(_meta("l4proto"), "tcp", "tcp"), _COUNTER,
         Stmt({"reject": {"type": "tcp reset"}}, "reject with tcp reset")),
        (_COUNTER, Stmt({"reject": {"type": "icmpx", "expr": "admin-prohibited"}},
                        "reject with icmpx admin-prohibited")),
    ]
    return rules


# ---------------------------------------------------------------- the two syntaxes


def _ids() -> dict[str, str]:
    return {"family": FAMILY, "table": TABLE}


def build_ruleset(config: Config, proxy_ips: Sequence[str], dns_bypass: Sequence[str], *,
                  ipv6: bool | None = None, selection: ResolvedSelection | None = None,
                  cgroup_elements: Mapping[str, Sequence[str]] | None = None,
                  ) -> list[dict[str, Any]]:
    """libnftables JSON commands (the list inside {"nftables": [...]}), one atomic batch.

    The table is created with "create", which fails if a table of that name exists: we
    never merge our rules into a table somebody (or a crashed proxyvpn) left behind.
    """
    sets, chains = build_model(config, proxy_ips, dns_bypass, ipv6=ipv6, selection=selection,
                               cgroup_elements=cgroup_elements)
    cmds: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"create": {"table": {"family": FAMILY, "name": TABLE}}},
    ]
    for s in sets:
        decl: dict[str, Any] = {**_ids(), "name": s.name, "type": s.type}
        if s.interval:
            decl["flags"] = ["interval"]
        cmds.append({"add": {"set": decl}})
        if s.elements:
            # Empty sets load fine; an "add element" with no elements would not.
            cmds.append({"add": {"element": {**_ids(), "name": s.name,
                                             "elem": [_set_element(s, e)[0]
                                                      for e in s.elements]}}})
    for c in chains:
        if not c.hook:
            cmds.append({"add": {"chain": {**_ids(), "name": c.name}}})
        else:
            cmds.append({"add": {"chain": {**_ids(), "name": c.name, "type": c.type,
                                           "hook": c.hook, "prio": c.prio,
                                           "policy": "accept"}}})
        for rule in c.rules:
            cmds.append({"add": {"rule": {**_ids(), "chain": c.name,
                                          "expr": [s.json for s in rule]}}})
    return cmds


def render_text(config: Config, proxy_ips: Sequence[str], dns_bypass: Sequence[str], *,
                ipv6: bool | None = None, selection: ResolvedSelection | None = None,
                cgroup_elements: Mapping[str, Sequence[str]] | None = None) -> str:
    """The same ruleset in nft syntax (`nft -f` accepts it; the dry run prints it)."""
    sets, chains = build_model(config, proxy_ips, dns_bypass, ipv6=ipv6, selection=selection,
                               cgroup_elements=cgroup_elements)
    lines = [f"create table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{"]
    for s in sets:
        lines.append(f"\tset {s.name} {{")
        lines.append(f"\t\ttype {s.type}")
        if s.interval:
            lines.append("\t\tflags interval")
        if s.elements:
            lines.append("\t\telements = { "
                         + ", ".join(_set_element(s, e)[1] for e in s.elements) + " }")
        lines.append("\t}")
    for c in chains:
        lines.append(f"\tchain {c.name} {{")
        if c.hook:
            lines.append(f"\t\ttype {c.type} hook {c.hook} priority {c.prio_name}; "
                         "policy accept;")
        for rule in c.rules:
            lines.append("\t\t" + " ".join(s.text for s in rule))
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def chain_names(config: Config, selection: ResolvedSelection | None = None) -> tuple[str, ...]:
    """Names of the chains the ruleset creates (what `verify` checks after loading)."""
    base = ("capture", "killswitch", "killswitch_post") if config.killswitch else ("capture",)
    return (("selection",) if uses_selection(selection) else ()) + base


def element_commands(items: Iterable[tuple[Any, str]]) -> str:
    """nft text adding/deleting cgroup set elements, one line per (verb, set) in first-seen
    order; loaded as one buffer it is one transaction. `items`: (selection.Change, the
    cgroup reference nft resolves, see selection.nft_cgroup_ref)."""
    groups: dict[tuple[bool, str], list[str]] = {}
    for change, ref in items:
        groups.setdefault((change.add, change.set), []).append(ref)
    lines = []
    for (add, name), refs in groups.items():
        verb = "add" if add else "delete"
        quoted = ", ".join('"' + r.replace('"', '') + '"' for r in refs)
        lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {quoted} }}")
    return "\n".join(lines) + ("\n" if lines else "")
