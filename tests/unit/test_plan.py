"""The planner: config + facts -> ops. Pure, so every case is checked without a kernel.

Golden files: tests/unit/golden/<case>.json hold plan_to_json() of each case below. After an
intended change to the plan, regenerate them and review the diff:

    PROXYVPN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_plan.py
    git diff tests/unit/golden/
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from proxyvpn.config import build_config
from proxyvpn.errors import ConfigError
from proxyvpn.plan.build import build_plan, dns_bypass_for
from proxyvpn.plan.facts import DefaultRoute, HostFacts
from proxyvpn.plan.ops import (
    AddRoute,
    AddRule,
    CreateTun,
    LinkUp,
    LoadNftTable,
    SetAddress,
    SetSysctl,
)
from proxyvpn.plan.render import plan_to_json

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PROXYVPN_UPDATE_GOLDEN") == "1"

FACTS = HostFacts(
    resolvers=("192.0.2.53",),
    systemd_upstreams=(),
    proxy_ips=("192.0.2.10",),
    default_routes=(DefaultRoute(4, "192.0.2.1", "eth0"),),
    links=frozenset({"lo", "eth0"}),
    tables_in_use=frozenset({254, 255}),
    rule_priorities_in_use=frozenset({0, 32766, 32767}),
    sysctls={
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "1",
        "net.ipv6.conf.all.disable_ipv6": "0",
        "net.ipv6.conf.default.disable_ipv6": "0",
    },
    ipv6_enabled=True,
)
PROXY = "http://alice:s3cret@proxy.example:3128"


def config(**settings):
    settings.setdefault("proxy_url", PROXY)
    return build_config(settings)


CASES = {
    "killswitch_on": (config(), FACTS),
    "killswitch_off": (config(killswitch=False), FACTS),
    "ipv6_off": (config(ipv6=False), FACTS),
    "excludes_allow_dns": (
        config(exclude=["10.0.0.0/8", "10.1.0.0/16", "192.168.1.7", "2001:db8:1::/48"],
               allow_dns=["9.9.9.9", "2620:fe::fe", "9.9.9.9"]),
        FACTS,
    ),
    "systemd_stub": (
        config(),
        dataclasses.replace(FACTS, resolvers=("127.0.0.53",),
                            systemd_upstreams=("198.51.100.53", "2001:db8::53")),
    ),
    "https_two_proxy_ips": (
        config(proxy_url="https://bob:hunter2@proxy.example", tun_name="pvpn0",
               table=100, rule_priority=90, capture_mark="0x1", bypass_mark="0x2", mtu=9000),
        dataclasses.replace(FACTS, proxy_ips=("198.51.100.7", "2001:db8::7")),
    ),
}

CASES["select_users_groups"] = (
    # No cgroup2 in the facts: uid/gid rules only, still JSON-loadable (tests/netns).
    config(only_user=["alice", "1001"], skip_group=["nogroup"]),
    dataclasses.replace(FACTS, users={"alice": 1000}, groups={"nogroup": 65534}),
)

CG_FACTS = dataclasses.replace(
    FACTS, cgroup2="/sys/fs/cgroup/unified",
    cgroups=(("/proxyvpn", 2), ("/proxyvpn/capture", 3), ("/system.slice", 4),
             ("/user.slice", 5), ("/user.slice/user-1000.slice", 6),
             ("/user.slice/user-1000.slice/app-firefox@1.service", 7)))
SEL_CASES = {
    # cgroup sets: loaded as nft text (libnftables 1.0 JSON lacks socket cgroupv2).
    "select_cgroups": (config(only_cgroup=[r"app-firefox@\d+\.service$"],
                              skip_cgroup=["^/system\\.slice"]), CG_FACTS),
    "select_exec_only": (config(), CG_FACTS),
}
"""Per-app routing with cgroups; their element paths do not exist on the test host."""


IPT_FACTS = dataclasses.replace(FACTS, firewall="iptables",
                                iptables_tables=frozenset({"4/filter"}))
IPT_CASES = {
    # The iptables backend: same inputs, chains PROXYVPN instead of table inet proxyvpn.
    "iptables_killswitch_on": (config(), IPT_FACTS),
    "iptables_killswitch_off": (config(killswitch=False), IPT_FACTS),
    "iptables_ipv6_off": (config(ipv6=False), IPT_FACTS),
    "iptables_excludes_two_proxy_ips": (
        config(exclude=["10.0.0.0/8", "10.1.0.0/16", "2001:db8:1::/48"],
               allow_dns=["2620:fe::fe"], tun_name="pvpn0", capture_mark="0x1",
               bypass_mark="0x2"),
        dataclasses.replace(IPT_FACTS, proxy_ips=("198.51.100.7", "2001:db8::7"),
                            iptables_tables=None),
    ),
}
"""Kept apart from CASES, whose first op is the nftables table (tests/netns checks it)."""


@pytest.mark.parametrize("case", sorted([*CASES, *IPT_CASES, *SEL_CASES]))
def test_golden_plan(case):
    cfg, facts = CASES.get(case) or IPT_CASES.get(case) or SEL_CASES[case]
    text = plan_to_json(build_plan(cfg, facts))
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PROXYVPN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"plan for {case} changed; see the module docstring"


def test_plan_is_deterministic():
    cfg, facts = CASES["excludes_allow_dns"]
    assert plan_to_json(build_plan(cfg, facts)) == plan_to_json(build_plan(cfg, facts))
    # Set elements do not depend on the order facts list them in.
    shuffled = dataclasses.replace(facts, proxy_ips=("2001:db8::7", "198.51.100.7"))
    a = build_plan(cfg, dataclasses.replace(facts, proxy_ips=("198.51.100.7", "2001:db8::7")))
    b = build_plan(cfg, shuffled)
    assert a.ops[0] == b.ops[0]
    # ...while the dialing order is kept as resolved.
    assert b.proxy_ips == ("2001:db8::7", "198.51.100.7")


def test_password_never_in_plan():
    for cfg, facts in CASES.values():
        text = plan_to_json(build_plan(cfg, facts))
        assert "s3cret" not in text and "hunter2" not in text


def kinds(plan):
    return [type(op).__name__ for op in plan.ops]


def test_order_fails_closed():
    plan = build_plan(*CASES["killswitch_on"])
    assert kinds(plan) == [
        "LoadNftTable", "CreateTun", "SetAddress", "SetAddress", "LinkUp", "SetSysctl",
        "AddRoute", "AddRoute", "AddRule", "AddRule",
    ]
    # The killswitch is loaded before anything is captured; the rules come last.
    assert isinstance(plan.ops[0], LoadNftTable) and "killswitch" in plan.ops[0].text
    assert plan.ops[1] == CreateTun("tun0", 65535)
    assert plan.ops[2:5] == (SetAddress("tun0", "10.255.255.1/30"),
                             SetAddress("tun0", "fd70:7076::1/126"), LinkUp("tun0"))
    assert plan.ops[5] == SetSysctl("net.ipv4.conf.tun0.rp_filter", "2", "1")
    assert plan.ops[6:] == (AddRoute(4, 7076, "tun0"), AddRoute(6, 7076, "tun0"),
                            AddRule(4, 0x7076, 7076, 7076), AddRule(6, 0x7076, 7076, 7076))


def test_ipv6_off_has_no_v6_ops_but_killswitch_still_blocks_v6():
    plan = build_plan(*CASES["ipv6_off"])
    assert all(getattr(op, "family", 4) in (4, "inet") for op in plan.ops)
    assert not any(isinstance(op, SetAddress) and ":" in op.cidr for op in plan.ops)
    text = plan.ops[0].text
    assert "meta nfproto ipv6 return" in text.split("chain capture")[1].split("}")[0]
    # The final reject has no family restriction: it blocks IPv6 too.
    assert "counter reject with icmpx admin-prohibited" in text


def test_host_without_ipv6():
    cfg = config(proxy_ip=["192.0.2.10", "2001:db8::10"])
    facts = dataclasses.replace(FACTS, ipv6_enabled=False, proxy_ips=("192.0.2.10", "2001:db8::10"))
    plan = build_plan(cfg, facts)
    assert plan.proxy_ips == ("192.0.2.10",)
    assert not any(getattr(op, "family", 4) == 6 for op in plan.ops)
    assert any("IPv6 is disabled" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match="no usable address"):
        build_plan(cfg, dataclasses.replace(facts, proxy_ips=("2001:db8::10",)))


def test_tun_inheriting_disabled_ipv6_gets_it_enabled_first():
    facts = dataclasses.replace(FACTS, sysctls={**FACTS.sysctls,
                                                "net.ipv6.conf.default.disable_ipv6": "1"})
    plan = build_plan(config(), facts)
    sysctl = SetSysctl("net.ipv6.conf.tun0.disable_ipv6", "0", "1")
    assert plan.ops.index(sysctl) < plan.ops.index(SetAddress("tun0", "fd70:7076::1/126"))
    assert sysctl.undo() == SetSysctl("net.ipv6.conf.tun0.disable_ipv6", "1")


def test_tun_name_with_dot_uses_sysctl_slash():
    plan = build_plan(config(tun_name="pv.0"), FACTS)
    assert SetSysctl("net.ipv4.conf.pv/0.rp_filter", "2", "1") in plan.ops


@pytest.mark.parametrize("change, settings, message", [
    ({"links": frozenset({"lo", "tun0"})}, {}, "TUN name 'tun0' is already in use.*--tun-name"),
    ({"tables_in_use": frozenset({254, 255, 7076})}, {}, "--table 7076 already holds routes"),
    ({"rule_priorities_in_use": frozenset({0, 7076, 32766})}, {}, "--rule-priority 7076"),
    ({"links": frozenset({"pv1"})}, {"tun_name": "pv1"}, "TUN name 'pv1'"),
])
def test_conflicts_are_config_errors(change, settings, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(config(**settings), dataclasses.replace(FACTS, **change))


@pytest.mark.parametrize("name", ['tun"0', "tun'0", "tun$x", "tun;0"])
def test_tun_names_that_would_need_quoting_are_refused(name):
    with pytest.raises(ConfigError, match="may only contain"):
        build_plan(config(tun_name=name), FACTS)


def test_conflict_free_after_changing_the_flag():
    facts = dataclasses.replace(FACTS, links=frozenset({"tun0"}),
                                tables_in_use=frozenset({7076}),
                                rule_priorities_in_use=frozenset({7076}))
    plan = build_plan(config(tun_name="tun1", table=7077, rule_priority=7000), facts)
    assert AddRule(4, 0x7076, 7077, 7000) in plan.ops


# ---------------------------------------------------------------- DNS bypass


@pytest.mark.parametrize("resolvers, upstreams, dns, allow, want", [
    (("192.0.2.53",), (), (), (), ("192.0.2.53",)),
    # A stub resolver is replaced by systemd-resolved's upstreams...
    (("127.0.0.53",), ("198.51.100.1", "2001:db8::1"), (), (), ("198.51.100.1", "2001:db8::1")),
    # ...and without them it is simply reachable through lo: nothing to bypass.
    (("127.0.0.53",), (), (), (), ()),
    (("::1", "192.0.2.53"), (), (), (), ("192.0.2.53",)),
    # --dns replaces the host's resolvers; --allow-dns adds; duplicates collapse.
    (("192.0.2.53",), (), ("203.0.113.5",), ("9.9.9.9", "203.0.113.5"), ("203.0.113.5", "9.9.9.9")),
    # Zone indexes and garbage from resolv.conf.
    (("fe80::1%eth0", "not-an-ip"), (), (), (), ("fe80::1",)),
])
def test_dns_bypass(resolvers, upstreams, dns, allow, want):
    cfg = config(dns=list(dns), allow_dns=list(allow))
    facts = dataclasses.replace(FACTS, resolvers=resolvers, systemd_upstreams=upstreams)
    assert dns_bypass_for(cfg, facts) == want


def test_warns_when_killswitch_blocks_all_dns():
    facts = dataclasses.replace(FACTS, resolvers=("127.0.0.53",))
    plan = build_plan(config(), facts)
    assert any("no resolver reachable" in w and "--allow-dns" in w for w in plan.warnings)
    assert plan.dns_bypass == ()
    assert not build_plan(config(killswitch=False), facts).warnings
    assert not build_plan(config(allow_dns=["9.9.9.9"]), facts).warnings


def test_dry_run_without_proxy_plans_a_skeleton():
    cfg = build_config({}, dry_run=True)
    plan = build_plan(cfg, dataclasses.replace(FACTS, proxy_ips=()))
    assert plan.proxy_ips == ()
    assert any("no proxy" in w for w in plan.warnings)
    # No proxy port known: no proxy accept rule; everything else is in place.
    assert "tcp dport" not in plan.ops[0].text.split("chain killswitch")[1].split("th dport")[0]


def test_excludes_are_merged_for_the_interval_set():
    cfg, facts = CASES["excludes_allow_dns"]
    text = build_plan(cfg, facts).ops[0].text
    assert "elements = { 10.0.0.0/8, 192.168.1.7 }" in text
    assert "elements = { 2001:db8:1::/48 }" in text


def test_every_op_has_a_consistent_undo():
    for cfg, facts in CASES.values():
        for op in build_plan(cfg, facts).ops:
            undo = op.undo()
            if isinstance(op, LinkUp):
                assert undo is None  # the link is deleted with the TUN
            else:
                assert undo is not None and undo.undo() is None, op


def test_golden_files_are_valid_json():
    for case in CASES:
        data = json.loads((GOLDEN / f"{case}.json").read_text())
        assert data["ops"][0]["kind"] == "LoadNftTable"
        assert data["ops"][0]["undo"] == {"kind": "DeleteNftTable", "family": "inet",
                                          "name": "proxyvpn"}


@pytest.mark.parametrize("name", ["tun+", "vpn*"])
def test_tun_names_with_wildcards_are_refused(name):
    """iptables reads `-o tun+` as every tun* interface; the killswitch would open them all."""
    with pytest.raises(ConfigError, match="not a valid interface name"):
        config(tun_name=name)
